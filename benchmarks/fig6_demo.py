"""Time the README's main job, `python sweeps/fig6.py`, from an empty store, and check what it wrote.

Runs the demo preset in a fresh temporary storage path (or `--storage-path`), with a fresh
synthetic-set cache, as a new user's first run would; prints the wall time, whether fig6.png/.svg,
fig6.csv and verdict.md were written, how many fig6.csv rows have a defined ratio, and the synthetic
rows of both BN modes (means and 95% intervals) with the verdict. The target is 10 minutes on 2 CPUs.

    .venv/bin/python benchmarks/fig6_demo.py                 # the demo as shipped
    .venv/bin/python benchmarks/fig6_demo.py --keep "$PWD/fig6-demo" -- --set seeds=[0,1]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", default=None, help="storage path to use and keep (default: a temporary one)")
    p.add_argument("extra", nargs="*", help="arguments passed on to sweeps/fig6.py (after --)")
    a = p.parse_args(argv)
    storage = Path(a.keep or tempfile.mkdtemp(prefix="prunelab-fig6-demo-")).resolve()
    env = dict(os.environ, PRUNELAB_CACHE=str(storage / "cache"))
    cmd = [sys.executable, str(ROOT / "sweeps" / "fig6.py"), "--storage-path", str(storage), *a.extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = storage / "sweep.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    figs = storage / "figures" / "fig6"
    want = ["fig6.png", "fig6.svg", "fig6.csv", "verdict.md"]
    print(f"sweeps/fig6.py exit {proc.returncode}, wall {wall:.0f} s ({wall / 60:.1f} min); log {log}")
    for name in want:
        print(f"  {name:11s} {'written' if (figs / name).exists() else 'MISSING'}")
    if (figs / "fig6.csv").exists():
        with open(figs / "fig6.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        defined = sum(r["ratio_defined"] == "True" for r in rows)
        print(f"  fig6.csv: {len(rows)} rows, ratio defined in {defined}")
        iv = lambda r, k: f"{float(r[k + '_mean']):.3g} [{float(r[k + '_lo']):.3g}, {float(r[k + '_hi']):.3g}]"  # noqa: E731
        for r in rows:
            if r["source"] in ("synthetic", "imp") or r["source"].startswith(("shuffled", "reinit")):
                ratio = iv(r, "barrier_ratio") if r["ratio_defined"] == "True" else "undefined"
                print(f"  {r['model']} ipc={r['ipc'] or '-':3s} {float(r['sparsity']):.0%} {r['bn_mode']:11s} "
                      f"{r['source']:18s} n={r['n_seeds']} acc ratio {iv(r, 'acc_ratio')}; barrier ratio {ratio}; "
                      f"barrier {iv(r, 'source_barrier')} vs IMP {iv(r, 'imp_barrier')}")
    if (figs / "verdict.md").exists():
        print((figs / "verdict.md").read_text())
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
