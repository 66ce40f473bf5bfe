"""Mask anatomy: how alike are the masks that different pruning methods (or seeds, or rounds) find?

Overlap is measured with Jaccard similarity and Hamming distance over all prunable weights, and set
against what two random masks with the same per-layer counts would give. The per-layer density alone
already forces some overlap (two masks that both keep 90% of a layer share most of it), so the
*excess* Jaccard (observed minus random expectation) is what says the masks pick the same weights.
"""

from __future__ import annotations

from itertools import combinations
from typing import Optional

import torch

from .masks import Mask

__all__ = ["layer_density", "jaccard", "hamming", "expected_jaccard", "expected_hamming", "overlap",
           "overlap_matrix", "convergence", "seed_overlap"]


def _check_compatible(a: Mask, b: Mask) -> None:
    for name in a:
        if name not in b:
            raise ValueError(f"masks differ at layer {name!r}: it is in the first mask but not the second")
    for name in b:
        if name not in a:
            raise ValueError(f"masks differ at layer {name!r}: it is in the second mask but not the first")
    for name in a:
        sa, sb = tuple(a[name].shape), tuple(b[name].shape)
        if sa != sb:
            raise ValueError(f"masks differ at layer {name!r}: shape {sa} in the first mask, {sb} in the second")


def _count(t: torch.Tensor) -> int:
    # bool sums are int64, and Python ints keep products like k_a * k_b exact for any layer size
    return int(t.bool().sum())


def _kept(mask: Mask) -> dict[str, int]:
    return {n: _count(v) for n, v in mask.items()}


def _layer_counts(a: Mask, b: Mask, kept_a: Optional[dict[str, int]] = None,
                  kept_b: Optional[dict[str, int]] = None) -> list[tuple[int, int, int, int]]:
    """(n, k_a, k_b, |a ∩ b|) per layer, after checking the masks match. Precomputed per-layer
    counts may be passed so that pairwise comparisons of many masks count each mask only once."""
    _check_compatible(a, b)
    kept_a = _kept(a) if kept_a is None else kept_a
    kept_b = _kept(b) if kept_b is None else kept_b
    out = []
    for name, ta in a.items():
        inter = kept_a[name] if b is a else _count(torch.logical_and(ta, b[name].to(ta.device)))
        out.append((ta.numel(), kept_a[name], kept_b[name], inter))
    return out


def _observed(counts) -> tuple[float, float]:
    inter = sum(i for _, _, _, i in counts)
    union = sum(ka + kb - i for _, ka, kb, i in counts)
    total = sum(n for n, _, _, _ in counts)
    j = inter / union if union else 1.0
    h = (union - inter) / total if total else 0.0
    return j, h


def _expected(counts) -> tuple[float, float]:
    e_inter = sum(ka * kb / n for n, ka, kb, _ in counts if n)
    e_union = sum(ka + kb - ka * kb / n for n, ka, kb, _ in counts if n)
    total = sum(n for n, _, _, _ in counts)
    j = e_inter / e_union if e_union else 1.0
    h = (e_union - e_inter) / total if total else 0.0
    return j, h


def layer_density(mask: Mask) -> dict[str, float]:
    """Fraction of surviving weights in each layer, in mask order (0.0 for a layer with no weights)."""
    return {n: _count(v) / v.numel() if v.numel() else 0.0 for n, v in mask.items()}


def jaccard(a: Mask, b: Mask) -> float:
    """|a ∩ b| / |a ∪ b| of the surviving weights over all layers together; 1.0 when both are empty.

    Raises ValueError if the masks' layer names or shapes differ.
    """
    return _observed(_layer_counts(a, b))[0]


def hamming(a: Mask, b: Mask) -> float:
    """Fraction of all weight positions where `a` and `b` differ."""
    return _observed(_layer_counts(a, b))[1]


def expected_jaccard(a: Mask, b: Mask) -> float:
    """Jaccard expected for two independent random masks keeping exactly `a`'s and `b`'s count of
    weights in every layer (positions uniform within a layer).

    This is the ratio of expectations, E|A∩B| / E|A∪B|, which is what the Jaccard of random masks
    concentrates on when layers hold many weights. For one layer with both densities d it is d / (2 − d).
    """
    return _expected(_layer_counts(a, b))[0]


def expected_hamming(a: Mask, b: Mask) -> float:
    """Hamming distance expected for two independent random masks with `a`'s and `b`'s per-layer counts:
    Σ_l (k_a + k_b − 2 k_a k_b / n) / N."""
    return _expected(_layer_counts(a, b))[1]


def overlap(a: Mask, b: Mask) -> dict:
    """Observed and random-expected Jaccard and Hamming of two masks, plus the excess Jaccard."""
    counts = _layer_counts(a, b)
    j, h = _observed(counts)
    ej, eh = _expected(counts)
    return {"jaccard": j, "hamming": h, "expected_jaccard": ej, "expected_hamming": eh,
            "excess_jaccard": j - ej}


def overlap_matrix(masks: dict[str, Mask]) -> dict:
    """Pairwise Jaccard of named masks (e.g. one per pruning method at one sparsity).

    Returns {"names", "jaccard", "excess"}; the matrices are n×n nested lists in `names` order,
    symmetric, and "excess" is the Jaccard minus its random expectation (see `expected_jaccard`).
    """
    names = list(masks)
    n = len(names)
    kept = [_kept(masks[name]) for name in names]
    jac = [[0.0] * n for _ in range(n)]
    exc = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for k in range(i, n):
            counts = _layer_counts(masks[names[i]], masks[names[k]], kept[i], kept[k])
            j = 1.0 if i == k else _observed(counts)[0]
            e = j - _expected(counts)[0]
            jac[i][k] = jac[k][i] = j
            exc[i][k] = exc[k][i] = e
    return {"names": names, "jaccard": jac, "excess": exc}


def convergence(rounds: dict[int, Mask], final: Optional[Mask] = None) -> dict[int, float]:
    """Jaccard of each round's mask with `final` (default: the mask of the highest round), keyed by
    round in increasing order: how early the final mask's shape is settled."""
    if not rounds:
        raise ValueError("convergence needs at least one round's mask")
    if final is None:
        final = rounds[max(rounds)]
    kept_final = _kept(final)
    return {r: _observed(_layer_counts(rounds[r], final, kept_b=kept_final))[0] for r in sorted(rounds)}


def seed_overlap(masks: list[Mask]) -> dict:
    """Overlap across all pairs of masks found by one method with different seeds.

    Returns {"n_pairs", "jaccard_mean", "excess_mean", "pairs": [(i, j, jaccard), ...]} with i < j
    indexing `masks`. Raises ValueError with fewer than two masks.
    """
    masks = list(masks)
    if len(masks) < 2:
        raise ValueError(f"seed_overlap needs at least two masks, got {len(masks)}")
    kept = [_kept(m) for m in masks]
    pairs, excess = [], []
    for i, k in combinations(range(len(masks)), 2):
        counts = _layer_counts(masks[i], masks[k], kept[i], kept[k])
        j = _observed(counts)[0]
        pairs.append((i, k, j))
        excess.append(j - _expected(counts)[0])
    return {"n_pairs": len(pairs), "jaccard_mean": sum(p[2] for p in pairs) / len(pairs),
            "excess_mean": sum(excess) / len(excess), "pairs": pairs}
