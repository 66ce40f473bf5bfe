"""Intervals over seeds: the paired bootstrap behind every comparison in the figures, tables and verdicts.

Seeds are the unit of replication. A synthetic chain and the IMP chain of the same seed share their
initialization, so a comparison resamples *seeds* (with replacement) and keeps each seed's pair
together. With few seeds (n ≤ `EXACT_MAX_N`) every one of the nⁿ resamples is enumerated, so the
interval is exact and reproducible by hand; above that, `n_boot` resamples are drawn with a fixed
seed. The interval is the percentile interval (numpy's linear interpolation) of the statistic over
the resamples; the point estimate is the statistic of the sample itself.

Ratios are ratios of means (mean synthetic / mean IMP over the resampled seeds), not means of
per-seed ratios, which a seed with a barrier near zero would blow up. A ratio is *defined* only over a
denominator that is positive in every resample (`ratio_defined`): at least two seeds, each positive.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
EXACT_MAX_N = 6  # 6⁶ = 46,656 resamples: enumerated; more seeds are sampled
N_BOOT = 20_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval over `n` seeds (lo = hi = mean when n = 1)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (and n ≥ 2: one seed has no interval)."""
        return self.n >= 2 and math.isfinite(self.lo) and math.isfinite(self.hi) and (self.lo > 0 or self.hi < 0)

    def fmt(self, digits: int = 3) -> str:
        """`0.123 [0.045, 0.201], n=3` (n = 1: no interval)."""
        if not math.isfinite(self.mean):
            return f"undefined, n={self.n}"
        if self.n < 2:
            return f"{self.mean:.{digits}g} (no interval), n={self.n}"
        return f"{self.mean:.{digits}g} [{self.lo:.{digits}g}, {self.hi:.{digits}g}], n={self.n}"


NAN = Interval(float("nan"), float("nan"), float("nan"), 0)


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(B, n) seed indices: all nⁿ resamples for n ≤ EXACT_MAX_N, else `n_boot` seeded draws."""
    if n <= EXACT_MAX_N:
        return np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64).reshape(-1, n)
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def paired_bootstrap(columns: Sequence[Sequence[float]], statistic: Callable[..., np.ndarray],
                     level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Bootstrap interval of `statistic(*columns)` resampling the rows (seeds) of paired columns.

    `columns` are equal-length sequences, one value per seed each (row i of every column belongs to
    seed i). `statistic` takes the columns as (B, n) arrays and returns B values (one per resample);
    it is also applied to the sample itself (B = 1) for the point estimate. Rows with a non-finite
    value in any column are dropped first. Resamples whose statistic is not finite (a ratio over a
    zero) are left out of the percentiles.
    """
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    if len({len(c) for c in cols}) > 1:
        raise ValueError(f"paired columns differ in length: {[len(c) for c in cols]}")
    keep = np.all([np.isfinite(c) for c in cols], axis=0) if cols and len(cols[0]) else np.zeros(0, bool)
    cols = [c[keep] for c in cols]
    n = len(cols[0]) if cols else 0
    if n == 0:
        return NAN
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(statistic(*[c[None, :] for c in cols])[0])
        if n == 1:
            return Interval(point, point, point, 1)
        idx = resample_indices(n, n_boot, seed)
        stats = np.asarray(statistic(*[c[idx] for c in cols]), dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return Interval(point, float("nan"), float("nan"), n)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return Interval(point, float(lo), float(hi), n)


def mean_interval(values: Sequence[float], **kw) -> Interval:
    """Mean over seeds with its bootstrap interval."""
    return paired_bootstrap([values], lambda x: x.mean(axis=1), **kw)


def diff_interval(a: Sequence[float], b: Sequence[float], **kw) -> Interval:
    """Paired difference mean(a − b) over seeds, with its interval."""
    return paired_bootstrap([a, b], lambda x, y: (x - y).mean(axis=1), **kw)


def ratio_interval(num: Sequence[float], den: Sequence[float], **kw) -> Interval:
    """Paired ratio of means mean(num) / mean(den) over seeds, with its interval."""
    return paired_bootstrap([num, den], lambda x, y: x.mean(axis=1) / y.mean(axis=1), **kw)


def ratio_defined(denominator: Sequence[float]) -> bool:
    """Whether a ratio of means over these per-seed denominators means something: n ≥ 2 and every
    seed's value positive, so that every resample's mean is (and the interval lies above zero). A
    denominator at or below zero in any seed (an IMP barrier that is absent there) leaves resamples
    dividing by nothing."""
    v = [x for x in denominator if x is not None and math.isfinite(x)]
    return len(v) >= 2 and min(v) > 0


def compare_word(diff: Interval, lower: str = "lower", higher: str = "higher",
                 same: str = "indistinguishable from") -> str:
    """The verdict a paired difference a − b supports: `lower` when its whole interval is below zero,
    `higher` when above, else `same` (also with one seed: no interval, no claim)."""
    if not diff.excludes_zero:
        return same
    return lower if diff.hi < 0 else higher


def pair_by_seed(a: dict, b: dict) -> tuple[list, list, list]:
    """Seeds present in both {seed: value} maps, sorted, with the two value columns."""
    seeds = sorted(set(a) & set(b), key=lambda s: (s is None, s))
    return seeds, [a[s] for s in seeds], [b[s] for s in seeds]
