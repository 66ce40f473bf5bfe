"""Figures 3/4: loss along the linear path between two trained copies, per sparsity, and barrier heights.

One row per (data set, model). One panel per variant (synthetic variants, then IMP; n seeds in its
title) with a curve per evaluated round — the seed-mean of `train_loss` from `lmc/round_XX.json` (the
paper plots training loss; `test_loss` is used where a file has no training curve, and said so) — in
the discrete colour and marker of its sparsity (one legend for the figure). The last panel: barrier
height vs sparsity in the colour of each variant, mean ± sample std over seeds of
`barrier_mid_train_loss` (solid, filled; loss at α = 0.5 minus the endpoints' mean) and
`barrier_max_train_loss` (dotted, hollow). Where a round has the curve but not the metric, the barrier
is computed from the curve the same way.
"""

from __future__ import annotations

from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from prunelab.metrics import barrier_name, barriers
from prunelab.schema import LMC_DIR, lmc_artifact

from .load import Sweep, group, label_kind, mean_std, missing_seeds, sort_labels
from .output import FigureResult, save_fig, write_csv
from .palette import (series_label, series_markers, sparsity_colors, sparsity_marker, sparsity_names,
                      variant_color)


def chain_curves(chain, res: FigureResult, flavour: Optional[str] = None) -> dict[int, dict]:
    """round -> {alphas, loss, split, mid, max} for every lmc artifact of the chain (with `flavour`, of
    the pair after alignment: `aligned` or `aligned_repair`, see `prunelab.metrics.FLAVOURS`)."""
    out = {}
    for r in sorted(chain.artifact_rounds(LMC_DIR)):
        d = chain.lmc(r)
        if d is None:
            res.missing.append(f"fig3_4: {chain.describe()}: {lmc_artifact(r)} could not be read")
            continue
        if flavour:
            if not d.get(flavour):
                res.missing.append(f"fig3_4: {chain.describe()}: {lmc_artifact(r)} has no {flavour} curve "
                                   "(evaluation.lmc_hparams.align / previous_round)")
                continue
            d = d[flavour]
        split = "train" if "train_loss" in d else "test"
        if f"{split}_loss" not in d or "alphas" not in d:
            res.missing.append(f"fig3_4: {chain.describe()}: {lmc_artifact(r)} has no loss curve")
            continue
        mid = chain.history(barrier_name("mid", split, "loss", flavour=flavour)).get(r)
        mx = chain.history(barrier_name("max", split, "loss", flavour=flavour)).get(r)
        if mid is None or mx is None:  # a round with the curve but not the metric
            b = barriers(d["alphas"], d[f"{split}_loss"])
            mid, mx = b["mid"] if mid is None else mid, b["max"] if mx is None else mx
        out[r] = {"alphas": d["alphas"], "loss": d[f"{split}_loss"], "split": split, "mid": mid, "max": mx,
                  "test_loss": d.get("test_loss")}
    # rounds with a barrier metric but no curve: still plotted in the barrier panel, reported
    for r, v in chain.history(barrier_name("mid", "train", "loss", flavour=flavour)).items():
        if r not in out:
            res.missing.append(f"fig3_4: {chain.describe()}: barrier at round {r} but no {lmc_artifact(r)}")
            out[r] = {"alphas": None, "loss": None, "split": "train", "mid": v,
                      "max": chain.history(barrier_name("max", "train", "loss", flavour=flavour)).get(r, float("nan")),
                      "test_loss": None}
    return out


def make(sweep: Sweep, out_dir: str, flavour: Optional[str] = None) -> FigureResult:
    """With `flavour` (`aligned`, `aligned_repair`), the curves of the pairs after alignment, written
    as fig3_4_<flavour>.* beside the plain ones."""
    res = FigureResult("fig3_4", "Figures 3/4 — linear mode connectivity per sparsity"
                       + (f" ({flavour.replace('_', ' + ')})" if flavour else ""))
    stem = f"fig3_4_{flavour}" if flavour else "fig3_4"
    data = {}
    for c in sweep.ok:
        if c.is_dense:
            continue
        has_lmc = c.artifact_rounds(LMC_DIR) or c.has(barrier_name("mid", "train", "loss"))
        cur = chain_curves(c, res, flavour) if has_lmc else {}
        if cur:
            data[c.run_id] = (c, cur)
    if not data:
        res.missing.append(f"fig3_4: no run has {LMC_DIR}/round_XX.json artifacts or barrier metrics")
        return res
    chains = [c for c, _ in data.values()]
    res.missing += missing_seeds([c for c in sweep.chains if not c.is_dense], "fig3_4")
    settings = group(chains, lambda c: c.setting)

    # seed-mean curves first: their sparsities, across the figure, pick the discrete colours
    panels = {}  # (setting, label) -> [(round, sparsity, alphas, loss, n, splits, first chain's split)]
    order = {}  # setting -> labels, synthetic first
    for (ds, model), cs in settings.items():
        by_label = group(cs, lambda c: c.label)
        order[(ds, model)] = [l for l in sort_labels(by_label) if label_kind(l) != "imp"] + \
                             [l for l in sort_labels(by_label) if label_kind(l) == "imp"]
        for label, lc in by_label.items():
            curves = panels.setdefault(((ds, model), label), [])
            for r in sorted({r for c in lc for r in data[c.run_id][1]}):
                cur = [data[c.run_id][1][r] for c in lc if r in data[c.run_id][1]
                       and data[c.run_id][1][r]["loss"] is not None]
                if not cur:
                    continue
                sp = mean_std([c.sparsity_at(r) for c in lc if r in data[c.run_id][1]])[0]
                alphas = np.asarray(cur[0]["alphas"], float)
                same = [d for d in cur if len(d["loss"]) == len(alphas)]
                curves.append((r, sp, alphas, np.mean([d["loss"] for d in same], axis=0), len(same),
                               {d["split"] for d in cur}, cur[0]["split"]))
    # sparsities a hair apart (seed means of logged values) share one colour
    key = lambda sp: round(sp, 4)  # noqa: E731
    shown = sorted({key(p[1]) for curves in panels.values() for p in curves})
    colors, names = sparsity_colors(shown), sparsity_names(shown)

    ncols = 1 + max(len(labels) for labels in order.values())
    fig, axes = plt.subplots(len(settings), ncols, figsize=(4.6 * ncols + 1.5, 4.0 * len(settings)),
                             squeeze=False, layout="constrained")
    curve_rows, barrier_rows = [], []
    for i, ((ds, model), cs) in enumerate(settings.items()):
        by_label = group(cs, lambda c: c.label)
        labels = order[(ds, model)]
        if not any(c.is_imp for c in cs):
            res.missing.append(f"fig3_4: no IMP LMC results on {ds}/{model}")
        if not any(c.is_synthetic for c in cs):
            res.missing.append(f"fig3_4: no synthetic LMC results on {ds}/{model}")
        ax_b = axes[i, -1]
        markers = series_markers(labels)
        for j, label in enumerate(labels):
            ax = axes[i, j]
            lc = by_label[label]
            rounds = sorted({r for c in lc for r in data[c.run_id][1]})
            splits = set()
            for r, sp, alphas, loss, n, split, split0 in panels[((ds, model), label)]:
                splits |= split
                ax.plot(alphas, loss, "-", marker=sparsity_marker(sp), ms=3.5, markevery=max(1, len(alphas) // 10),
                        color=colors[key(sp)], lw=1.4)
                for a, v in zip(alphas, loss):
                    curve_rows.append([ds, model, label, r, sp, split0, a, v, n])
            ns = [len([c for c in lc if r in data[c.run_id][1]]) for r in rounds]
            ax.set_title(f"{series_label(label, ns)}\n{ds}/{model}", fontsize=10)
            for spine in ax.spines.values():  # the variant's colour, as in the barrier panel
                spine.set(color=variant_color(label), linewidth=1.6)
            ax.set(xlabel="interpolation α", ylabel=f"{'/'.join(sorted(splits)) or 'train'} loss (seed mean)")
            ax.grid(alpha=0.3)
            # barrier vs sparsity
            pts = []
            for r in rounds:
                have = [data[c.run_id][1][r] for c in lc if r in data[c.run_id][1]]
                mid, mx = mean_std([d["mid"] for d in have]), mean_std([d["max"] for d in have])
                sp = mean_std([c.sparsity_at(r) for c in lc if r in data[c.run_id][1]])[0]
                pts.append((100 * sp, mid, mx))
                for c in lc:
                    d = data[c.run_id][1].get(r)
                    if d is not None:
                        barrier_rows.append([ds, model, label, c.seed, r, c.sparsity_at(r), d["split"],
                                             d["mid"], d["max"]])
            color, marker = variant_color(label), markers[label]
            ax_b.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                          marker=marker, ms=4, capsize=3, color=color,
                          label=series_label(label, [p[1][2] for p in pts]))
            ax_b.plot([p[0] for p in pts], [p[2][0] for p in pts], ":", marker=marker, ms=4, color=color,
                      mfc="white")
        for j in range(len(labels), ncols - 1):
            axes[i, j].axis("off")
        ax_b.axhline(0, color="k", lw=0.6)
        ax_b.set(title=f"barrier height\n{ds}/{model}", xlabel="sparsity (%)", ylabel="barrier (train loss)")
        ax_b.title.set_fontsize(10)
        ax_b.grid(alpha=0.3)
        style = [Line2D([], [], color="k", ls="-", marker="o", ms=4, label="mid (α=0.5) ± std"),
                 Line2D([], [], color="k", ls=":", marker="o", ms=4, mfc="white", label="max over α")]
        ax_b.legend(handles=ax_b.get_legend_handles_labels()[0] + style, fontsize=8, loc="upper left",
                    bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if shown:
        handles = [Line2D([], [], color=colors[s], marker=sparsity_marker(s), ms=5, lw=1.6, label=names[s])
                   for s in shown]
        fig.legend(handles=handles, title="sparsity (curves)", loc="outside lower center",
                   ncol=min(len(handles), 11), fontsize=9, title_fontsize=9)
    fig.suptitle("Loss along the linear path between two copies trained on different data orders"
                 + (f", after {flavour.replace('_', ' + ')}" if flavour else ""))
    save_fig(fig, out_dir, stem, res)
    write_csv(out_dir, f"{stem}_curves.csv", ["dataset", "model", "variant", "round", "sparsity", "split", "alpha",
                                              "loss_seed_mean", "n_seeds"], curve_rows, res)
    write_csv(out_dir, f"{stem}_barriers.csv", ["dataset", "model", "variant", "seed", "round", "sparsity", "split",
                                                "barrier_mid_loss", "barrier_max_loss"], barrier_rows, res)
    res.notes.append("Curves: training loss along θ(α) = (1−α)θ_A + αθ_B, mean over seeds, one colour and "
                     "marker per sparsity; error bars: sample std over seeds.")
    return res
