"""Curvature on each subnetwork's mask: Hessian eigenvalue densities side by side, top eigenvalue and trace.

From `spectrum/round_XX.json` (evaluation.spectrum: Lanczos top eigenvalues, Hutch++ trace, stochastic
Lanczos quadrature density of the training-loss Hessian restricted to the unpruned weights of a
trained copy). One row of panels per (data set, model), one panel per evaluated sparsity (round 0 is
the dense network): each variant's density, averaged over seeds on a common grid, on a log scale
(the bulk near zero and the few outliers both show). `spectrum.csv`: per (variant, round) the top
eigenvalue, the trace and the trace per unpruned weight, means with 95 % bootstrap intervals over
seeds and n.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from prunelab.metrics import SPECTRUM_TOP, SPECTRUM_TRACE, SPECTRUM_TRACE_PER_WEIGHT

from .load import Sweep, group
from .output import FigureResult, fmt, save_fig, slug, write_csv
from .palette import sparsity_label, variant_color
from .stats import mean_interval

METRICS = (SPECTRUM_TOP, SPECTRUM_TRACE, SPECTRUM_TRACE_PER_WEIGHT)


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("spectrum", "Hessian spectra on the mask")
    chains = [c for c in sweep.ok if c.has(SPECTRUM_TRACE)]
    if not chains:
        res.missing.append(f"spectrum: no run logged {SPECTRUM_TRACE} (evaluation.spectrum)")
        return res
    rows = []
    for (ds, model), cs in group(chains, lambda c: c.setting).items():
        rounds = sorted({r for c in cs for r in c.history(SPECTRUM_TRACE)})
        fig, axes = plt.subplots(1, len(rounds), figsize=(5.5 * len(rounds), 4.2), squeeze=False,
                                 layout="constrained")
        for ax, r in zip(axes[0], rounds):
            labels = group([c for c in cs if r in c.history(SPECTRUM_TRACE)],
                           lambda c: "dense" if r == 0 else c.label)
            for label, lc in labels.items():
                if label == "dense":
                    lc = lc[:len({c.seed for c in lc})]  # chains of one seed share their dense network
                vals = {m: [c.history(m).get(r) for c in lc] for m in METRICS}
                cells = []
                for m in METRICS:
                    iv = mean_interval([v for v in vals[m] if v is not None])
                    cells += [fmt(iv.mean), fmt(iv.lo), fmt(iv.hi)]
                rows.append([ds, model, label, r, fmt(lc[0].sparsity_at(r)), len(lc), *cells])
                dens = [d["density"] for c in lc if (d := c.spectrum(r)) is not None]
                if not dens:
                    res.missing.append(f"spectrum: {label} on {ds}/{model} round {r} has no spectrum artifact")
                    continue
                lo = min(min(d["grid"]) for d in dens)
                hi = max(max(d["grid"]) for d in dens)
                grid = np.linspace(lo, hi, 600)
                mean = np.mean([np.interp(grid, d["grid"], d["density"], left=0.0, right=0.0) for d in dens], axis=0)
                ax.semilogy(grid, np.maximum(mean, 1e-12), color=variant_color(label), label=f"{label} (n={len(dens)})")
            ax.set_ylim(bottom=1e-6)
            ax.set(xlabel="eigenvalue", ylabel="density (mean over seeds)",
                   title=f"{'dense' if r == 0 else sparsity_label(cs[0].sparsity_at(r))} (round {r})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Hessian eigenvalue density on the mask's subspace — {ds} / {model}")
        save_fig(fig, out_dir, slug("spectrum", ds, model), res)
    header = ["dataset", "model", "subnetwork", "round", "sparsity", "n_seeds"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_lo", f"{m}_hi"]
    write_csv(out_dir, "spectrum.csv", header, rows, res)
    return res
