"""Figure 2: test accuracy vs sparsity, IMP vs distilled pruning, and the data used to find each mask.

Left panel: mean ± sample std (ddof=1) over seeds of `test_accuracy` at every evaluated round, one
series per variant/ipc, x = the subnetwork's sparsity. Right panel (log y): training points used to
find the mask at round r. Solid: cumulative images seen, Σ_{s<r} `pruning_images_seen`[s] (that metric
is per round — optimizer steps × batch size of round s's training, logged at step s), i.e. every image
presentation of the r training rounds before the mask. Dashed: distinct images, the pruning set's
size (`pruning_set_size`), which does not grow with rounds. The dense network (r = 0) needs no data
and is left off the log axis.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from .load import Sweep, group, mean_std, missing_seeds, sort_labels
from .output import FigureResult, save_fig, write_csv


def data_per_mask(chain) -> dict[int, tuple[float, float]]:
    """round r -> (cumulative images seen before mask r, distinct images); only where all those rounds
    logged. A chain started from another chain's mask at round S counts from S (its record holds
    only its own rounds)."""
    seen, size = chain.history("pruning_images_seen"), chain.history("pruning_set_size")
    out, total = {}, 0.0
    r = start = chain.start_round
    while r in seen:
        total += seen[r]
        out[r + 1] = (total, max((size[s] for s in range(start, r + 1) if s in size), default=float("nan")))
        r += 1
    return out


def series(chains) -> list[dict]:
    """Per round: sparsity, accuracy mean/std/n over seeds, and data used (means over seeds)."""
    rounds = sorted({r for c in chains for r in c.history("test_accuracy")})
    out = []
    for r in rounds:
        have = [c for c in chains if r in c.history("test_accuracy")]
        acc = mean_std([c.history("test_accuracy")[r] for c in have])
        sp = mean_std([c.sparsity_at(r) for c in have])[0]
        used = [data_per_mask(c).get(r) for c in have]
        used = [u for u in used if u is not None]
        out.append({"round": r, "sparsity": sp, "acc_mean": acc[0], "acc_std": acc[1], "n": acc[2],
                    "seeds": sorted(c.seed for c in have if c.seed is not None),
                    "images_seen": mean_std([u[0] for u in used])[0] if used else float("nan"),
                    "distinct": mean_std([u[1] for u in used])[0] if used else float("nan")})
    return out


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("fig2", "Figure 2 — accuracy vs sparsity, IMP vs distilled pruning")
    chains = [c for c in sweep.ok if c.has("test_accuracy")]
    if not chains:
        res.missing.append("fig2: no run logged test_accuracy")
        return res
    res.missing += missing_seeds(sweep.chains, "fig2")
    settings = group(chains, lambda c: c.setting)
    rows = []
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.2 * len(settings)), squeeze=False)
    for (ds, model), cs in settings.items():
        i = list(settings).index((ds, model))
        ax_acc, ax_data = axes[i]
        by_label = group(cs, lambda c: c.label)
        if not any(c.is_imp for c in cs):
            res.missing.append(f"fig2: no IMP run on {ds}/{model}")
        if not any(c.is_synthetic for c in cs):
            res.missing.append(f"fig2: no distilled/synthetic run on {ds}/{model}")
        for c in cs:
            for r in c.eval_rounds:
                if r not in c.history("test_accuracy"):
                    res.missing.append(f"fig2: {c.describe()} has no test_accuracy at round {r} "
                                       f"(listed in eval.rounds; status {c.status})")
        for k, label in enumerate(sort_labels(by_label)):
            s = series(by_label[label])
            color = f"C{k}"
            x = [100 * p["sparsity"] for p in s]
            ax_acc.errorbar(x, [100 * p["acc_mean"] for p in s], yerr=[100 * p["acc_std"] for p in s],
                            marker="o", ms=4, capsize=3, color=color,
                            label=f"{label} (n={max(p['n'] for p in s)})")
            pts = [p for p in s if p["round"] > 0 and p["images_seen"] == p["images_seen"]]
            if pts:
                xd = [100 * p["sparsity"] for p in pts]
                ax_data.plot(xd, [p["images_seen"] for p in pts], "o-", ms=4, color=color,
                             label=f"{label}: images seen (cumulative)")
                ax_data.plot(xd, [p["distinct"] for p in pts], "s--", ms=3, color=color, alpha=0.7,
                             label=f"{label}: distinct images")
            else:
                res.missing.append(f"fig2: {label} on {ds}/{model} logged no pruning_images_seen")
            starts = sorted({c.start_round for c in by_label[label] if c.then_imp})
            if pts and starts:
                res.notes.append(f"fig2: {label} on {ds}/{model}: data used counted from round "
                                 f"{', '.join(map(str, starts))}, without the rounds of the chain it started from")
            for p in s:
                rows.append([ds, model, label, p["round"], p["sparsity"], p["acc_mean"], p["acc_std"], p["n"],
                             " ".join(map(str, p["seeds"])), p["images_seen"], p["distinct"]])
        ax_acc.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title=f"{ds} / {model}")
        ax_acc.grid(alpha=0.3)
        ax_acc.legend(fontsize=8)
        ax_data.set_yscale("log")
        ax_data.set(xlabel="sparsity of the mask (%)", ylabel="training points used to find the mask",
                    title="data used to find the mask (solid: cumulative, dashed: distinct)")
        ax_data.grid(alpha=0.3, which="both")
        if ax_data.lines:
            ax_data.legend(fontsize=7)
    fig.suptitle("Distilled pruning vs IMP (mean ± std over seeds)")
    fig.tight_layout()
    save_fig(fig, out_dir, "fig2", res)
    write_csv(out_dir, "fig2.csv", ["dataset", "model", "variant", "round", "sparsity", "test_accuracy_mean",
                                     "test_accuracy_std", "n_seeds", "seeds", "images_seen_cumulative",
                                     "distinct_images"], rows, res)
    res.notes.append("Error bars: sample std (ddof=1) over seeds; none with a single seed. Right panel: "
                     "cumulative images seen = sum of per-round pruning_images_seen over the rounds before "
                     "the mask; distinct images = pruning_set_size.")
    return res
