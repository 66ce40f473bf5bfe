"""`python -m analysis <figure|all> [--experiment NAME] [--tracking-uri URI] [--out DIR] [--run-id ID]`.

Without --experiment, a single figure reads the experiment `prunelab-<figure>` and `all` draws every
figure of every sweep in the tracking store (one folder per experiment, with an index.html)."""

from __future__ import annotations

import argparse
import os
import sys

from prunelab.metrics import BN_MODES, FLAVOURS, parse_barrier
from prunelab.schema import experiment_name

from . import FIGURES, run, run_everything
from .load import AnalysisError


def _default_store():
    """The SQLite store the sweeps write by default (./runs/mlflow.db), if there is one."""
    db = os.path.abspath(os.path.join("runs", "mlflow.db"))
    return f"sqlite:///{db}" if os.path.isfile(db) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    p.add_argument("figure", choices=FIGURES + ("all",), help="which figure or table; all: every one")
    p.add_argument("--experiment", help="MLflow experiment of the sweep (default: prunelab-<figure>; "
                                        "with all: every experiment that holds a sweep)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or _default_store(),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the sweeps' runs/mlflow.db)")
    p.add_argument("--run-id", help="the sweep's parent run (default: the newest sweep of the experiment)")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.add_argument("--no-log", action="store_true", help="do not log the outputs to the parent run")
    p.add_argument("--bn-mode", choices=BN_MODES, default="interpolate",
                   help="Figure 6 and masks: the BN mode fig6.png draws (interpolate: the authors'; recompute: statistics "
                        "re-estimated on training data); the other goes to fig6_bn_<mode>.png, both to fig6.csv")
    p.add_argument("--barrier", default="train_loss",
                   help="Figure 6: which barrier, [mid_|max_]<train|test>_<loss|error> (default train_loss: the "
                        "paper's train loss at α=0.5)")
    p.add_argument("--flavour", choices=FLAVOURS, default=None,
                   help="Figures 3/4: the curves of the pairs after permutation alignment (aligned) or alignment + "
                        "REPAIR (aligned_repair) (evaluation.lmc_hparams.align), or from a round's solution to the "
                        "previous round's (previous_round); Figure 6 takes them as --barrier aligned_train_loss, ...")
    args = p.parse_args(argv)
    try:
        parse_barrier(args.barrier)
    except ValueError as e:
        print(f"error: --barrier: {e}", file=sys.stderr)
        return 2
    options = {"fig6": {"bn_mode": args.bn_mode, "barrier": args.barrier}, "masks": {"bn_mode": args.bn_mode},
               "fig3_4": {"flavour": args.flavour}}
    if not args.tracking_uri:
        print("error: --tracking-uri: no MLflow store given and no runs/mlflow.db here — fix: pass "
              "--tracking-uri sqlite:////abs/path/mlflow.db (or http://host:5000)", file=sys.stderr)
        return 2
    if args.figure == "all" and not args.experiment:
        try:
            every = run_everything(args.tracking_uri, args.out, log_to_mlflow=not args.no_log, options=options)
        except AnalysisError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name, res in every["experiments"].items():
            print(f"{name}: {len(res['figures'])} figure files, {len(res['tables'])} tables, report {res['report']}")
            for m in res["missing"]:
                print(f"  missing: {m}")
        print(f"index  {every['index']}")
        return 0 if every["experiments"] else 1
    experiment = args.experiment or experiment_name(args.figure)
    try:
        res = run(args.figure, experiment, args.tracking_uri, args.out, parent_run_id=args.run_id,
                  log_to_mlflow=not args.no_log, options=options)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key in ("figures", "tables"):
        for path in res[key]:
            print(f"{key[:-1]:6s} {path}")
    print(f"report {res['report']}")
    for m in res["missing"]:
        print(f"missing: {m}")
    for n in res["notes"]:
        print(f"note: {n}")
    made = [r for r in res["results"] if r.made]
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
