"""The same sweep with its result store in a local folder and in an S3 bucket (moto's server on
127.0.0.1, installed with the test extras): wall time of each, and the bytes and files stored per chain.

    python benchmarks/object_store.py [--seeds 0 1] [--rounds 4] [--cpus 2]

Each sweep runs the driver in a subprocess with a local Ray of `--cpus` CPUs and a SQLite tracking
file; both start from an empty store, so the difference is the cost of talking to S3 (HTTP on
loopback here: a lower bound for a real bucket, whose latency is higher).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_config(tmp: Path, seeds: list[int], rounds: int) -> str:
    base = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": rounds},
            "pruning_training": {"epochs": 2, "lr": 0.1}, "training": {"epochs": 2, "lr": 0.1}}
    doc = {"figure": "fig6", "presets": {"demo": {
        "base": base, "grid": {"seed": seeds},
        "variants": {"imp": {}, "distilled": {"set": {"pruning_data": {"kind": "distilled", "method": "dm", "ipc": 1,
                                                                       "budget": 20}}}},
        "evaluation": {"rounds": [2, rounds], "lmc": True},
        "resources": {"cpus_per_trial": 1, "max_failures": 1}}}}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def run_sweep(config: str, storage: str, tmp: Path, env: dict, cpus: int) -> float:
    code = "import sys; from sweeps.driver import main; sys.exit(main('fig6', sys.argv[1:]))"
    argv = ["--config", config, "--storage-path", storage, "--num-cpus", str(cpus), "--no-analysis",
            "--tracking-uri", f"sqlite:///{tmp}/mlflow-{abs(hash(storage))}.db"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"the sweep on {storage} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def per_chain(fs, root: str) -> list[tuple[str, int, int]]:
    """(chain hash, bytes, files) of every chain folder under `root`."""
    out = []
    for d in sorted(fs.ls(f"{root}/chains", detail=False)):
        files = [f for f in fs.find(d, detail=True).values() if "/lease/" not in f["name"]]
        out.append((d.rsplit("/", 1)[-1], sum(int(f["size"]) for f in files), len(files)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cpus", type=int, default=2)
    a = p.parse_args()
    import fsspec

    tmp = Path(tempfile.mkdtemp(prefix="prunelab-objstore-"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
               AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", PRUNELAB_CACHE=str(tmp / "cache"),
               PRUNELAB_LOCAL=str(tmp / "driver"), RAY_USAGE_STATS_ENABLED="0")
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    try:
        s3 = fsspec.filesystem("s3", use_listings_cache=False)
        for _ in range(100):
            try:
                s3.mkdir("bench")
                break
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.2)
        config = sweep_config(tmp, a.seeds, a.rounds)
        # the synthetic sets are built inside the trials in both runs (no shared cache between them)
        local_wall = run_sweep(config, str(tmp / "local"), tmp, dict(env, PRUNELAB_CACHE=str(tmp / "cache-local")),
                               a.cpus)
        s3_wall = run_sweep(config, "s3://bench/run", tmp, dict(env, PRUNELAB_CACHE=str(tmp / "cache-s3")), a.cpus)
        local_chains = per_chain(fsspec.filesystem("file"), str(tmp / "local" / "store"))
        s3_chains = per_chain(s3, "bench/run/store")
    finally:
        server.terminate()
        server.wait()
    print(json.dumps({"seeds": a.seeds, "rounds": a.rounds, "cpus": a.cpus}))
    print("| store | wall time (s) | chains | bytes per chain (mean, min-max) | files per chain |")
    print("|---|---:|---:|---|---:|")
    for name, wall, chains in (("local folder", local_wall, local_chains), ("S3 (moto, loopback)", s3_wall, s3_chains)):
        sizes = [b for _, b, _ in chains]
        files = [n for _, _, n in chains]
        print(f"| {name} | {wall:.1f} | {len(chains)} | {sum(sizes) / len(sizes) / 1e3:.1f} kB "
              f"({min(sizes) / 1e3:.1f}-{max(sizes) / 1e3:.1f}) | {sum(files) / len(files):.1f} |")
    print(f"ratio S3 / local: {s3_wall / local_wall:.2f}")


if __name__ == "__main__":
    main()
