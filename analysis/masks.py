"""Mask anatomy: where stable masks come from (the `masks` sweep, sweeps/configs/masks.yaml).

For every (data set, model) and every evaluated round (60 % and 87 % sparsity in the presets), from the
masks each chain logged (`masks/round_XX.pt`) and its LMC barrier:

- `masks_density`: per-layer density of each source's mask (mean over seeds);
- `masks_overlap`: the overlap matrix of sources — Jaccard of two sources' masks of the same seed
  (same initialization) minus what two random masks of those per-layer densities share; the diagonal
  is a source's overlap with itself across seeds (how much of its mask the seed decides);
- `masks_convergence`: Jaccard of each round's mask with the chain's last one, per source (for a chain
  whose masks are nested, as IMP's are, this is the schedule's density ratio: the figure says so);
- `masks_barrier`: the barrier against the mask's overlap with IMP's mask of the same seed and round
  (does a mask's stability follow its similarity to IMP's?).

Every number is a mean over seeds with its 95 % bootstrap interval (`analysis.stats`) and n; the
tables (`masks_*.csv`) hold them all. Masks are read with torch (what the sweep logged); nothing is
trained.
"""

from __future__ import annotations

import itertools
from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
import torch

from prunelab import anatomy
from prunelab.masks import Mask
from prunelab.metrics import PRIMARY_BN_PARAM, accuracy_name

from .fig6 import metric_keys
from .load import Chain, Sweep, group, seed_words
from .output import FigureResult, fmt, save_fig, slug, write_csv
from .stats import mean_interval

MARKERS = ("o", "s", "D", "^", "v")
COLORS = plt.get_cmap("tab10").colors


def _mask(chain: Chain, rnd: int) -> Optional[Mask]:
    path = chain.mask_file(rnd)
    if path is None:
        return None
    return Mask((k, v.bool()) for k, v in torch.load(path, weights_only=True).items())


def _nested(masks: list[Mask]) -> bool:
    """True when each mask keeps only weights the one before it kept."""
    return all(not (b[n] & ~a[n]).any() for a, b in zip(masks, masks[1:]) for n in a)


def _barrier(chain: Chain, rnd: int, bn_mode: str) -> Optional[tuple[float, float]]:
    """(barrier, accuracy) of the chain's evaluation at round `rnd` (mid-point train loss, `bn_mode`)."""
    acc = chain.history(accuracy_name()).get(rnd)
    primary = chain.params.get(PRIMARY_BN_PARAM, "interpolate")
    bar = next((h[rnd] for h in (chain.history(k) for k in metric_keys("train_loss", bn_mode, None, primary))
                if rnd in h), None)
    return None if acc is None or bar is None else (bar, acc)


def _interval_cells(values) -> list:
    iv = mean_interval(values)
    return [fmt(iv.mean), fmt(iv.lo), fmt(iv.hi), iv.n]


def make(sweep: Sweep, out_dir: str, bn_mode: str = "interpolate") -> FigureResult:
    res = FigureResult("masks", "Mask anatomy — where stable masks come from")
    chains = [c for c in sweep.ok if not c.is_dense and not c.then_imp]
    if not any(c.at_init for c in chains):
        res.missing.append("masks: no chain with masks found at initialization (pruning.method)")
        return res
    density_rows, overlap_rows, conv_rows, barrier_rows = [], [], [], []
    for (ds, model), cs in group(chains, lambda c: c.setting).items():
        by_label = group(cs, lambda c: c.label)
        labels = list(by_label)
        imp_label = next((l for l in labels if l.startswith("IMP")), None)
        if imp_label is None:
            res.missing.append(f"masks: no IMP chain on {ds}/{model} (the reference of every overlap)")
        fig, axes = plt.subplots(2, 2, figsize=(16, 11), layout="constrained")
        evaluated = sorted({r for c in cs for r in c.eval_rounds if r > 0})
        for t_i, r in enumerate(evaluated):
            target = cs[0].sparsity_at(r)
            masks: dict[str, dict[int, Mask]] = {}  # label -> seed -> mask
            for label, lc in by_label.items():
                for c in lc:
                    m = _mask(c, r)
                    if m is None:
                        res.missing.append(f"masks: {c.describe()} logged no mask at round {r}")
                        continue
                    masks.setdefault(label, {})[c.seed] = m
            present = [l for l in labels if masks.get(l)]
            if not present:
                continue
            sp = f"{100 * target:.0f}%"
            # -- per-layer density ------------------------------------------------------------
            layer_names = list(next(iter(masks[present[0]].values())))
            # label -> layer -> each seed's density, computed once per mask
            density = {label: {n: [d[n] for d in map(anatomy.layer_density, masks[label].values())]
                               for n in layer_names} for label in present}
            if t_i == len(evaluated) - 1:
                ax = axes[0, 0]
                width = 0.8 / len(present)
                for i, label in enumerate(present):
                    ax.bar(np.arange(len(layer_names)) + i * width,
                           [100 * float(np.mean(density[label][n])) for n in layer_names],
                           width, color=COLORS[i % len(COLORS)], label=f"{label} (n={len(masks[label])})")
                ax.set_xticks(np.arange(len(layer_names)) + 0.4 - width / 2,
                              [n.removesuffix(".weight") for n in layer_names], rotation=60, ha="right", fontsize=7)
                ax.set(ylabel="weights kept (%)", title=f"per-layer density at {sp} sparsity (mean over seeds)")
                ax.legend(fontsize=7, ncol=2)
            for label in present:
                for n in layer_names:
                    density_rows.append([ds, model, target, label, n] + _interval_cells(density[label][n]))
            # -- overlap matrix: same seed across sources, across seeds on the diagonal ------
            excess = np.full((len(present), len(present)), np.nan)
            for i, a in enumerate(present):
                for j, b in enumerate(present):
                    if i == j:
                        pairs = [(masks[a][s], masks[a][t]) for s, t in itertools.combinations(sorted(masks[a], key=str), 2)]
                        what = "across seeds"
                    else:
                        pairs = [(masks[a][s], masks[b][s]) for s in sorted(set(masks[a]) & set(masks[b]), key=str)]
                        what = "same seed"
                    if not pairs:
                        continue
                    ov = [anatomy.overlap(x, y) for x, y in pairs]
                    exc = mean_interval([o["excess_jaccard"] for o in ov])
                    excess[i, j] = exc.mean
                    overlap_rows.append([ds, model, target, a, b, what] + _interval_cells([o["jaccard"] for o in ov])
                                        + [fmt(exc.mean), fmt(exc.lo), fmt(exc.hi),
                                           fmt(float(np.mean([o["expected_jaccard"] for o in ov])))])
            if t_i == len(evaluated) - 1:
                ax = axes[0, 1]
                lim = max(0.05, float(np.nanmax(np.abs(excess))) if np.isfinite(excess).any() else 0.05)
                im = ax.imshow(excess, cmap="RdBu_r", vmin=-lim, vmax=lim)
                for (i, j), v in np.ndenumerate(excess):
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
                ax.set_xticks(range(len(present)), present, rotation=45, ha="right", fontsize=7)
                ax.set_yticks(range(len(present)), present, fontsize=7)
                ax.set_title(f"Jaccard above random at {sp} (off-diagonal: same seed; diagonal: across seeds)",
                             fontsize=9)
                fig.colorbar(im, ax=ax, shrink=0.8)
            # -- barrier against overlap with IMP -----------------------------------------------
            if imp_label is not None and imp_label in masks:
                ax = axes[1, 1]
                for i, label in enumerate(present):
                    xs, ys, accs = [], [], []
                    for c in by_label[label]:
                        hit = _barrier(c, r, bn_mode)
                        m, ref = masks[label].get(c.seed), masks[imp_label].get(c.seed)
                        if hit is None or m is None or ref is None:
                            continue
                        xs.append(anatomy.jaccard(m, ref))
                        ys.append(hit[0])
                        accs.append(hit[1])
                    if not xs:
                        res.missing.append(f"masks: no barrier ({bn_mode}) of {label} on {ds}/{model} at {sp}")
                        continue
                    xi, yi = mean_interval(xs), mean_interval(ys)
                    barrier_rows.append([ds, model, target, bn_mode, label] + _interval_cells(xs)
                                        + _interval_cells(ys)[:3] + _interval_cells(accs))
                    ax.errorbar([xi.mean], [yi.mean], xerr=[[xi.mean - xi.lo], [xi.hi - xi.mean]] if xi.n > 1 else None,
                                yerr=[[yi.mean - yi.lo], [yi.hi - yi.mean]] if yi.n > 1 else None,
                                marker=MARKERS[t_i % len(MARKERS)], color=COLORS[present.index(label) % len(COLORS)],
                                capsize=2.5, label=f"{label} {sp} (n={xi.n})")
            # -- convergence across rounds ---------------------------------------------------------
            if t_i == 0:
                nested_all: list[bool] = []
                ax = axes[1, 0]
                for i, label in enumerate(present):
                    curves: dict[int, list[float]] = {}
                    for c in by_label[label]:
                        logged = sorted(c.artifact_rounds("masks"))
                        series = {r: m for r in logged if r > 0 and (m := _mask(c, r)) is not None}
                        if len(series) < 2:
                            continue
                        nested_all.append(_nested([series[r] for r in sorted(series)]))
                        for r, j in anatomy.convergence(series).items():
                            curves.setdefault(r, []).append(j)
                    if not curves:
                        continue
                    pts = [(r, mean_interval(v)) for r, v in sorted(curves.items())]
                    for r, iv in pts:
                        conv_rows.append([ds, model, label, r, fmt(1 - (1 - by_label[label][0].fraction) ** r),
                                          fmt(iv.mean), fmt(iv.lo), fmt(iv.hi), iv.n])
                    ax.plot([r for r, _ in pts], [iv.mean for _, iv in pts], marker=".",
                            color=COLORS[i % len(COLORS)], label=f"{label} (n={pts[0][1].n})")
                    ax.fill_between([r for r, _ in pts], [iv.lo for _, iv in pts], [iv.hi for _, iv in pts],
                                    color=COLORS[i % len(COLORS)], alpha=0.12)
                ax.set(xlabel="round", ylabel="Jaccard with the last round's mask",
                       title="mask convergence across rounds (mean, 95% interval over seeds)")
                if nested_all and all(nested_all):
                    # each round's mask inside the previous one: Jaccard with the last is |m_last| / |m_r|
                    note = ("every chain's masks are nested (each round's inside the previous round's): their "
                            "convergence curve is the density ratio of the schedule, the same for every source")
                    res.notes.append(f"masks: {ds}/{model}: {note}")
                    ax.text(0.02, 0.98, "nested masks: the curve is the density ratio", transform=ax.transAxes,
                            va="top", fontsize=8)
                ax.legend(fontsize=7, ncol=2)
        ax = axes[1, 1]
        ax.set(xlabel="overlap with IMP's mask (Jaccard, same seed)", ylabel=f"barrier ({bn_mode} BN)",
               title="barrier against overlap with IMP at each evaluated sparsity (95% intervals)")
        if ax.has_data():
            ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
        fig.suptitle(f"Mask anatomy on {ds} / {model} ({seed_words(cs)})")
        save_fig(fig, out_dir, slug("masks", ds, model), res)
    write_csv(out_dir, "masks_density.csv", ["dataset", "model", "sparsity_target", "source", "layer",
                                             "density_mean", "density_lo", "density_hi", "n_seeds"], density_rows, res)
    write_csv(out_dir, "masks_overlap.csv", ["dataset", "model", "sparsity_target", "source_a", "source_b", "pairs",
                                             "jaccard_mean", "jaccard_lo", "jaccard_hi", "n_pairs", "excess_mean",
                                             "excess_lo", "excess_hi", "random_expectation"], overlap_rows, res)
    write_csv(out_dir, "masks_convergence.csv", ["dataset", "model", "source", "round", "sparsity",
                                                 "jaccard_with_last_mean", "jaccard_with_last_lo",
                                                 "jaccard_with_last_hi", "n_seeds"], conv_rows, res)
    write_csv(out_dir, "masks_barrier.csv", ["dataset", "model", "sparsity_target", "bn_mode", "source",
                                             "overlap_imp_mean", "overlap_imp_lo", "overlap_imp_hi", "n_seeds",
                                             "barrier_mean", "barrier_lo", "barrier_hi", "accuracy_mean",
                                             "accuracy_lo", "accuracy_hi", "n_accuracy"], barrier_rows, res)
    res.notes.append(f"barriers: mid-point train loss, BN {bn_mode}; accuracy: {accuracy_name()}; intervals: 95% "
                     "bootstrap over seeds")
    return res
