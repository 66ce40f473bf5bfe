"""How far the planner's time estimates are from the chains' measured times, after a sweep.

    python sweeps/fig6.py --storage-path "$PWD/runs"                    # any finished sweep
    python benchmarks/estimates.py fig6 --tracking-uri "sqlite:///$PWD/runs/mlflow.db" [--preset demo]

For every chain run of the figure's latest sweep run: its measured time (MLflow run start to end, as
a trial: with the other trials of the sweep sharing the machine) and the estimate `--dry-run` gives
for it from scratch (`Trial.estimated_s`), their ratio, and the geometric mean and range of the
ratios. The estimate orders chains; this says how far it can be read as a time.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab import schema  # noqa: E402
from sweeps.config import expand, load_sweep  # noqa: E402
from sweeps.tracking import client  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("figure")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--preset", default="demo")
    p.add_argument("--experiment")
    a = p.parse_args()
    c = client(a.tracking_uri)
    exp = c.get_experiment_by_name(a.experiment or schema.experiment_name(a.figure))
    trials = {t.key: t for t in expand(load_sweep(a.figure, a.preset, [], None)[0], a.figure)}
    runs = c.search_runs([exp.experiment_id], filter_string=schema.tag_filter(schema.ROLE_TAG, schema.ROLE_CHAIN),
                         max_results=1000)
    rows = []
    for run in runs:
        t = trials.get(run.data.tags.get(schema.TRIAL_KEY_TAG))
        if t is None or run.info.status != "FINISHED" or not run.info.end_time:
            continue
        measured = (run.info.end_time - run.info.start_time) / 1000
        estimate = t.estimated_s()
        rows.append((t.run_name(), measured, estimate, measured / estimate))
    if not rows:
        sys.exit("no finished chain run of this sweep's trials")
    print("| chain | measured (s) | estimate (s) | measured / estimate |")
    print("|---|---:|---:|---:|")
    for name, m, e, r in sorted(rows, key=lambda row: -row[1]):
        print(f"| {name} | {m:.0f} | {e:.0f} | {r:.2f} |")
    ratios = [r for *_, r in rows]
    gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"n = {len(ratios)} chains; measured / estimate: geometric mean {gm:.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
