"""Figure 6: accuracy ratio vs barrier-height ratio, synthetic over IMP, at 60% and 87% sparsity — with
seeds, intervals, controls, both BN modes and a verdict.

What is compared. For each synthetic chain and each target sparsity (1 − 0.8⁴ ≈ 59%, 1 − 0.8⁹ ≈ 87%)
the evaluated round nearest the target is used (none within `TOLERANCE` → reported missing). It is
paired *by seed* with the IMP chain (variant imp, rewind epoch 0; k > 0 only when no k = 0 chain
exists, noted) of the same data set and model: chains of one seed share their initialization. The
barrier is the paper's: the value at α = 0.5 minus the mean of the endpoints, by default of the train
loss (`barrier`, e.g. `test_error`), in each BN mode (statistics interpolated, the authors' way, or
recomputed on training data after interpolation); the CSV holds both modes, a figure draws one.

Statistics (`analysis.stats`): per (data set, model, ipc, sparsity, BN mode) the accuracy ratio and
the barrier ratio are ratios of seed means, with 95% paired-bootstrap intervals over seeds; the
absolute barriers get their own intervals. A ratio is *defined* only when IMP's barrier is positive in
every seed, and so in every resample (never with one seed; a barrier at or below zero means IMP is
already linearly connected there, and a ratio over it has no meaning): undefined points are drawn in a
labelled strip beside the axis, never on it, and their rows say `ratio_defined = False`.

Controls (sweep `evaluation.controls`): for the IMP and the synthetic mask of each seed, a random mask
with the same per-layer counts (`shuffled_*`) and the same mask on a fresh initialization
(`reinit_*`). They are rows of `fig6.csv` (`source`), hollow reference markers on the figure, and
lines of the verdict.

Outputs: `fig6.png`/`.svg` (the `bn_mode` asked for) and `fig6_bn_<other>.png`/`.svg`, `fig6.csv`
(every source, both modes), `fig6_pairs.csv` (each synthetic/IMP seed pair, both modes; its per-seed
`barrier_ratio` is written where that seed's IMP barrier is positive, `imp_barrier_ok`, while a point's
ratio needs every seed's), and `verdict.md` (also in the report).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from prunelab import schema
from prunelab.metrics import (BN_MODES, CONTROLS, PRIMARY_BN_PARAM, accuracy_name, barrier_flavour, barrier_name,
                              other_bn_mode, parse_barrier)

from .load import Sweep, group, seed_words
from .output import FigureResult, markdown_table, save_fig, write_csv
from .palette import CONTROL_MARKERS, IMP, TARGETS, sparsity_marker, variant_color
from .stats import (NAN, Interval, compare_word, diff_interval, mean_interval, pair_by_seed, ratio_defined,
                    ratio_interval)

TOLERANCE = 0.05  # largest accepted |sparsity − target|
MAX_AREA, MIN_AREA, CONTROL_AREA = 420.0, 30.0, 55.0  # marker areas in pt²
SOURCES = ("imp", "synthetic", "shuffled_imp", "shuffled_synthetic", "reinit_imp", "reinit_synthetic")
BN_WORDS = {"interpolate": "BN statistics interpolated (authors')",
            "recompute": "BN statistics recomputed on training data"}

HEADER = ["dataset", "model", "ipc", "sparsity", "bn_mode", "source", "variant", "barrier", "n_seeds",
          "acc_ratio_mean", "acc_ratio_lo", "acc_ratio_hi", "barrier_ratio_mean", "barrier_ratio_lo",
          "barrier_ratio_hi", "imp_barrier_mean", "imp_barrier_lo", "imp_barrier_hi", "synthetic_barrier_mean",
          "synthetic_barrier_lo", "synthetic_barrier_hi", "ratio_defined", "source_accuracy_mean",
          "source_accuracy_lo", "source_accuracy_hi", "source_barrier_mean", "source_barrier_lo",
          "source_barrier_hi", "barrier_diff_mean", "barrier_diff_lo", "barrier_diff_hi", "compression", "seeds"]


def metric_keys(spec: str, bn_mode: str, control: Optional[str] = None, primary: str = "interpolate") -> list[str]:
    """Metric names holding barrier `spec` in `bn_mode`, in order of preference: the mode's own name,
    then, when `bn_mode` is the run's primary mode (param `eval.bn_mode`; runs that do not log it
    measured the default, interpolate), the plain name that runs from before both modes were recorded
    carry."""
    flavour, _ = barrier_flavour(spec)
    kind, split, measure = parse_barrier(spec)
    if flavour == "aligned_repair":  # one measurement: REPAIR sets the statistics, no BN mode
        return [barrier_name(kind, split, measure, None, control, flavour)]
    keys = [barrier_name(kind, split, measure, bn_mode, control, flavour)]
    if bn_mode == primary:
        keys.append(barrier_name(kind, split, measure, None, control, flavour))
    return keys


def at_target(chain, target: float, spec: str = "train_loss", bn_mode: str = "interpolate",
              control: Optional[str] = None) -> Optional[dict]:
    """The evaluated round nearest `target` sparsity with accuracy and barrier: {round, sparsity, acc, barrier}."""
    acc = chain.history(accuracy_name(control))
    primary = chain.params.get(PRIMARY_BN_PARAM, "interpolate")
    bar = next((h for h in (chain.history(k) for k in metric_keys(spec, bn_mode, control, primary)) if h), {})
    rounds = sorted(set(acc) & set(bar))
    if not rounds:
        return None
    r = min(rounds, key=lambda r: (abs(chain.sparsity_at(r) - target), r))
    sp = chain.sparsity_at(r)
    if abs(sp - target) > TOLERANCE:
        return None
    return {"round": r, "sparsity": sp, "acc": acc[r], "barrier": bar[r]}


@dataclass
class Row:
    """One (data set, model, ipc, sparsity, BN mode, source) of fig6.csv."""

    dataset: str
    model: str
    label: str  # the synthetic variant this row belongs to ("" for IMP and its controls)
    ipc: Optional[int]
    target: str
    bn_mode: str
    source: str
    seeds: list
    acc_ratio: Interval = NAN
    barrier_ratio: Interval = NAN
    imp_barrier: Interval = NAN
    synthetic_barrier: Interval = NAN
    source_acc: Interval = NAN
    source_barrier: Interval = NAN
    barrier_diff: Interval = NAN  # source − IMP, paired
    compression: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def defined(self) -> bool:
        """The barrier ratio means something (`stats.ratio_defined`): at least two seeds and IMP's
        barrier positive in each (a barrier at or below zero — IMP already linearly connected there —
        leaves nothing to compare with), so its interval lies above zero."""
        return ratio_defined(self.extra.get("imp_barriers", []))

    @property
    def control(self) -> Optional[str]:
        """The control this row measures (`shuffled`, `reinit`), or None for a mask itself."""
        return self.source.split("_")[0] if self.source.split("_")[0] in CONTROLS else None


def _comparison(ds, model, label, ipc, target, mode, source, src: dict, imp: dict, syn: Optional[dict],
                comp: float) -> Optional[Row]:
    """A row from {seed: at_target dict} maps: the source's, IMP's, and (for synthetic rows) the synthetic's."""
    seeds, s_vals, i_vals = pair_by_seed(src, imp)
    if not seeds:
        return None
    sa, sb = [v["acc"] for v in s_vals], [v["barrier"] for v in s_vals]
    ia, ib = [v["acc"] for v in i_vals], [v["barrier"] for v in i_vals]
    row = Row(ds, model, label, ipc, target, mode, source, seeds, compression=comp)
    row.acc_ratio, row.barrier_ratio = ratio_interval(sa, ia), ratio_interval(sb, ib)
    row.imp_barrier, row.source_acc, row.source_barrier = mean_interval(ib), mean_interval(sa), mean_interval(sb)
    row.barrier_diff = diff_interval(sb, ib)
    row.extra["barriers"] = dict(zip(seeds, sb))  # for paired differences between two sources
    row.extra["imp_barriers"] = ib
    if syn is not None:
        row.synthetic_barrier = mean_interval([syn[s]["barrier"] for s in seeds if s in syn])
    return row


def collect(sweep: Sweep, spec: str, res: FigureResult) -> tuple[list[Row], list[list]]:
    """Every fig6.csv row (all sources, both BN modes) and the per-seed synthetic/IMP pairs."""
    usable = [c for c in sweep.ok if c.has(schema.TEST_ACCURACY)]
    syn_all = [c for c in usable if c.is_synthetic]
    imp_all = [c for c in usable if c.is_imp]
    imp = {}
    for setting, cs in group(imp_all, lambda c: c.setting).items():
        k0 = [c for c in cs if c.rewind_epoch == 0]
        if not k0:
            res.notes.append(f"fig6: no IMP k=0 run on {'/'.join(setting)}; using rewind k>0 runs as reference")
        imp[setting] = k0 or cs
    for c in sweep.failed:
        if c.is_synthetic or c.is_imp:
            res.missing.append(f"fig6: {c.describe()} failed: {c.tags.get(schema.FAILURE_TAG, 'no reason given')}")

    rows: list[Row] = []
    pairs: list[list] = []
    syn_groups = group(syn_all, lambda c: (c.dataset, c.model, c.label))
    for (ds, model), refs in imp.items():
        labels = [(lab, cs) for (d, m, lab), cs in syn_groups.items() if (d, m) == (ds, model)]
        for tname, target in TARGETS.items():
            for mode in BN_MODES:
                ref = {c.seed: at_target(c, target, spec, mode) for c in refs}
                if mode == BN_MODES[0] and tname == next(iter(TARGETS)):
                    for cs in (refs, *(cs for _, cs in labels)):
                        seeds = [c.seed for c in cs]
                        for s in sorted({s for s in seeds if seeds.count(s) > 1}, key=str):
                            res.missing.append(f"fig6: several {cs[0].label} runs with seed {s} on {ds}/{model} "
                                               f"(runs that differ in another setting): one is used, pairing by "
                                               f"seed cannot tell them apart")
                if mode == BN_MODES[0]:
                    for s, v in ref.items():
                        if v is None:
                            res.missing.append(f"fig6: IMP seed {s} on {ds}/{model} has no evaluated round near "
                                               f"{tname} with test_accuracy and the {spec} barrier")
                ref = {s: v for s, v in ref.items() if v is not None}
                if not ref:
                    continue
                row = _comparison(ds, model, "", None, tname, mode, "imp", ref, ref, None, float("nan"))
                row.extra["reference"] = refs[0].label
                rows.append(row)
                for ctl in CONTROLS:
                    cv = {c.seed: at_target(c, target, spec, mode, ctl) for c in refs}
                    cv = {s: v for s, v in cv.items() if v is not None}
                    r = _comparison(ds, model, "", None, tname, mode, f"{ctl}_imp", cv, ref, None, float("nan"))
                    if r:
                        rows.append(r)
                for label, cs in labels:
                    sv = {c.seed: at_target(c, target, spec, mode) for c in cs}
                    if mode == BN_MODES[0]:
                        for c in cs:
                            if sv[c.seed] is None:
                                res.missing.append(f"fig6: {c.describe()} has no evaluated round near {tname} "
                                                   f"sparsity (with test_accuracy and the {spec} barrier)")
                            elif c.seed not in ref:
                                res.missing.append(f"fig6: {c.describe()} at {tname}: no IMP run with seed "
                                                   f"{c.seed} to pair with; left out")
                    sv = {s: v for s, v in sv.items() if v is not None}
                    rpc, ipc = cs[0].real_per_class, cs[0].ipc
                    comp = rpc / ipc if rpc and ipc else float("nan")
                    r = _comparison(ds, model, label, ipc, tname, mode, "synthetic", sv, ref, sv, comp)
                    if r is None:
                        continue
                    rows.append(r)
                    for s in r.seeds:
                        a, b = sv[s], ref[s]
                        ok = b["barrier"] > 0  # a per-seed ratio over no barrier means nothing
                        pairs.append([ds, model, label, tname, mode, s, f"IMP seed {s}", a["round"], a["sparsity"],
                                      a["acc"], a["barrier"], b["round"], b["sparsity"], b["acc"],
                                      b["barrier"], a["acc"] / b["acc"] if b["acc"] else float("nan"),
                                      a["barrier"] / b["barrier"] if ok else float("nan"), ok])
                    for ctl in CONTROLS:
                        cv = {c.seed: at_target(c, target, spec, mode, ctl) for c in cs}
                        cv = {s: v for s, v in cv.items() if v is not None}
                        rc = _comparison(ds, model, label, ipc, tname, mode, f"{ctl}_synthetic", cv, ref, sv, comp)
                        if rc:
                            rows.append(rc)
    for (d, m, lab), cs in syn_groups.items():
        if (d, m) not in imp:
            res.missing.append(f"fig6: no IMP reference on {d}/{m} for {lab}")
    return rows, pairs


def _csv_row(r: Row, spec: str) -> list:
    iv = lambda i: [i.mean, i.lo, i.hi]  # noqa: E731
    return ([r.dataset, r.model, r.ipc if r.ipc is not None else "", TARGETS[r.target], r.bn_mode, r.source,
             r.label, spec, len(r.seeds)] + iv(r.acc_ratio)
            + (iv(r.barrier_ratio) if r.defined else [float("nan")] * 3) + iv(r.imp_barrier)
            + iv(r.synthetic_barrier) + [r.defined] + iv(r.source_acc) + iv(r.source_barrier) + iv(r.barrier_diff)
            + [r.compression, " ".join(map(str, r.seeds))])


# ------------------------------------------------------------------------------------------------
# the verdict


def verdict_lines(rows: list[Row], spec: str) -> list[list]:
    """[setting, sparsity, BN mode, comparison, Δ barrier (a − b) with interval, n, verdict] per comparison:
    synthetic vs IMP, and each mask vs its controls."""
    by = {(r.dataset, r.model, r.label, r.target, r.bn_mode, r.source): r for r in rows}
    out = []
    for r in rows:
        if r.source not in ("synthetic", "imp"):
            continue
        name = "synthetic" if r.source == "synthetic" else "IMP"
        setting = f"{r.dataset}/{r.model} " + (r.label if r.source == "synthetic" else r.extra["reference"])
        comps = [("IMP", r.barrier_diff)] if r.source == "synthetic" else []
        for ctl in CONTROLS:
            c = by.get((r.dataset, r.model, r.label, r.target, r.bn_mode, f"{ctl}_{r.source}"))
            if c is not None:
                comps.append((f"{ctl} {name}", _diff_from(r, c)))
        for other, d in comps:
            word = compare_word(d, "lower than", "higher than", "indistinguishable from")
            out.append([setting, r.target, r.bn_mode, f"{name} vs {other}", d.fmt(3), d.n,
                        f"{name} barrier {word} {other}"])
    return out


def _diff_from(a: Row, b: Row) -> Interval:
    """Paired difference of two rows' source barriers (a − b) over their common seeds."""
    _, x, y = pair_by_seed(a.extra["barriers"], b.extra["barriers"])
    return diff_interval(x, y)


def write_verdict(out_dir: str, rows: list[Row], spec: str, res: FigureResult) -> str:
    """verdict.md: one line per comparison (`verdict_lines`), also shown in the report."""
    lines = verdict_lines(rows, spec)
    header = ["setting", "sparsity", "BN mode", "comparison", f"Δ {spec} barrier (a − b), mean [95% CI], n",
              "n", "verdict"]
    kind, split, measure = parse_barrier(spec)
    text = [f"# Figure 6 verdict — {measure} barrier on the {split} set at α = 0.5 ({kind})", "",
            "Each line compares two barriers seed by seed (paired): the mean difference a − b, its 95% "
            "paired-bootstrap interval over seeds and n. 'lower' / 'higher' only when the whole interval is "
            "below / above zero; otherwise 'indistinguishable' (always so with one seed).", "",
            markdown_table(header, lines) if lines else "No comparison could be made (see the missing list)."]
    path = os.path.join(out_dir, "verdict.md")
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")
    res.tables.append(path)
    if lines:
        res.markdown.append(markdown_table(header, lines))
    return path


# ------------------------------------------------------------------------------------------------
# the figure


def _recipe(sweep: Sweep, ds: str, model: str) -> str:
    """The training recipe of a setting, as logged (for the panel title)."""
    cs = [c for c in sweep.ok if c.setting == (ds, model)]
    imp = next((c for c in cs if c.is_imp), None)
    syn = next((c for c in cs if c.is_synthetic), None)
    if imp is None:
        return ""
    p = imp.params
    width = p.get(schema.MODEL_WIDTH_PARAM, "None")
    parts = [f"width {width}" if width not in ("None", "") else "default width",
             f"SGD lr {p.get(schema.TRAINING_LR_PARAM, '?')}, {p.get(schema.TRAINING_EPOCHS_PARAM, '?')} ep real",
             f"pruning lr {p.get(schema.PRUNING_LR_PARAM, '?')}, {p.get(schema.PRUNING_EPOCHS_PARAM, '?')} ep IMP"]
    if syn is not None:
        parts[-1] += f" / {syn.params.get(schema.PRUNING_EPOCHS_PARAM, '?')} ep synthetic"
    return "; ".join(parts)


def _area(r: Row, cmax: float) -> float:
    if not math.isfinite(r.compression) or cmax <= 0:
        return MIN_AREA * 2
    return max(MIN_AREA, MAX_AREA * r.compression / cmax)


def _color(r: Row) -> str:
    return IMP if r.source.endswith("imp") else variant_color(r.label)


def _draw_point(ax, x, y, r: Row, area: float, xerr=None, yerr=None) -> None:
    """A mask's point (filled, with its intervals) or a control's reference marker (hollow, with the
    control's glyph inside; its intervals are in fig6.csv and the verdict, not drawn: they would bury
    the masks' own)."""
    ctl = r.control
    color = _color(r)
    marker = sparsity_marker(r.target)
    if ctl is None and (xerr is not None or yerr is not None):
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=1.1, alpha=0.55,
                    capsize=2, zorder=2)
    if ctl is None:
        ax.scatter([x], [y], s=area, marker=marker, color=color, edgecolors="k", linewidths=0.6, zorder=4)
    else:
        ax.scatter([x], [y], s=CONTROL_AREA, marker=marker, facecolors="white", edgecolors=color,
                   linewidths=1.4, zorder=3)
        ax.scatter([x], [y], s=CONTROL_AREA * 0.35, marker=CONTROL_MARKERS[ctl], color=color, zorder=3.5)


def _err(i: Interval):
    if i.n < 2 or not (math.isfinite(i.lo) and math.isfinite(i.hi)):
        return None
    return [[max(i.mean - i.lo, 0.0)], [max(i.hi - i.mean, 0.0)]]


def draw(sweep: Sweep, rows: list[Row], mode: str, spec: str, out_dir: str, stem: str, res: FigureResult) -> None:
    """One figure for one BN mode: per (data set, model) a ratio panel, its undefined strip, and the
    absolute barriers."""
    rows = [r for r in rows if r.bn_mode == mode and r.source != "imp"]
    settings = sorted({(r.dataset, r.model) for r in rows})
    if not settings:
        return
    kind, split, measure = parse_barrier(spec)
    cmax = max([r.compression for r in rows if math.isfinite(r.compression)] or [1.0])
    fig = plt.figure(figsize=(15, 5.6 * len(settings) + 1.2))
    gs = fig.add_gridspec(len(settings), 3, width_ratios=[4.2, 0.8, 3.4], wspace=0.25, hspace=0.45)
    ns = sorted({len(r.seeds) for r in rows})
    for i, (ds, model) in enumerate(settings):
        here = [r for r in rows if (r.dataset, r.model) == (ds, model)]
        ax, strip, absx = fig.add_subplot(gs[i, 0]), fig.add_subplot(gs[i, 1]), fig.add_subplot(gs[i, 2])
        strip.sharey(ax)
        undefined = [r for r in here if not r.defined]
        slots = {}
        for r in here:
            y = r.acc_ratio.mean
            if r.defined:
                _draw_point(ax, r.barrier_ratio.mean, y, r, _area(r, cmax), _err(r.barrier_ratio), _err(r.acc_ratio))
                if r.control is None:
                    rad = math.sqrt(_area(r, cmax)) / 2  # marker radius in points: the label clears it
                    ax.annotate(f"n={len(r.seeds)}", (r.barrier_ratio.mean, y), textcoords="offset points",
                                xytext=(rad + 2, rad * 0.5), fontsize=7, color="0.3")
            else:
                slot = slots.setdefault((r.label, r.source), len(slots))
                _draw_point(strip, slot, y, r, _area(r, cmax), None, _err(r.acc_ratio))
                strip.annotate(f"n={len(r.seeds)}", (slot, y), textcoords="offset points", xytext=(6, 4),
                               fontsize=6, color="0.3")
            _draw_point(absx, r.imp_barrier.mean, r.source_barrier.mean, r,
                        _area(r, cmax) if r.control is None else CONTROL_AREA, _err(r.imp_barrier),
                        _err(r.source_barrier))
        for label in sorted({r.label for r in here if r.source == "synthetic"}):
            pts = sorted([r for r in here if r.source == "synthetic" and r.label == label and r.defined],
                         key=lambda r: TARGETS[r.target])
            if len(pts) == 2:
                ax.plot([p.barrier_ratio.mean for p in pts], [p.acc_ratio.mean for p in pts], ":",
                        color=variant_color(label), lw=1.2, zorder=1)
        ax.scatter([1], [1], marker="*", s=320, color=IMP, edgecolors="k", zorder=5)
        ax.axhline(1, color="0.6", lw=0.6, ls="--")
        ax.axvline(1, color="0.6", lw=0.6, ls="--")
        ax.set(xlabel=f"barrier ratio (synthetic / IMP, {split} {measure})", ylabel="test accuracy ratio (synthetic / IMP)")
        recipe = _recipe(sweep, ds, model)
        ax.set_title(f"{ds} / {model}: ratios" + (f"\n{recipe}" if recipe else ""), fontsize=9)
        ax.grid(alpha=0.3)
        strip.set_xlim(-0.6, max(len(slots), 1) - 0.4)
        strip.set_xticks([])
        strip.set_facecolor("#f2f2f2")
        strip.set_title("ratio undefined:\nIMP barrier not\n> 0 in every seed", fontsize=8)
        strip.tick_params(labelleft=False)
        if not undefined:
            strip.text(0.5, 0.5, "none", transform=strip.transAxes, ha="center", va="center", color="0.5")
        lim = [min(r.imp_barrier.mean for r in here), max(r.imp_barrier.mean for r in here)]
        lim += [r.source_barrier.mean for r in here]
        lo, hi = min(lim + [0.0]), max(lim + [0.0])
        pad = 0.08 * (hi - lo or 1.0)
        absx.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, ls="--", zorder=0)
        absx.axhline(0, color="0.8", lw=0.6)
        absx.axvline(0, color="0.8", lw=0.6)
        absx.set(xlabel=f"IMP barrier ({split} {measure})", ylabel=f"barrier of the mask or control ({split} {measure})")
        absx.set_title(f"{ds} / {model}: absolute barriers (y = x dashed)", fontsize=10)
        absx.grid(alpha=0.3)
    labels = sorted({r.label for r in rows if r.source == "synthetic"})
    handles = [Line2D([], [], marker="*", color=IMP, markeredgecolor="k", ls="", ms=13, label="IMP (reference, 1, 1)")]
    handles += [Line2D([], [], marker="o", color=variant_color(l), markeredgecolor="k", ls="", ms=8, label=l)
                for l in labels]
    handles += [Line2D([], [], marker=sparsity_marker(t), color="0.4", ls="", ms=8, label=f"{t} sparsity")
                for t in TARGETS]
    sources = {r.source for r in rows}
    for ctl in CONTROLS:
        if any(s.startswith(ctl) for s in sources):
            what = "random mask, same per-layer counts" if ctl == "shuffled" else "same mask, fresh init"
            handles.append(Line2D([], [], marker=CONTROL_MARKERS[ctl], color="0.3", markerfacecolor="0.3",
                                  ls="", ms=5, label=f"hollow + {CONTROL_MARKERS[ctl]}: {ctl} control ({what})"))
    handles.append(Line2D([], [], ls=":", color="0.4", label="60% → 87%"))
    # the size key: one marker per compression drawn (area ∝ real training images per class / ipc)
    for comp in sorted({r.compression for r in rows if r.source == "synthetic" and math.isfinite(r.compression)},
                       reverse=True):
        area = max(MIN_AREA, MAX_AREA * comp / cmax)
        handles.append(Line2D([], [], marker="o", color="0.75", markeredgecolor="0.3", ls="",
                              ms=math.sqrt(area), label=f"compression {comp:.3g}× (area ∝)"))
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, frameon=False, labelspacing=1.3,
               bbox_to_anchor=(0.5, 0.0))
    n_txt = f"n = {ns[0]} seeds per point" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]} seeds per point"
    fig.suptitle(f"Figure 6 — synthetic vs IMP subnetworks; barrier: {split} {measure} at α = 0.5 minus the mean "
                 f"of the endpoints; {BN_WORDS[mode]}\nmeans with 95% paired-bootstrap intervals over seeds "
                 f"({n_txt}; {seed_words(sweep.ok)}); ratios are ratios of seed means", fontsize=11, y=1.0)
    save_fig(fig, out_dir, stem, res)


def make(sweep: Sweep, out_dir: str, bn_mode: str = "interpolate", barrier: str = "train_loss") -> FigureResult:
    """Figure 6 of `sweep` into `out_dir`: `fig6.png` in `bn_mode`, the other mode beside it, the CSVs
    and the verdict, all for the `barrier` named `[mid_|max_]<train|test>_<loss|error>`."""
    res = FigureResult("fig6", "Figure 6 — accuracy ratio vs barrier ratio, with intervals, controls and a verdict")
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode: unknown {bn_mode!r}; use one of {', '.join(BN_MODES)}")
    parse_barrier(barrier)
    rows, pairs = collect(sweep, barrier, res)
    if not any(r.source == "synthetic" for r in rows):
        res.missing.append("fig6: needs synthetic and IMP runs with test_accuracy and barriers near 60% or 87%; "
                           f"found {sum(c.is_synthetic for c in sweep.ok)} synthetic and "
                           f"{sum(c.is_imp for c in sweep.ok)} IMP")
        return res
    other = other_bn_mode(bn_mode)
    for mode, stem in ((bn_mode, "fig6"), (other, f"fig6_bn_{other}")):
        if any(r.bn_mode == mode and r.source == "synthetic" for r in rows):
            draw(sweep, rows, mode, barrier, out_dir, stem, res)
        else:
            (res.missing if mode == bn_mode else res.notes).append(
                f"fig6: no {barrier} barriers with {BN_WORDS[mode]} in these runs (recorded since both BN modes "
                f"are measured on every pair); {stem}.png not drawn")
    order = {s: i for i, s in enumerate(SOURCES)}
    rows.sort(key=lambda r: (r.dataset, r.model, r.ipc if r.ipc is not None else -1, TARGETS[r.target],
                             r.bn_mode, order[r.source]))
    write_csv(out_dir, "fig6.csv", HEADER, [_csv_row(r, barrier) for r in rows], res)
    write_csv(out_dir, "fig6_pairs.csv", ["dataset", "model", "variant", "target", "bn_mode", "seed", "paired_with",
                                          "syn_round", "syn_sparsity", "syn_test_accuracy", "syn_barrier",
                                          "imp_round", "imp_sparsity", "imp_test_accuracy", "imp_barrier",
                                          "acc_ratio", "barrier_ratio", "imp_barrier_ok"], pairs, res)
    write_verdict(out_dir, rows, barrier, res)
    for r in rows:
        if r.source == "synthetic" and not r.defined and r.bn_mode == bn_mode:
            res.notes.append(f"fig6: {r.dataset}/{r.model} {r.label} at {r.target} ({r.bn_mode}): IMP barrier "
                             f"{r.imp_barrier.fmt(3)}, not positive in every seed: barrier ratio undefined "
                             f"(drawn in the strip)")
    res.notes.append(f"Ratios are ratios of seed means with 95% paired-bootstrap intervals (seeds resampled with "
                     f"their pairs); a barrier ratio is drawn on the axis only when IMP's barrier is positive "
                     f"in every seed. fig6.png: {BN_WORDS[bn_mode]}; fig6_bn_{other}.png: {BN_WORDS[other]}.")
    return res

