"""Random scores: the pruning-at-initialization control that ignores weights and data."""

from __future__ import annotations

import torch
from torch import nn

from ..masks import Mask


def scores(model: nn.Module, mask: Mask, batch=None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores from a CPU generator seeded with `seed` (the same seed gives the same
    scores on every device); `model` and `batch` are not read."""
    g = torch.Generator().manual_seed(int(seed))
    return {n: torch.rand(m.shape, generator=g) for n, m in mask.items()}
