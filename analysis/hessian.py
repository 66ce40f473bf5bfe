"""The Hessian-diagonal table (paper Sec. 4.2): min/max, mean ± std, mean |h| and the top eigenvalue.

Rows come from the `hessian_*` metrics (step = round). Round 0 of any chain is the dense network,
labelled `dense` (`dense (k=K)` from a rewind point); chains of one seed share it, so it counts once
per (seed, rewind epoch). Other rounds by variant and sparsity. With several seeds each statistic is the
seed-mean (n given); the per-seed values are in hessian_runs.csv. Written as Markdown and CSV, plus a
plot per subnetwork in its variant's colour and its sparsity's marker: mean ± std (thick, filled),
mean |h| (hollow) and min..max (thin grey).
"""

from __future__ import annotations

import math
import os

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from prunelab.schema import HESSIAN_STATS, hessian_metric

from .load import Sweep, group, label_kind, mean_std
from .output import FigureResult, markdown_table, save_fig, write_csv
from .palette import sparsity_label, sparsity_marker, variant_color

STATS = HESSIAN_STATS  # also the columns of hessian.csv


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("hessian", "Hessian diagonal statistics")
    recs, dense_seen = [], set()
    for c in sweep.ok:
        if not any(c.has(hessian_metric(s)) for s in STATS):
            continue
        rounds = sorted({r for s in STATS for r in c.history(hessian_metric(s))})
        for r in rounds:
            if r == 0:
                key = (c.dataset, c.model, c.seed, c.rewind_epoch)
                if key in dense_seen:  # the same dense network, measured again by another chain
                    continue
                dense_seen.add(key)
            vals = {s: c.history(hessian_metric(s)).get(r) for s in STATS}
            for s, v in vals.items():
                if v is None:
                    res.missing.append(f"hessian: {c.describe()} has no {hessian_metric(s)} at round {r}")
            dense = "dense" if c.rewind_epoch == 0 else f"dense (k={c.rewind_epoch})"
            recs.append({"ds": c.dataset, "model": c.model, "sub": dense if r == 0 else c.label,
                         "round": r, "sparsity": c.sparsity_at(r), "seed": c.seed, **vals})
    if not recs:
        res.missing.append(f"hessian: no run logged {hessian_metric('*')} metrics")
        return res
    subs = {(x["ds"], x["model"]): set() for x in recs}
    for x in recs:
        subs[(x["ds"], x["model"])].add("dense" if x["round"] == 0 else
                                        "IMP" if label_kind(x["sub"]) == "imp" else "synthetic")
    for (ds, model), have in subs.items():
        for want in ("dense", "IMP", "synthetic"):
            if want not in have:
                res.missing.append(f"hessian: no {want} subnetwork on {ds}/{model}")
    runs_rows = [[x["ds"], x["model"], x["sub"], x["seed"], x["round"], x["sparsity"], *[x[s] for s in STATS]]
                 for x in recs]
    write_csv(out_dir, "hessian_runs.csv", ["dataset", "model", "subnetwork", "seed", "round", "sparsity",
                                            *STATS], runs_rows, res)
    agg = []
    for (ds, model, sub, r), xs in group(recs, lambda x: (x["ds"], x["model"], x["sub"], x["round"])).items():
        m = {s: mean_std([x[s] for x in xs])[0] for s in STATS}
        agg.append([ds, model, sub, r, mean_std([x["sparsity"] for x in xs])[0], len(xs), *[m[s] for s in STATS]])
    agg.sort(key=lambda a: (a[0], a[1], a[4], a[2]))
    header = ["dataset", "model", "subnetwork", "round", "sparsity", "n_seeds", *STATS]
    write_csv(out_dir, "hessian.csv", header, agg, res)
    md_rows = [[a[0], a[1], a[2], f"{100 * a[4]:.1f}%", a[5], f"{a[6]:.4g} / {a[7]:.4g}",
                f"{a[8]:.3g} ± {a[9]:.3g}", f"{a[10]:.4g}", f"{a[11]:.4g}"] for a in agg]
    md = markdown_table(["data set", "model", "subnetwork", "sparsity", "n", "min / max", "mean ± std",
                         "mean abs", "top eigenvalue"], md_rows)
    path = os.path.join(out_dir, "hessian.md")
    with open(path, "w") as f:
        f.write("# Hessian diagonal (seed means)\n\n" + md)
    res.tables.append(path)
    res.markdown.append(md)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(agg)), 4.4), layout="constrained")
    for i, a in enumerate(agg):
        color, marker = variant_color(a[2]), sparsity_marker(a[4])
        ax.plot([i, i], [a[6], a[7]], color="0.6", lw=1)
        ax.errorbar([i], [a[8]], yerr=[a[9]], fmt=marker, color=color, capsize=4, lw=2, ms=6)
        ax.plot([i - 0.18], [a[10]], marker, color=color, mfc="white", ms=6)
    ax.set_xticks(range(len(agg)), [f"{a[2]}\n{sparsity_label(a[4])}\n{a[0]}/{a[1]}" for a in agg], fontsize=7)
    sparsities = {sparsity_label(a[4]): a[4] for a in agg}
    handles = [Line2D([], [], color="k", marker="o", ls="-", lw=2, label="mean ± std (filled)"),
               Line2D([], [], color="k", marker="o", ls="", mfc="white", label="mean |h| (hollow, left)"),
               Line2D([], [], color="0.6", label="min … max")]
    handles += [Line2D([], [], color="0.3", marker=sparsity_marker(s), ls="", label=f"sparsity {name}")
                for name, s in sorted(sparsities.items(), key=lambda kv: kv[1])]
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="Hessian diagonal entry", title="Hessian diagonal per subnetwork (seed means)")
    # symlog: entries straddle zero and span orders of magnitude; linear only well inside the spread
    stds = [a[9] for a in agg if a[9] == a[9] and a[9] > 0]
    lin = 10.0 ** math.floor(math.log10(min(stds) / 10)) if stds else 1e-3  # a decade: ticks clear of 0
    ax.set_yscale("symlog", linthresh=lin, linscale=2)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    save_fig(fig, out_dir, "hessian", res)
    return res
