"""GraSP: gradient signal preservation (Wang et al. 2020, "Picking winning tickets before training by preserving gradient flow")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import Mask
from ._common import as_scores, masked_copy, masked_weights, require_batch


def grasp_scores(model: nn.Module, mask: Mask, batch, temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """The paper's −w ⊙ (H g) on the masked model: g = ∂L/∂w on the weights `mask` keeps (0 elsewhere)
    and H the Hessian of L with respect to the prunable weights, L the mean cross-entropy of
    logits / `temperature` on `batch` = (x, y). With a full mask this is the paper's one-shot score.

    GraSP prunes the weights with the highest value: removing them reduces the gradient norm least.
    """
    x, y = require_batch(batch, "grasp")
    net = masked_copy(model, mask)
    ws = masked_weights(net, mask)
    with torch.enable_grad():
        grads = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), ws, create_graph=True)
        # Hg by double backprop: the gradient of g_detached · g is H g (H is symmetric); g is restricted
        # to the kept weights, since pruned ones never train and carry no gradient flow
        keep = [m.to(device=w.device, dtype=w.dtype) for w, m in zip(ws, mask.values())]
        z = sum((g.detach() * k * g).sum() for g, k in zip(grads, keep))
        hg = torch.autograd.grad(z, ws, allow_unused=True)
    return as_scores(mask, [-w * h if h is not None else torch.zeros_like(w) for w, h in zip(ws, hg)])


def scores(model: nn.Module, mask: Mask, batch, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """w ⊙ (H g) (GraSP's quantity negated, so that higher = keep) at temperature 200; `seed` is not used."""
    return {n: -s for n, s in grasp_scores(model, mask, batch).items()}
