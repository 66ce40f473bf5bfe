"""Shared pieces of the pruning-at-initialization scores: a masked copy to differentiate, and the batch check."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..masks import Mask


def masked_copy(model: nn.Module, mask: Mask, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `model` in eval mode with `mask` applied and only the masked weights requiring grad:
    scoring differentiates the copy, so the caller's weights, gradients and mode stay as they were."""
    net = copy.deepcopy(model)
    if dtype is not None:
        net.to(dtype)
    mask.apply(net)
    net.eval()
    net.requires_grad_(False)
    for w in masked_weights(net, mask):
        w.requires_grad_(True)
    return net


def masked_weights(net: nn.Module, mask: Mask) -> list[nn.Parameter]:
    """The parameters `mask` covers, in mask order."""
    params = dict(net.named_parameters())
    return [params[n] for n in mask]


def as_scores(mask: Mask, tensors) -> dict[str, torch.Tensor]:
    """name -> detached CPU score tensor, in mask order."""
    return {n: t.detach().cpu() for n, t in zip(mask, tensors)}


def require_batch(batch, method: str):
    """`batch` as (x, y), or a ValueError saying that `method` needs data."""
    if batch is None:
        raise ValueError(f"{method} scores weights on data: pass batch=(x, y)")
    x, y = batch
    return x, y
