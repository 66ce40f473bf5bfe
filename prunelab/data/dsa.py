"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021) as IDC uses it, plus CutMix.

Per call, as in IDC's `DiffAug`: flip (p=1/2), colour (brightness, saturation, contrast), *one* of
crop / scale / rotate, then cutout (left out when CutMix follows). Every operation is differentiable
in the pixels (arithmetic, masks and one `grid_sample`), so distillers can back-propagate through it.
Randomness comes only from the `torch.Generator` handed in, so a fixed seed gives fixed output.

IDC applies DSA after normalization, and so does prunelab: its constants (a brightness shift of up
to ±0.5, zero padding and cutout) are in units of the normalized images. The training loop hands
augmentations [0, 1] pixels, so `make_dsa_augment` normalizes, applies DSA and maps back (exact up
to float rounding); the distillers apply it to normalized batches directly.

Two modes:
- per-sample parameters (`dsa`, `make_dsa_augment`): training on a synthetic set;
- shared parameters (`dsa_siamese`): the same random transformation for a real and a synthetic
  batch, as gradient / distribution matching needs (IDC's `batch=True` mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..hparams import TrainingHparams

# IDC's DiffAug constants
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CUTMIX_PROB = TrainingHparams.__dataclass_fields__["cutmix_prob"].default  # IDC's CIFAR recipe: 1/2
GEOMETRIC = ("crop", "scale", "rotate")


@dataclass
class DSAParams:
    """Random parameters of one DSA draw; every tensor has a leading dim of n (or 1 = shared)."""

    flip: torch.Tensor        # (n,) bool
    brightness: torch.Tensor  # (n,)
    saturation: torch.Tensor  # (n,)
    contrast: torch.Tensor    # (n,)
    theta: torch.Tensor       # (n, 2, 3) affine of the chosen geometric op (identity if none)
    cutout: Optional[torch.Tensor]  # (n, 2) top-left corner of the cutout square, or None


def _uniform(n, gen, device):
    return torch.rand(n, generator=gen, device=device)


def sample_dsa_params(n: int, size: tuple[int, int], gen: torch.Generator, *, cutout: bool = True,
                      device=None) -> DSAParams:
    """Draw DSA parameters for `n` images of spatial `size` (n=1: one draw shared by a whole batch)."""
    device = gen.device if device is None else device
    h, w = size
    flip = _uniform(n, gen, device) < PROB_FLIP
    brightness = (_uniform(n, gen, device) - 0.5) * BRIGHTNESS
    saturation = _uniform(n, gen, device) * SATURATION
    contrast = _uniform(n, gen, device) + CONTRAST
    # one geometric op per image; all three are drawn so the stream does not depend on the choice
    choice = torch.randint(0, len(GEOMETRIC), (n,), generator=gen, device=device)
    shift_x, shift_y = int(h * RATIO_CROP_PAD + 0.5), int(w * RATIO_CROP_PAD + 0.5)
    tx = torch.randint(-shift_x, shift_x + 1, (n,), generator=gen, device=device).float()
    ty = torch.randint(-shift_y, shift_y + 1, (n,), generator=gen, device=device).float()
    lo = 1.0 / RATIO_SCALE
    sx = _uniform(n, gen, device) * (RATIO_SCALE - lo) + lo
    sy = _uniform(n, gen, device) * (RATIO_SCALE - lo) + lo
    ang = (_uniform(n, gen, device) - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=device).expand(n, 2, 3)
    # integer pixel shifts: 2k/size in normalized coordinates lands exactly on pixel centres
    crop = eye.clone()
    crop[:, 0, 2] = 2 * ty / w
    crop[:, 1, 2] = 2 * tx / h
    scale = torch.zeros(n, 2, 3, device=device)
    scale[:, 0, 0], scale[:, 1, 1] = sx, sy
    c, s = torch.cos(ang), torch.sin(ang)
    rot = torch.zeros(n, 2, 3, device=device)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = c, -s, s, c
    theta = torch.stack([crop, scale, rot], 1)[torch.arange(n, device=device), choice]
    cut = None
    if cutout:
        ch, cw = int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)
        ox = torch.randint(0, h + (1 - ch % 2), (n,), generator=gen, device=device)
        oy = torch.randint(0, w + (1 - cw % 2), (n,), generator=gen, device=device)
        cut = torch.stack([ox - ch // 2, oy - cw // 2], 1)
    return DSAParams(flip, brightness, saturation, contrast, theta, cut)


def apply_dsa(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Apply drawn parameters to a float batch (N, C, H, W); parameters with n=1 are broadcast."""
    n, _, h, w = x.shape
    dev, dt = x.device, x.dtype

    def col(t):
        return t.to(dev, dt).view(-1, 1, 1, 1)

    x = torch.where(p.flip.to(dev).view(-1, 1, 1, 1), x.flip(3), x)
    x = x + col(p.brightness)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * col(p.saturation) + mean_c
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean_all) * col(p.contrast) + mean_all
    theta = p.theta.to(dev, dt).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if p.cutout is not None:
        ch, cw = int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)
        top, left = p.cutout[:, 0].to(dev).view(-1, 1, 1), p.cutout[:, 1].to(dev).view(-1, 1, 1)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        hole = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
        x = x * (~hole).to(dt).unsqueeze(1)
    return x


def dsa(x: torch.Tensor, gen: torch.Generator, *, cutout: bool = True) -> torch.Tensor:
    """DSA with independent parameters per image."""
    return apply_dsa(x, sample_dsa_params(x.shape[0], x.shape[-2:], gen, cutout=cutout, device=x.device))


def dsa_siamese(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator, *,
                cutout: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random transformation applied to every image of two batches (IDC's batch mode)."""
    p = sample_dsa_params(1, a.shape[-2:], gen, cutout=cutout, device=a.device)
    return apply_dsa(a, p), apply_dsa(b, p)


def apply_cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator,
           prob: float = CUTMIX_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix on the batch with probability `prob` (one coin per batch, as IDC's training loop).

    Returns soft targets (N, K): the one-hot label mixed with the pasted image's label by area, which
    cross-entropy turns into IDC's `ratio * CE(y) + (1 - ratio) * CE(y[perm])`. lam ~ Beta(1, 1).
    """
    dev = x.device
    targets = F.one_hot(y, num_classes).to(x.dtype)
    if float(torch.rand((), generator=gen, device=dev)) >= prob:
        return x, targets
    n, _, h, w = x.shape
    lam = float(torch.rand((), generator=gen, device=dev))
    perm = torch.randperm(n, generator=gen, device=dev)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (), generator=gen, device=dev))
    cx = int(torch.randint(0, w, (), generator=gen, device=dev))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    if y2 <= y1 or x2 <= x1:
        return x, targets
    rows = torch.arange(h, device=dev).view(h, 1)
    cols = torch.arange(w, device=dev).view(1, w)
    box = ((rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)).to(x.dtype)
    x = x * (1 - box) + x[perm] * box
    ratio = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return x, ratio * targets + (1.0 - ratio) * targets[perm]


def make_dsa_augment(cutmix: bool, num_classes: Optional[int] = None, prob: float = CUTMIX_PROB,
                     mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
    """An `Augment` for prunelab.train: per-image DSA on the images normalized by `mean`/`std` (IDC's
    order), handed back as pixels, then CutMix (on a batch with probability `prob`, IDC's 1/2 by
    default) if `cutmix`. CutMix mixes boxes of images, so it is the same before or after the
    per-channel normalization.

    With CutMix the cutout op is dropped (as IDC does) and targets are soft labels (N, K); without it
    targets are the class ids unchanged. `num_classes` is required with CutMix.
    """
    if cutmix and not num_classes:
        raise ValueError("make_dsa_augment(cutmix=True) needs num_classes")
    use_cutmix = cutmix

    def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = dsa((x - m) / s, gen, cutout=not use_cutmix) * s + m
        if use_cutmix:
            return apply_cutmix(x, y, num_classes, gen, prob=prob)
        return x, y

    return augment
