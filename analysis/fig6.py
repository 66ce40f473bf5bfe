"""Figure 6: accuracy ratio vs barrier-height ratio, synthetic over IMP, at 60% and 87% sparsity.

For each synthetic chain and each target sparsity (1 − 0.8⁴ ≈ 59%, 1 − 0.8⁹ ≈ 87%) the evaluated round
nearest the target is used (both `test_accuracy` and `barrier_mid_train_loss` logged; none within
`TOLERANCE` → reported missing). It is paired with the IMP chain (variant imp, rewind epoch 0; k > 0
only when no k = 0 chain exists, noted) of the same data set, model and seed; without one, with the
seed-mean of that setting's IMP chains (noted). Per pair: acc ratio = acc_syn / acc_imp, barrier ratio
= barrier_syn / barrier_imp. A point is the mean over its seed pairs, one per (data set, model,
variant+ipc, target), the two targets joined by a dotted line; marker area ∝ compression ratio (real
training images per class / ipc): `MAX_AREA` pt² at the largest, never below `MIN_AREA` (noted);
IMP itself is the star at (1, 1).

Non-positive IMP barriers. A ratio over an IMP barrier ≤ `BARRIER_EPS` (train-loss units; zero or
negative, as the paper sees on ImageNet-10) has no meaning, so such pairs never enter a barrier-ratio
mean: the point's barrier ratio averages the remaining pairs (n_valid in the CSV). If no pair is left,
the point is drawn with an ✕ in a hatched band right of the data, labelled "IMP barrier ≤ ε", at a
position that carries no value; its accuracy ratio is still real. Every such case is listed in the
notes and in fig6_pairs.csv (column imp_barrier_ok).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from .load import Sweep, group, mean_std
from .output import FigureResult, save_fig, write_csv

TARGETS = {"60%": 1 - 0.8 ** 4, "87%": 1 - 0.8 ** 9}
TOLERANCE = 0.05  # largest accepted |sparsity − target|
BARRIER_EPS = 1e-3  # IMP barriers at or below this make the ratio meaningless
MARKERS = {"60%": "o", "87%": "s"}
MAX_AREA, MIN_AREA, DEFAULT_AREA = 500.0, 8.0, 60.0  # marker areas in pt²


def at_target(chain, target: float) -> dict | None:
    """The evaluated round nearest `target` sparsity with accuracy and barrier: {round, sparsity, acc, barrier}."""
    acc, bar = chain.history("test_accuracy"), chain.history("barrier_mid_train_loss")
    rounds = sorted(set(acc) & set(bar))
    if not rounds:
        return None
    r = min(rounds, key=lambda r: (abs(chain.sparsity_at(r) - target), r))
    sp = chain.sparsity_at(r)
    if abs(sp - target) > TOLERANCE:
        return None
    return {"round": r, "sparsity": sp, "acc": acc[r], "barrier": bar[r]}


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("fig6", "Figure 6 — accuracy ratio vs barrier ratio")
    usable = [c for c in sweep.ok if c.has("test_accuracy") and c.has("barrier_mid_train_loss")]
    syn = [c for c in usable if c.is_synthetic]
    imp_all = [c for c in usable if c.is_imp]
    if not syn or not imp_all:
        res.missing.append("fig6: needs synthetic and IMP runs with test_accuracy and barrier_mid_train_loss; "
                           f"found {len(syn)} synthetic and {len(imp_all)} IMP")
        return res
    imp = {}
    for setting, cs in group(imp_all, lambda c: c.setting).items():
        k0 = [c for c in cs if c.rewind_epoch == 0]
        if not k0:
            res.notes.append(f"fig6: no IMP k=0 run on {'/'.join(setting)}; using rewind k>0 runs as reference")
        imp[setting] = k0 or cs
    for c in sweep.failed:
        if c.is_synthetic or c.is_imp:
            res.missing.append(f"fig6: {c.describe()} failed: {c.tags.get('prunelab.failure', 'no reason given')}")

    pair_rows, point_rows, points = [], [], []
    for (ds, model, label), cs in group(syn, lambda c: (c.dataset, c.model, c.label)).items():
        refs = imp.get((ds, model))
        if not refs:
            res.missing.append(f"fig6: no IMP reference on {ds}/{model} for {label}")
            continue
        for tname, target in TARGETS.items():
            ref_at = {c.seed: at_target(c, target) for c in refs}
            for s, v in ref_at.items():
                if v is None:
                    res.missing.append(f"fig6: IMP seed {s} on {ds}/{model} has no evaluated round near {tname}")
            ref_ok = {s: v for s, v in ref_at.items() if v is not None}
            pairs = []
            for c in cs:
                a = at_target(c, target)
                if a is None:
                    res.missing.append(f"fig6: {c.describe()} has no evaluated round near {tname} sparsity "
                                       f"(with test_accuracy and barrier_mid_train_loss)")
                    continue
                if c.seed in ref_ok:
                    ref, how = ref_ok[c.seed], f"IMP seed {c.seed}"
                elif ref_ok:
                    ref = {"acc": mean_std([v["acc"] for v in ref_ok.values()])[0],
                           "barrier": mean_std([v["barrier"] for v in ref_ok.values()])[0],
                           "round": None, "sparsity": mean_std([v["sparsity"] for v in ref_ok.values()])[0]}
                    how = "IMP seed mean"
                    res.notes.append(f"fig6: {c.describe()} at {tname}: no IMP run with seed {c.seed}; paired with "
                                     f"the mean of IMP seeds {sorted(ref_ok, key=str)}")
                else:
                    continue
                ok = ref["barrier"] > BARRIER_EPS
                acc_ratio = a["acc"] / ref["acc"] if ref["acc"] else float("nan")
                bar_ratio = a["barrier"] / ref["barrier"] if ok else float("nan")
                if not ok:
                    res.notes.append(f"fig6: {c.describe()} at {tname}: IMP barrier {ref['barrier']:.4g} ≤ "
                                     f"{BARRIER_EPS:g}; barrier ratio undefined, pair left out of the ratio mean")
                pairs.append((acc_ratio, bar_ratio, ok))
                pair_rows.append([ds, model, label, tname, c.seed, how, a["round"], a["sparsity"], a["acc"],
                                  a["barrier"], ref["round"], ref["sparsity"], ref["acc"], ref["barrier"],
                                  acc_ratio, bar_ratio, ok])
            if not ref_ok:
                res.missing.append(f"fig6: no IMP result near {tname} on {ds}/{model}")
            if not pairs:
                continue
            acc_m, acc_s, n = mean_std([p[0] for p in pairs])
            bar_m, bar_s, n_valid = mean_std([p[1] for p in pairs if p[2]])
            rpc, ipc = cs[0].real_per_class, cs[0].ipc
            comp = rpc / ipc if rpc and ipc else float("nan")
            if comp != comp:
                res.notes.append(f"fig6: compression ratio unknown for {label} on {ds} (real images per class "
                                 f"or ipc missing); default marker size")
            points.append({"ds": ds, "model": model, "label": label, "target": tname, "acc": acc_m,
                           "bar": bar_m, "comp": comp, "defined": n_valid > 0})
            point_rows.append([ds, model, label, tname, target, acc_m, acc_s, bar_m, bar_s, n, n_valid,
                               rpc, ipc, comp])
    if not points:
        res.missing.append("fig6: no synthetic/IMP pair has both results near 60% or 87% sparsity")
        return res

    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    finite = [p["bar"] for p in points if p["defined"]] + [1.0]
    lo, hi = min(finite + [0.0]), max(finite)
    span = max(hi - lo, 1.0)
    undefined_x = hi + 0.25 * span  # a slot outside the data, shaded: it holds no value
    comps = [p["comp"] for p in points if p["comp"] == p["comp"]]
    cmax = max(comps) if comps else 1.0
    colors = {s: f"C{i}" for i, s in enumerate(sorted({(p["ds"], p["model"]) for p in points}))}
    for p in points:
        p["x"] = p["bar"] if p["defined"] else undefined_x
        p["size"] = MAX_AREA * p["comp"] / cmax if p["comp"] == p["comp"] else DEFAULT_AREA
        if p["size"] < MIN_AREA:
            res.notes.append(f"fig6: {p['label']} on {p['ds']}/{p['model']}: compression {p['comp']:.3g} drawn at "
                             f"the minimum marker area {MIN_AREA:g} pt² (proportional would be {p['size']:.2g})")
            p["size"] = MIN_AREA
    for row, p in zip(point_rows, points):
        row += [p["x"], p["size"], p["defined"]]
    if any(not p["defined"] for p in points):
        ax.axvspan(undefined_x - 0.1 * span, undefined_x + 0.1 * span, color="0.9", hatch="//", zorder=0)
        ax.text(undefined_x, 0.98, "IMP barrier ≤ ε:\nratio undefined", transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7)
    for (ds, model, label), ps in group(points, lambda p: (p["ds"], p["model"], p["label"])).items():
        ps = sorted(ps, key=lambda p: TARGETS[p["target"]])
        color = colors[(ds, model)]
        if len(ps) == 2:
            ax.plot([p["x"] for p in ps], [p["acc"] for p in ps], ":", color=color, lw=1.2)
        for p in ps:
            ax.scatter([p["x"]], [p["acc"]], s=p["size"], marker=MARKERS[p["target"]] if p["defined"] else "X",
                       color=color, edgecolors="k", linewidths=0.6, alpha=0.85, zorder=3)
            ax.annotate(f"{label}", (p["x"], p["acc"]), textcoords="offset points", xytext=(6, -3), fontsize=6)
    ax.scatter([1], [1], marker="*", s=300, color="gold", edgecolors="k", zorder=4)
    ax.axhline(1, color="0.5", lw=0.6, ls="--")
    ax.axvline(1, color="0.5", lw=0.6, ls="--")
    handles = [Line2D([], [], marker="*", color="gold", markeredgecolor="k", ls="", ms=14, label="IMP (1, 1)")]
    handles += [Line2D([], [], marker=MARKERS[t], color="0.4", ls="", label=f"{t} sparsity") for t in TARGETS]
    handles += [Line2D([], [], marker="X", color="0.4", ls="", label="IMP barrier ≤ ε")] \
        if any(not p["defined"] for p in points) else []
    handles += [Line2D([], [], marker="o", color=c, ls="", label=f"{ds} / {m}") for (ds, m), c in colors.items()]
    handles += [Line2D([], [], ls=":", color="0.4", label="60% → 87%")]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set(xlabel="barrier height ratio (synthetic / IMP, train loss at α=0.5)",
           ylabel="test accuracy ratio (synthetic / IMP)",
           title="Synthetic vs IMP subnetworks (seed-paired means; marker area ∝ compression)")
    ax.grid(alpha=0.3)
    save_fig(fig, out_dir, "fig6", res)
    write_csv(out_dir, "fig6_pairs.csv", ["dataset", "model", "variant", "target", "seed", "paired_with",
                                          "syn_round", "syn_sparsity", "syn_test_accuracy", "syn_barrier",
                                          "imp_round", "imp_sparsity", "imp_test_accuracy", "imp_barrier",
                                          "acc_ratio", "barrier_ratio", "imp_barrier_ok"], pair_rows, res)
    write_csv(out_dir, "fig6_points.csv", ["dataset", "model", "variant", "target", "target_sparsity",
                                           "acc_ratio_mean", "acc_ratio_std", "barrier_ratio_mean",
                                           "barrier_ratio_std", "n_pairs", "n_pairs_barrier_ok",
                                           "real_images_per_class", "ipc", "compression", "plot_x",
                                           "marker_area", "barrier_ratio_defined"], point_rows, res)
    res.notes.append(f"Ratios per seed pair, then averaged (std: sample std over pairs). IMP barriers ≤ "
                     f"{BARRIER_EPS:g} are excluded from barrier-ratio means (see docstring).")
    return res

