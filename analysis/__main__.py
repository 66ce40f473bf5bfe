"""`python -m analysis <figure|all> --experiment NAME [--tracking-uri URI] [--out DIR] [--run-id ID]`."""

from __future__ import annotations

import argparse
import os
import sys

from . import FIGURES, run
from .load import AnalysisError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    p.add_argument("figure", choices=FIGURES + ("all",), help="which figure or table; all: every one")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep, e.g. prunelab-fig6")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--run-id", help="the sweep's parent run (default: the newest sweep of the experiment)")
    p.add_argument("--out", default="figures", help="output directory (default: ./figures)")
    p.add_argument("--no-log", action="store_true", help="do not log the outputs to the parent run")
    args = p.parse_args(argv)
    try:
        res = run(args.figure, args.experiment, args.tracking_uri, args.out, parent_run_id=args.run_id,
                  log_to_mlflow=not args.no_log)
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
