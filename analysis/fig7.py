"""Figure 7: accuracy vs sparsity for IMP k=0, IMP with rewinding (k>0) and IMP from a synthetic subnetwork.

Series: `IMP (k=0)` (IMP on the real data, pruning.rewind_epoch 0), `IMP (k=K)` (rewind_epoch K > 0)
and every chain started from another chain's mask (param `start_round` > 0, e.g. IMP from a
distilled-pruning mask; labelled `<variant> (from ipcN rS)`, dashed), each in its variant's colour
(series of one colour told apart by marker; n seeds in the legend). Mean ± sample std over seeds of
`test_accuracy`; x = sparsity on a log axis of the remaining weights (long IMP chains reach 99%+,
which a linear axis would crush). Made only when at least one k>0 or started-from-a-mask run
exists; each of the three kinds that is absent is reported.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from prunelab.schema import TEST_ACCURACY

from .load import Sweep, group, label_kind, mean_std, missing_seeds, seed_words, sort_labels
from .output import FigureResult, save_fig, write_csv
from .palette import series_label, series_markers, variant_color

REMAINING_TICKS = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001]


def make(sweep: Sweep, out_dir: str) -> FigureResult:
    res = FigureResult("fig7", "Figure 7 — IMP from a synthetic subnetwork")
    chains = [c for c in sweep.ok if c.has(TEST_ACCURACY) and (c.is_imp or c.then_imp)]
    if not any(c.then_imp or c.rewind_epoch > 0 for c in chains):
        res.missing.append(f"fig7: no IMP-with-rewinding (k>0) or synthetic-then-IMP runs with {TEST_ACCURACY}")
        return res
    res.missing += missing_seeds([c for c in sweep.chains if c.is_imp or c.then_imp], "fig7")
    settings = group(chains, lambda c: c.setting)
    fig, axes = plt.subplots(1, len(settings), figsize=(8.5 * len(settings), 5), squeeze=False,
                             layout="constrained")
    rows = []
    for ax, ((ds, model), cs) in zip(axes[0], settings.items()):
        for want, test in (("IMP k=0", lambda c: c.is_imp and c.rewind_epoch == 0),
                           ("IMP with rewinding (k>0)", lambda c: c.is_imp and c.rewind_epoch > 0),
                           ("synthetic-then-IMP", lambda c: c.then_imp)):
            if not any(test(c) for c in cs):
                res.missing.append(f"fig7: no {want} run on {ds}/{model}")
        by_label = group(cs, lambda c: c.label)
        markers = series_markers(sort_labels(by_label))
        for label in sort_labels(by_label):
            lc = by_label[label]
            pts = []
            for r in sorted({r for c in lc for r in c.history(TEST_ACCURACY)}):
                have = [c for c in lc if r in c.history(TEST_ACCURACY)]
                m, s, n = mean_std([c.history(TEST_ACCURACY)[r] for c in have])
                sp = mean_std([c.sparsity_at(r) for c in have])[0]
                pts.append((sp, m, s, n))
                rows.append([ds, model, label, r, sp, m, s, n, " ".join(str(c.seed) for c in have)])
            ax.errorbar([1 - p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        marker=markers[label], ms=3.5, capsize=2.5, color=variant_color(label),
                        ls="--" if label_kind(label) == "then_imp" else "-",
                        label=series_label(label, [p[3] for p in pts]))
        ax.set_xscale("log")
        lo = min(1 - c.sparsity_at(r) for c in cs for r in c.history(TEST_ACCURACY))
        ticks = [t for t in REMAINING_TICKS if t >= lo * 0.5]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{100 * (1 - t):g}" for t in ticks])
        ax.set_xlim(1.05, lo * 0.8)  # inverted: sparsity grows to the right
        ax.set(xlabel="sparsity (%) — log scale of remaining weights", ylabel="test accuracy (%)",
               title=f"{ds} / {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("IMP (k=0), IMP with rewinding, and IMP from a synthetic subnetwork (mean ± std over seeds; "
                 f"{seed_words(sweep.ok)})")
    save_fig(fig, out_dir, "fig7", res)
    write_csv(out_dir, "fig7.csv", ["dataset", "model", "variant", "round", "sparsity", "test_accuracy_mean",
                                     "test_accuracy_std", "n_seeds", "seeds"], rows, res)
    return res
