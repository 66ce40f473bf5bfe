"""Figure 5: 2D loss landscapes in the plane of several trained copies — dense vs IMP vs synthetic.

Reads `landscape/round_XX.npz` (keys in docs/results.md: `grid` (or `loss`) ny×nx losses with row i at
`ys[i]`, `xs`, `ys`, `coords` (k, 2) copies' positions). One figure per (data set, model, pruned
round r): the dense network (round 0 of a dense or IMP chain, else of any chain), IMP at r and each
synthetic variant at r, filled contours on a shared log color scale, copies marked in the colour of
the panel's variant. With several chain seeds the lowest seed is shown (noted).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm

from prunelab.schema import LANDSCAPE_DIR, landscape_artifact

from .load import Sweep, label_kind, sort_labels
from .output import FigureResult, save_fig, slug, write_csv
from .palette import variant_color


def grid_of(d: dict):
    g = d.get("grid", d.get("loss"))
    if g is None or "xs" not in d or "ys" not in d:
        return None
    return np.asarray(g, float)


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("fig5", "Figure 5 — 2D loss landscapes")
    found = {}  # (ds, model) -> label -> round -> (chain, data, rank)
    candidates = {}  # (setting, label, round) -> number of runs with that landscape
    for c in sweep.ok:
        for r in sorted(c.artifact_rounds(LANDSCAPE_DIR)):
            d = c.landscape(r)
            if d is None or grid_of(d) is None:
                res.missing.append(f"fig5: {c.describe()}: {landscape_artifact(r)} unreadable or lacks "
                                   f"grid/xs/ys")
                continue
            label = "dense" if r == 0 else c.label
            slot = found.setdefault(c.setting, {}).setdefault(label, {})
            prev = slot.get(r)
            # prefer dense/IMP chains for the dense panel, then the lowest seed
            rank = (0 if c.is_dense else 1 if c.is_imp else 2, c.seed if c.seed is not None else 1 << 30)
            if prev is None or rank < prev[2]:
                slot[r] = (c, d, rank)
            candidates[(c.setting, label, r)] = candidates.get((c.setting, label, r), 0) + 1
    if not found:
        res.missing.append(f"fig5: no run has {LANDSCAPE_DIR}/round_XX.npz artifacts")
        return res
    for ((ds, model), label, r), n in candidates.items():
        if n > 1:
            res.notes.append(f"fig5: {label} round {r} on {ds}/{model}: {n} runs, showing "
                             f"{found[(ds, model)][label][r][0].describe()}")
    rows = []
    for (ds, model), by_label in found.items():
        dense = by_label.get("dense", {}).get(0)
        if dense is None:
            res.missing.append(f"fig5: no dense (round 0) landscape on {ds}/{model}")
        labels = [l for l in sort_labels(by_label) if l != "dense"]
        if not any(label_kind(l) == "imp" for l in labels):
            res.missing.append(f"fig5: no IMP landscape on {ds}/{model}")
        if not any(label_kind(l) == "synthetic" for l in labels):
            res.missing.append(f"fig5: no synthetic landscape on {ds}/{model}")
        rounds = sorted({r for l in labels for r in by_label[l] if r > 0}) or [0]
        for r in rounds:
            panels = [("dense", dense)] + [(f"{l} r{r}", by_label[l].get(r)) for l in labels]
            variant_of = {"dense": "dense", **{f"{l} r{r}": l for l in labels}}
            for name, p in panels[1:]:
                if p is None:
                    res.missing.append(f"fig5: no {name.rsplit(' ', 1)[0]} landscape at round {r} on {ds}/{model}")
            panels = [(n, p) for n, p in panels if p is not None]
            if not panels:
                continue
            grids = [grid_of(p[1]) for _, p in panels]
            pos = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids])
            lo, hi = float(pos.min()), float(pos.max())
            levels = np.geomspace(lo, hi * (1 + 1e-9), 25) if hi > lo else None
            fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False,
                                     layout="constrained")
            for ax, (name, (c, d, _)), g in zip(axes[0], panels, grids):
                xs, ys = np.asarray(d["xs"], float), np.asarray(d["ys"], float)
                cf = ax.contourf(xs, ys, np.clip(g, lo, hi), levels=levels, norm=LogNorm(lo, hi), cmap="viridis")
                ax.contour(xs, ys, np.clip(g, lo, hi), levels=levels[::3] if levels is not None else None,
                           colors="white", linewidths=0.4, alpha=0.6)
                if "coords" in d:
                    xy = np.asarray(d["coords"], float).reshape(-1, 2)
                    ax.scatter(xy[:, 0], xy[:, 1], s=50, c=variant_color(variant_of[name]), edgecolors="white",
                               linewidths=1.2, zorder=3)
                    for k, (x, y) in enumerate(xy):
                        ax.annotate(str(k + 1), (x, y), textcoords="offset points", xytext=(4, 4),
                                    color="white", fontsize=8)
                else:
                    res.missing.append(f"fig5: {c.describe()}: landscape lacks coords (copies not marked)")
                sp = c.sparsity_at(0 if name == "dense" else r)
                ax.set(title=f"{name} ({100 * sp:.1f}% sparse)\n{ds}/{model}, seed {c.seed}",
                       xlabel="direction 1", ylabel="direction 2")
                ax.set_aspect("equal", adjustable="box")
                rows.append([ds, model, name, c.seed, 0 if name == "dense" else r, sp, float(np.nanmin(g)),
                             float(np.nanmax(g)), g.shape[0], g.shape[1],
                             " ".join(f"({x:.4g},{y:.4g})" for x, y in np.asarray(d.get("coords", np.zeros((0, 2))),
                                                                                    float).reshape(-1, 2))])
            fig.colorbar(cf, ax=axes[0].tolist(), label="train loss (log scale)", shrink=0.85, format="%.3g")
            save_fig(fig, out_dir, slug("fig5", ds, model, f"r{r:02d}"), res)
    write_csv(out_dir, "fig5.csv", ["dataset", "model", "panel", "seed", "round", "sparsity", "loss_min", "loss_max",
                                     "ny", "nx", "copies_xy"], rows, res)
    return res
