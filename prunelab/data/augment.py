"""Batch augmentation on the device (no per-sample DataLoader in the hot loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding `pad` and horizontal flip with probability 1/2, per image.

    `x` is a float batch (N, C, H, W) on any device; `gen` lives on the same device.
    """
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        # one gather with per-image offsets instead of a Python loop over images
        ox = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        oy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        rows = (oy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (n, h)
        cols = (ox.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (n, w)
        idx_r = rows.view(n, 1, h, 1).expand(n, x.shape[1], h, padded.shape[3])
        padded = padded.gather(2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = padded.gather(3, idx_c)
    if flip:
        do = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(do.view(n, 1, 1, 1), x.flip(3), x)
    return x
