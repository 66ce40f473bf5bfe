"""SNIP: connection sensitivity (Lee et al. 2019, "SNIP: single-shot network pruning based on connection sensitivity")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import Mask
from ._common import as_scores, masked_copy, masked_weights, require_batch


def scores(model: nn.Module, mask: Mask, batch, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """|w ⊙ ∂L/∂w| on the masked model, L the mean cross-entropy on `batch` = (x, y); `seed` is not used."""
    x, y = require_batch(batch, "snip")
    net = masked_copy(model, mask)
    ws = masked_weights(net, mask)
    with torch.enable_grad():
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), ws)
    return as_scores(mask, [(w * g).abs() for w, g in zip(ws, grads)])
