"""Magnitude at initialization: keep the largest |w| before any training."""

from __future__ import annotations

import torch
from torch import nn

from ..masks import Mask


@torch.no_grad()
def scores(model: nn.Module, mask: Mask, batch=None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """|w| of the masked model (pruned weights score 0); `batch` and `seed` are not used."""
    mask.check_fits(model)
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs().cpu() * m.cpu() for n, m in mask.items()}
