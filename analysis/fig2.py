"""Figure 2: test accuracy vs sparsity, IMP vs distilled pruning, and the data used to find each mask.

Left column, one panel per (data set, model): mean ± sample std (ddof=1) over seeds of `test_accuracy`
at every evaluated round, one series per variant/ipc (legend: n seeds), x = the subnetwork's
sparsity; the dense network is the dashed grey line (mean ± std band over seeds; from `dense` chains,
else round 0 of IMP k=0, else round 0 of any chain). Right column, one panel per data set (log y; the
data used depends on the data set and the pruning data, so models of one data set share it unless
their numbers differ, then each gets its own series): training points used to find the mask at round
r. Solid: cumulative images seen, Σ_{s<r} `pruning_images_seen`[s] (that metric is per round —
optimizer steps × batch size of round s's training, logged at step s), i.e. every image presentation
of the r training rounds before the mask. Dashed: distinct images, the pruning set's size
(`pruning_set_size`), which does not grow with rounds. The dense network (r = 0) needs no data and
is left off the log axis.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from prunelab.schema import EVAL_ROUNDS_PARAM, PRUNING_IMAGES_SEEN, PRUNING_SET_SIZE, TEST_ACCURACY

from .load import Sweep, group, mean_std, missing_seeds, seed_words, sort_labels
from .output import FigureResult, save_fig, write_csv
from .palette import DENSE, SERIES_MARKERS, series_label, series_markers, variant_color


def data_per_mask(chain) -> dict[int, tuple[float, float]]:
    """round r -> (cumulative images seen before mask r, distinct images); only where all those rounds
    logged. A chain started from another chain's mask at round S counts from S (its record holds
    only its own rounds)."""
    seen, size = chain.history(PRUNING_IMAGES_SEEN), chain.history(PRUNING_SET_SIZE)
    out, total = {}, 0.0
    r = start = chain.start_round
    while r in seen:
        total += seen[r]
        out[r + 1] = (total, max((size[s] for s in range(start, r + 1) if s in size), default=float("nan")))
        r += 1
    return out


def series(chains) -> list[dict]:
    """Per round: sparsity, accuracy mean/std/n over seeds, and data used (means over seeds)."""
    rounds = sorted({r for c in chains for r in c.history(TEST_ACCURACY)})
    out = []
    for r in rounds:
        have = [c for c in chains if r in c.history(TEST_ACCURACY)]
        acc = mean_std([c.history(TEST_ACCURACY)[r] for c in have])
        sp = mean_std([c.sparsity_at(r) for c in have])[0]
        used = [data_per_mask(c).get(r) for c in have]
        used = [u for u in used if u is not None]
        out.append({"round": r, "sparsity": sp, "acc_mean": acc[0], "acc_std": acc[1], "n": acc[2],
                    "seeds": sorted(c.seed for c in have if c.seed is not None),
                    "images_seen": mean_std([u[0] for u in used])[0] if used else float("nan"),
                    "distinct": mean_std([u[1] for u in used])[0] if used else float("nan")})
    return out


def dense_baseline(chains) -> tuple[dict, str]:
    """seed -> dense test accuracy, and where it comes from: `dense` chains, else round 0 of IMP k=0,
    else round 0 of any chain (seed-mean where several chains of a seed hold it)."""
    sources = (("dense chains", lambda c: c.is_dense),
               ("round 0 of IMP (k=0)", lambda c: c.is_imp and c.rewind_epoch == 0),
               ("round 0 of every chain", lambda c: True))
    for name, test in sources:
        per_seed: dict = {}
        for c in chains:
            acc = c.history(TEST_ACCURACY)
            rnd = min(acc, default=None) if c.is_dense else 0
            if test(c) and rnd in acc:
                per_seed.setdefault(c.seed, []).append(acc[rnd])
        if per_seed:
            return {s: sum(v) / len(v) for s, v in per_seed.items()}, name
    return {}, ""


def same_points(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.allclose(p, q, rtol=1e-9, equal_nan=True) for p, q in zip(a, b))


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("fig2", "Figure 2 — accuracy vs sparsity, IMP vs distilled pruning")
    chains = [c for c in sweep.ok if c.has(TEST_ACCURACY)]
    if not chains:
        res.missing.append(f"fig2: no run logged {TEST_ACCURACY}")
        return res
    res.missing += missing_seeds(sweep.chains, "fig2")
    settings = group(chains, lambda c: c.setting)
    datasets = group(settings, lambda st: st[0])  # settings are sorted: a data set's rows are adjacent
    rows = []
    fig = plt.figure(figsize=(15, 4.2 * len(settings)), layout="constrained")
    grid = fig.add_gridspec(len(settings), 2)
    data_used = {}  # data set -> label -> model -> [(sparsity %, images seen, distinct)]
    for i, ((ds, model), cs) in enumerate(settings.items()):
        ax_acc = fig.add_subplot(grid[i, 0])
        by_label = group(cs, lambda c: c.label)
        if not any(c.is_imp for c in cs):
            res.missing.append(f"fig2: no IMP run on {ds}/{model}")
        if not any(c.is_synthetic for c in cs):
            res.missing.append(f"fig2: no distilled/synthetic run on {ds}/{model}")
        for c in cs:
            for r in c.eval_rounds:
                if r not in c.history(TEST_ACCURACY):
                    res.missing.append(f"fig2: {c.describe()} has no {TEST_ACCURACY} at round {r} "
                                       f"(listed in {EVAL_ROUNDS_PARAM}; status {c.status})")
        labels = sort_labels(by_label)
        markers = series_markers(labels)
        for label in labels:
            s = series(by_label[label])
            for p in s:
                rows.append([ds, model, label, p["round"], p["sparsity"], p["acc_mean"], p["acc_std"], p["n"],
                             " ".join(map(str, p["seeds"])), p["images_seen"], p["distinct"]])
            if label == "dense":  # drawn as the baseline below
                continue
            color = variant_color(label)
            ax_acc.errorbar([100 * p["sparsity"] for p in s], [100 * p["acc_mean"] for p in s],
                            yerr=[100 * p["acc_std"] for p in s], marker=markers[label], ms=4, capsize=3,
                            color=color, label=series_label(label, [p["n"] for p in s]))
            pts = [(100 * p["sparsity"], p["images_seen"], p["distinct"]) for p in s
                   if p["round"] > 0 and p["images_seen"] == p["images_seen"]]
            if pts:
                data_used.setdefault(ds, {}).setdefault(label, {})[model] = pts
            else:
                res.missing.append(f"fig2: {label} on {ds}/{model} logged no {PRUNING_IMAGES_SEEN}")
            starts = sorted({c.start_round for c in by_label[label] if c.then_imp})
            if pts and starts:
                res.notes.append(f"fig2: {label} on {ds}/{model}: data used counted from round "
                                 f"{', '.join(map(str, starts))}, without the rounds of the chain it started from")
        dense, source = dense_baseline(cs)
        if dense:
            m, sd, n = mean_std(list(dense.values()))
            ax_acc.axhline(100 * m, color=DENSE, ls="--", lw=1.3, zorder=1, label=series_label("dense", [n]))
            if n > 1:
                ax_acc.axhspan(100 * (m - sd), 100 * (m + sd), color=DENSE, alpha=0.15, lw=0, zorder=0)
            res.notes.append(f"fig2: dense baseline on {ds}/{model} ({source}): {100 * m:.2f}%"
                             + (f" ± {100 * sd:.2f}% (std), n={n}" if n > 1 else ", n=1"))
        else:
            res.missing.append(f"fig2: no dense (round 0) {TEST_ACCURACY} on {ds}/{model}")
        ax_acc.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title=f"{ds} / {model}")
        ax_acc.grid(alpha=0.3)
        if ax_acc.get_legend_handles_labels()[0]:
            ax_acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    for ds, ds_settings in datasets.items():
        rows_of = [list(settings).index(st) for st in ds_settings]
        ax_data = fig.add_subplot(grid[min(rows_of):max(rows_of) + 1, 1])
        by_label = data_used.get(ds, {})
        labels = sort_labels(by_label)
        markers = series_markers(labels)
        for label in labels:
            per_model = by_label[label]
            first = next(iter(per_model.values()))
            shared = all(same_points(first, pts) for pts in per_model.values())
            for j, (model, pts) in enumerate(per_model.items()):
                if shared and j:
                    break
                name = label if shared or len(per_model) == 1 else f"{label} — {model}"
                marker = markers[label] if shared else SERIES_MARKERS[j % len(SERIES_MARKERS)]
                color = variant_color(label)
                xd = [p[0] for p in pts]
                ax_data.plot(xd, [p[1] for p in pts], "-", marker=marker, ms=4, color=color, label=name)
                ax_data.plot(xd, [p[2] for p in pts], "--", marker=marker, ms=3, color=color, alpha=0.7)
        ax_data.set_yscale("log")
        models = ", ".join(st[1] for st in ds_settings)
        ax_data.set(xlabel="sparsity of the mask (%)", ylabel="training points used to find the mask",
                    title=f"data used to find the mask — {ds} ({models})")
        ax_data.grid(alpha=0.3)
        ax_data.grid(alpha=0.1, which="minor")
        if not ax_data.lines:
            ax_data.text(0.5, 0.5, f"no {PRUNING_IMAGES_SEEN} logged", transform=ax_data.transAxes, ha="center",
                         color="0.4")
        else:
            style = [Line2D([], [], color="k", ls="-", label="images seen (cumulative)"),
                     Line2D([], [], color="k", ls="--", alpha=0.7, label="distinct images")]
            ax_data.legend(handles=ax_data.get_legend_handles_labels()[0] + style, fontsize=8,
                           loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(f"Distilled pruning vs IMP (mean ± std over seeds; n = seeds; {seed_words(sweep.ok)})")
    save_fig(fig, out_dir, "fig2", res)
    write_csv(out_dir, "fig2.csv", ["dataset", "model", "variant", "round", "sparsity", "test_accuracy_mean",
                                     "test_accuracy_std", "n_seeds", "seeds", "images_seen_cumulative",
                                     "distinct_images"], rows, res)
    res.notes.append("Error bars: sample std (ddof=1) over seeds; none with a single seed. Dashed grey line: "
                     "the dense network, band ± std over seeds. Right panels: cumulative images seen = sum of "
                     "per-round pruning_images_seen over the rounds before the mask; distinct images = "
                     "pruning_set_size.")
    return res
