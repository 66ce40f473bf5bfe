"""How many weights each layer keeps: Erdős–Rényi-Kernel densities and score-based selection."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import ConfigError
from .masks import Mask

SCOPES = ("global", "layerwise", "erk", "chain")


def check_scope(scope: str) -> None:
    """ConfigError naming `pruning.scope` unless `scope` is one of SCOPES."""
    if scope not in SCOPES:
        raise ConfigError("pruning.scope", f"unknown scope {scope!r}", "use global, layerwise, erk or chain")


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-layer densities of the Erdős–Rényi-Kernel distribution (Evci et al. 2020, "Rigging the lottery").

    density_l = min(1, eps * sum(shape_l) / prod(shape_l)), with eps such that the layers together keep
    `density` of their weights; layers that would exceed 1 are made dense and eps is solved again over
    the others, until none does.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items() if sizes[n] > 0}
    if density == 1.0:
        return {n: 1.0 for n in shapes}
    dense: set[str] = set()
    eps = 0.0
    while True:
        sparse = [n for n in raw if n not in dense]
        if not sparse:
            break
        # the budget the dense layers leave, spread over the others in proportion to raw_l * n_l
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        eps = budget / sum(raw[n] * sizes[n] for n in sparse)
        # making a layer dense frees budget and raises eps, so every layer over 1 now stays over 1
        over = {n for n in sparse if eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if (n in dense or sizes[n] == 0) else eps * raw[n] for n in shapes}


def _prune_lowest(scores: torch.Tensor, keep: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Flat bool tensor: of the positions `keep` marks, the `n_keep` with the highest scores."""
    idx = keep.nonzero().flatten()
    s = scores[idx]
    s = torch.where(torch.isnan(s), torch.tensor(-math.inf, dtype=s.dtype), s)
    out = keep.clone()
    # stable ascending sort prunes equal scores in position order, as magnitude_prune does
    out[idx[torch.sort(s, stable=True).indices[:idx.numel() - n_keep]]] = False
    return out


def select(scores: dict[str, torch.Tensor], mask: Mask, target_remaining: int, scope: str = "global",
           layer_counts: Optional[dict[str, int]] = None) -> Mask:
    """A new Mask keeping the highest-scoring weights among those `mask` keeps (pruned weights never return).

    "global": one ranking over all layers, exactly `target_remaining` kept. "layerwise": every layer keeps
    the same fraction of its remaining weights, rounded per layer. "erk": every layer keeps
    round(n_l * erk_densities(...)[l]) at density target_remaining / mask.total, capped by what it has
    left; with "layerwise" and "erk" the total may differ from `target_remaining` by rounding (and, for
    "erk", by the cap). "chain": every layer keeps `layer_counts[l]` (another chain's mask's counts,
    capped by what it has left). NaN scores count as lowest; ties are broken by position (deterministic).
    """
    check_scope(scope)
    if (scope == "chain") != (layer_counts is not None):
        raise ValueError("layer_counts go with scope 'chain', and only with it")
    remaining = mask.remaining
    if not 0 <= target_remaining <= remaining:
        raise ConfigError("pruning", f"cannot keep {target_remaining} of {remaining} remaining weights")
    for n, m in mask.items():
        if n not in scores or tuple(scores[n].shape) != tuple(m.shape):
            got = tuple(scores[n].shape) if n in scores else None
            raise ValueError(f"scores for {n!r}: expected shape {tuple(m.shape)}, got {got}")
    flat = {n: scores[n].detach().cpu().double().flatten() for n in mask}
    keep = {n: m.detach().cpu().bool().flatten() for n, m in mask.items()}

    if scope == "global":
        names = list(mask)
        kept = _prune_lowest(torch.cat([flat[n] for n in names]), torch.cat([keep[n] for n in names]),
                             target_remaining)
        out, i = Mask(), 0
        for n in names:
            out[n] = kept[i:i + keep[n].numel()].view(mask[n].shape).clone()
            i += keep[n].numel()
        return out

    if scope == "chain":
        counts = {n: min(int(layer_counts[n]), int(keep[n].sum())) for n in mask}
    elif scope == "layerwise":
        frac = target_remaining / max(remaining, 1)
        counts = {n: int(round(int(keep[n].sum()) * frac)) for n in mask}
    else:
        total = mask.total
        dens = (erk_densities({n: tuple(m.shape) for n, m in mask.items()}, target_remaining / total)
                if target_remaining > 0 else {n: 0.0 for n in mask})
        counts = {n: min(int(round(mask[n].numel() * dens[n])), int(keep[n].sum())) for n in mask}
    return Mask((n, _prune_lowest(flat[n], keep[n], counts[n]).view(mask[n].shape)) for n in mask)
