"""SynFlow: iterative synaptic flow pruning (Tanaka et al. 2020, "Pruning neural networks without any data by
iteratively conserving synaptic flow")."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..allocation import check_scope, select
from ..errors import ConfigError
from ..masks import Mask
from ._common import as_scores, masked_weights

# what BatchNorm in eval mode is at initialization (running mean 0, variance 1, affine identity)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def input_shape_of(batch, input_shape=None) -> tuple[int, ...]:
    """(C, H, W): the batch's x shape without the batch dimension, else `input_shape`."""
    if batch is not None:
        shape = tuple(batch[0].shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(f"input_shape {tuple(input_shape)} disagrees with the batch's {shape}")
        return shape
    if input_shape is None:
        raise ValueError("synflow needs the input shape: pass batch=(x, y) or input_shape=(C, H, W)")
    return tuple(input_shape)


def _linearized(model: nn.Module) -> nn.Module:
    """A float64 eval-mode copy with |parameters| and normalization layers replaced by identity."""
    net = copy.deepcopy(model).to(torch.float64).eval()
    for name, module in list(net.named_modules()):
        if name and isinstance(module, NORMS):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, nn.Identity())
    net.requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    return net


def _flow(net: nn.Module, abs_weights: list[torch.Tensor], mask: Mask, shape) -> dict[str, torch.Tensor]:
    """|w ⊙ ∂R/∂w| with the weights of the linearized `net` set to |w| ⊙ mask and R = sum(net(ones))."""
    ws = masked_weights(net, mask)
    with torch.no_grad():
        for w, a, m in zip(ws, abs_weights, mask.values()):
            w.copy_(a * m.to(device=a.device, dtype=a.dtype))
    for w in ws:
        w.requires_grad_(True)
    ones = torch.ones((1, *shape), dtype=torch.float64, device=ws[0].device)
    with torch.enable_grad():
        grads = torch.autograd.grad(net(ones).sum(), ws)
    for w in ws:
        w.requires_grad_(False)
    return as_scores(mask, [(w * g).abs() for w, g in zip(ws, grads)])


def scores(model: nn.Module, mask: Mask, batch=None, *, seed: int = 0, input_shape=None) -> dict[str, torch.Tensor]:
    """Synaptic flow |w ⊙ ∂R/∂w| (float64; pruned weights score 0), R the summed output of the network
    with |parameters| and normalization layers as identity on an all-ones input of shape (1, C, H, W).

    Data-free: only the batch's x shape is read (else `input_shape` = (C, H, W)); `seed` is not used.
    The conservation law behind it holds for networks of linear layers and ReLUs, which is why
    normalization layers are removed.
    """
    mask.check_fits(model)
    net = _linearized(model)
    return _flow(net, [w.detach().clone() for w in masked_weights(net, mask)], mask,
                 input_shape_of(batch, input_shape))


def synflow_mask(model: nn.Module, mask: Mask, target_remaining: int, scope: str = "global",
                 iterations: int = 100, input_shape=None, layer_counts=None) -> Mask:
    """Iterative SynFlow: at step k of `iterations`, rescore with the current mask and `select` down to
    start · (target_remaining / start)^(k / iterations) weights (start = mask.remaining), so the last
    step keeps `target_remaining` (up to the rounding of "layerwise" and "erk" scopes). With scope
    "chain", each layer follows the same schedule down to its own `layer_counts` entry.

    `input_shape` = (C, H, W) of the model's input is required.
    """
    check_scope(scope)
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    shape = input_shape_of(None, input_shape)
    mask.check_fits(model)
    start = mask.remaining
    if not 0 <= target_remaining <= start:
        raise ConfigError("pruning", f"cannot keep {target_remaining} of {start} remaining weights")
    net = _linearized(model)
    abs_weights = [w.detach().clone() for w in masked_weights(net, mask)]
    current = Mask((n, m.clone()) for n, m in mask.items())
    starts = {n: int(m.sum()) for n, m in mask.items()}
    for k in range(1, iterations + 1):
        count = round(start * (target_remaining / start) ** (k / iterations)) if start else 0
        counts = None
        if layer_counts is not None:
            counts = {n: round(s0 * (min(layer_counts[n], s0) / s0) ** (k / iterations)) if s0 else 0
                      for n, s0 in starts.items()}
        # "layerwise"/"erk" may keep fewer than asked, so never ask for more than is left
        current = select(_flow(net, abs_weights, current, shape), current, min(count, current.remaining), scope,
                         layer_counts=counts)
    return current
