"""The instability analysis (Frankle et al. 2020) of each subnetwork: its barrier against the spawn point.

For chains evaluated with `lmc_hparams.spawn_epochs`: the copies share k epochs of training before
they are spawned with different data orders (k = 0: the pair of Figures 3/4 and 6). One row of panels
per (data set, model), one panel per evaluated round; per variant the mid-point train-loss barrier
(the primary BN mode's, as the plain names hold it) against k, mean with its 95 % bootstrap interval
over seeds. A subnetwork whose barrier falls to ~0 after a few epochs becomes stable early, the
behaviour that tells matching subnetworks apart. `instability.csv` holds every point with n.
"""

from __future__ import annotations

import re

import matplotlib.pyplot as plt

from prunelab.metrics import barrier_name, spawn_name

from .load import Sweep, group
from .output import FigureResult, fmt, save_fig, slug, write_csv
from .palette import sparsity_label, variant_color
from .stats import mean_interval

BARRIER = barrier_name("mid", "train", "loss")
SPAWN_RE = re.compile(r"^spawn(\d+)_" + re.escape(BARRIER) + "$")


def _spawn_points(chain) -> list[int]:
    return sorted({int(m.group(1)) for k in chain.last if (m := SPAWN_RE.match(k))})


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("instability", "Instability analysis — barrier against the spawn point")
    chains = [c for c in sweep.ok if _spawn_points(c)]
    if not chains:
        res.missing.append(f"instability: no run logged {spawn_name(1, BARRIER)}-style metrics "
                           "(evaluation.lmc_hparams.spawn_epochs)")
        return res
    rows = []
    for (ds, model), cs in group(chains, lambda c: c.setting).items():
        rounds = sorted({r for c in cs for r in c.history(spawn_name(_spawn_points(c)[0], BARRIER))})
        fig, axes = plt.subplots(1, len(rounds), figsize=(5.2 * len(rounds), 4), squeeze=False, layout="constrained")
        for ax, r in zip(axes[0], rounds):
            for label, lc in group(cs, lambda c: c.label).items():
                ks = sorted({0, *[k for c in lc for k in _spawn_points(c)]})
                pts = []
                for k in ks:
                    name = BARRIER if k == 0 else spawn_name(k, BARRIER)
                    iv = mean_interval([v for c in lc if (v := c.history(name).get(r)) is not None])
                    if iv.n:
                        pts.append((k, iv))
                        rows.append([ds, model, label, r, fmt(lc[0].sparsity_at(r)), k, fmt(iv.mean), fmt(iv.lo),
                                     fmt(iv.hi), iv.n])
                if not pts:
                    continue
                color = variant_color(label)
                ax.plot([k for k, _ in pts], [iv.mean for _, iv in pts], marker="o", color=color,
                        label=f"{label} (n={max(iv.n for _, iv in pts)})")
                ax.fill_between([k for k, _ in pts], [iv.lo for _, iv in pts], [iv.hi for _, iv in pts],
                                color=color, alpha=0.15)
            ax.axhline(0, color="k", lw=0.5)
            ax.set(xlabel="spawn epoch k (shared training before the copies part)", ylabel="train-loss barrier (α = 0.5)",
                   title=f"{sparsity_label(cs[0].sparsity_at(r))} (round {r})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Instability analysis — {ds} / {model} (mean, 95% interval over seeds)")
        save_fig(fig, out_dir, slug("instability", ds, model), res)
    write_csv(out_dir, "instability.csv", ["dataset", "model", "variant", "round", "sparsity", "spawn_epoch",
                                           "barrier_mean", "barrier_lo", "barrier_hi", "n_seeds"], rows, res)
    return res
