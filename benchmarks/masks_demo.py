"""Time the masks sweep's demo, `python sweeps/masks.py`, and summarize what it found.

Runs the demo preset in a fresh temporary storage path (or `--storage-path` / `--keep`), with a fresh
synthetic-set cache, as a first run would (or, given a storage path that the Figure 6 demo filled,
as a run after it: IMP and distilled chains are then reused); prints the wall time, the figures and
tables written, and from the tables: each source's barrier and accuracy at each sparsity and its
overlap with IMP's mask, and the overlap matrix above random (means [95 % interval], n seeds).

    .venv/bin/python benchmarks/masks_demo.py
    .venv/bin/python benchmarks/masks_demo.py --keep "$PWD/masks-demo"
    .venv/bin/python benchmarks/masks_demo.py --summarize /abs/runs/figures/masks   # tables only
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _iv(r: dict, key: str) -> str:
    if not r.get(key + "_mean"):
        return "—"
    return f"{float(r[key + '_mean']):.3g} [{float(r[key + '_lo']):.3g}, {float(r[key + '_hi']):.3g}]"


def summarize(figs: Path) -> None:
    """The barrier and overlap tables of a masks figure folder, as text."""
    barrier = figs / "masks_barrier.csv"
    if barrier.exists():
        rows = list(csv.DictReader(open(barrier, newline="")))
        print("\nbarrier (mid-point train loss) and accuracy per source; overlap = Jaccard with IMP's mask, same seed")
        for r in rows:
            print(f"  {r['model']:12s} {float(r['sparsity_target']):.0%} {r['bn_mode']:11s} {r['source']:18s} "
                  f"n={r['n_seeds']} barrier {_iv(r, 'barrier')}  accuracy {_iv(r, 'accuracy')}  "
                  f"overlap {_iv(r, 'overlap_imp')}")
    overlap = figs / "masks_overlap.csv"
    if overlap.exists():
        rows = list(csv.DictReader(open(overlap, newline="")))
        print("\nJaccard above two random masks of the same per-layer densities (same seed; diagonal: across seeds)")
        for r in rows:
            if r["source_a"] <= r["source_b"] or r["source_a"] == r["source_b"]:
                print(f"  {float(r['sparsity_target']):.0%} {r['source_a']:18s} {r['source_b']:18s} "
                      f"{r['pairs']:12s} n={r['n_pairs']} excess {_iv(r, 'excess')} (random {float(r['random_expectation']):.3f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", default=None, help="storage path to use and keep (default: a temporary one)")
    p.add_argument("--summarize", default=None, help="only print the tables of this figure folder")
    p.add_argument("extra", nargs="*", help="arguments passed on to sweeps/masks.py (after --)")
    a = p.parse_args(argv)
    if a.summarize:
        summarize(Path(a.summarize))
        return 0
    storage = Path(a.keep or tempfile.mkdtemp(prefix="prunelab-masks-demo-")).resolve()
    env = dict(os.environ, PRUNELAB_CACHE=str(storage / "cache"))
    cmd = [sys.executable, str(ROOT / "sweeps" / "masks.py"), "--storage-path", str(storage), *a.extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = storage / "sweep.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    figs = storage / "figures" / "masks"
    print(f"sweeps/masks.py exit {proc.returncode}, wall {wall:.0f} s ({wall / 60:.1f} min); log {log}")
    for f in sorted(figs.glob("masks*")):
        print(f"  {f.name}")
    summarize(figs)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
