"""Shared pieces of the sweep-layer tests: the tiny two-chain sweep, the driver called in-process,
MLflow read-backs, a local `mlflow server`, and the fixtures for a module's Ray session.

Test modules import what they use (fixtures included: pytest finds a fixture imported into a module).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

FIGURE = "fig6"
EVAL_ROUNDS = [2, 4]  # rounds: [2] plus sparsity 0.6 -> round 4

BASE = {
    "dataset": {"name": "digits"},
    "model": {"name": "convnet3", "width": 8},
    "pruning": {"rounds": 4},
    "pruning_training": {"epochs": 1, "lr": 0.1},
    "training": {"epochs": 1, "lr": 0.1},
}
# the distilled chains are packed two to a CPU (a variant's own resources)
DISTILLED = {"set": {"pruning_data": {"kind": "distilled", "method": "dm", "ipc": 1, "budget": 5},
                     "pruning_training": {"epochs": 2, "lr": 0.1}},
             "resources": {"cpus_per_trial": 0.5}}


def sweep_doc(**changes) -> dict:
    """The tiny two-chain sweep (imp + distilled dm ipc 1) with top-level preset keys replaced."""
    preset = {
        "base": json.loads(json.dumps(BASE)),
        "grid": {"seed": [0]},
        "variants": {"imp": {}, "distilled": json.loads(json.dumps(DISTILLED))},
        "evaluation": {"rounds": [2], "sparsities": [0.6], "lmc": True},
        "resources": {"cpus_per_trial": 1, "max_failures": 1},
    }
    preset.update(changes)
    return {"figure": FIGURE, "description": "A tiny Figure 6 sweep for the tests.", "presets": {"demo": preset}}


def write_config(dir: Path, doc: dict, name: str = "sweep.yaml") -> str:
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def drive(capsys, config: str, storage: Path, *extra: str) -> tuple[int, str, str]:
    from sweeps.driver import main

    capsys.readouterr()
    rc = main(FIGURE, ["--config", config, "--storage-path", str(storage), *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def tracking_uri(storage: Path) -> str:
    return f"sqlite:///{storage / 'mlflow.db'}"  # storage is absolute: four slashes


def mlflow_client(storage: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(storage))


def runs(storage: Path, role: str | None = None) -> list:
    c = mlflow_client(storage)
    exp = c.get_experiment_by_name(f"prunelab-{FIGURE}")
    assert exp is not None, "the driver did not create the experiment"
    flt = f"tags.`prunelab.role` = '{role}'" if role else ""
    return c.search_runs([exp.experiment_id], flt, max_results=1000)


def steps(storage: Path, run_id: str, key: str) -> list[int]:
    """Logged steps of a metric, in order, duplicates kept (so a test can see them)."""
    return sorted(m.step for m in mlflow_client(storage).get_metric_history(run_id, key))


def artifact_paths(storage: Path, run_id: str, folder: str) -> set[str]:
    return {a.path for a in mlflow_client(storage).list_artifacts(run_id, folder)}


def masks(storage: Path, chain_hash: str) -> dict[str, dict]:
    from prunelab.masks import Mask

    d = storage / "store" / "chains" / chain_hash / "rounds"
    return {p.name: dict(Mask.load(p)) for p in sorted(d.glob("round_*.mask.pt"))}


def same_masks(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)


def figure_paths(out: str) -> list[Path]:
    return [Path(m) for m in re.findall(r"^figure: (\S+\.png)$", out, re.M)]


def check_metric_steps(storage: Path, run) -> None:
    """Every metric logged once per step: rounds 0..3 each round, evaluations at EVAL_ROUNDS."""
    rid = run.info.run_id
    for key in ("sparsity", "pruning_accuracy", "pruning_train_loss", "pruning_set_size"):
        assert steps(storage, rid, key) == [0, 1, 2, 3], key
    for key in ("eval_sparsity", "test_accuracy", "barrier_mid_train_loss", "barrier_max_test_loss"):
        assert steps(storage, rid, key) == EVAL_ROUNDS, key
    for key in run.data.metrics:
        s = steps(storage, rid, key)
        assert len(s) == len(set(s)), f"{key} logged twice at a step: {s}"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Synthetic sets built by the driver process itself go to a temporary cache."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("prunelab-cache")
    mp.setenv("PRUNELAB_CACHE", str(d))
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.delenv("PRUNELAB_FAIL_AT_ROUND", raising=False)
    mp.delenv("PRUNELAB_SHARED_STORAGE", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module; calling the fixture's value (re)starts it if a test shut it down."""
    import ray

    def ensure():
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        return ray

    ensure()
    yield ensure
    ray.shutdown()


@pytest.fixture
def no_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    assert not ray.is_initialized(), "Ray was started"


@pytest.fixture(scope="module")
def reference_sweep(tmp_path_factory, ray_session):
    """The two-chain sweep, uninterrupted; later tests re-run it and compare against it."""
    ray_session()
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp, sweep_doc())
    storage = tmp / "storage"
    from sweeps.driver import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(FIGURE, ["--config", config, "--storage-path", str(storage)])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "config": config, "storage": storage}


# ---------------------------------------------------------------------------------------------
# a local MLflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a localhost port, SQLite behind it, artifacts served by the server; it can be
    stopped and started again on the same port and store (a tracking server going away and back)."""

    def __init__(self, tmp: Path, db: Path | None = None):
        self.tmp = tmp
        self.db = db or tmp / "server.db"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 90) -> str:
        self.starts += 1
        log_path = self.tmp / f"mlflow-server-{self.starts}.log"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.tmp / "server-artifacts"), "--workers", "1"],
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, "mlflow server exited: " + log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self.uri
            except OSError:
                pass
            assert time.time() < deadline, f"mlflow server did not answer in {timeout:.0f} s"
            time.sleep(0.5)

    def stop(self, kill: bool = False) -> None:
        """End the server and its workers (its process group); the port refuses connections after.
        `kill`: at once, by SIGKILL (a crash), rather than a graceful shutdown."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def mlflow_server(tmp: Path, db: Path | None = None):
    """A running `MlflowServer` for the block (over the SQLite file `db` if given); yields its URI."""
    server = MlflowServer(tmp, db)
    try:
        yield server.start()
    finally:
        server.stop()


def rest(uri: str, endpoint: str, payload: dict, post: bool = False) -> dict:
    """One call of MLflow's REST API (what the UI reads)."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if post:
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    else:
        req = urllib.request.Request(url + "?" + urllib.parse.urlencode(payload))
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


class LocalCluster:
    """A head and a worker node started with `ray start --block` in their own process groups; token
    authentication (on by default since Ray 2.59) with one token given to every process."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Unix socket paths are limited
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start_node(self, *args: str) -> None:
        log = open(self.tmp / f"node{len(self.procs)}.log", "w")
        self.procs.append(subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--num-cpus=1", *args],
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def python(self, code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=env or self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def node_ids(self) -> list[str]:
        r = self.python("import json, ray; ray.init(address=%r, log_to_driver=False); "
                        "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))" % self.address,
                        timeout=60)
        lines = r.stdout.strip().splitlines()
        return json.loads(lines[-1]) if r.returncode == 0 and lines else []

    def start(self, nodes: int = 2, timeout: float = 90) -> list[str]:
        self.start_node("--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", f"--temp-dir={self.temp_dir}")
        for _ in range(nodes - 1):
            self.start_node(f"--address={self.address}", "--node-ip-address=127.0.0.1")
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            assert not dead, "a `ray start` exited: " + (self.tmp / "node0.log").read_text()[-3000:]
            ids = self.node_ids()
            if len(ids) == nodes:
                return ids
            time.sleep(1)
        raise AssertionError(f"the cluster did not reach {nodes} nodes in {timeout} s")

    def stop(self) -> None:
        """End exactly the processes these `ray start` calls made (their process groups)."""
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3  # a SIGTERM'd node drains for up to 30 s: not worth waiting for
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        # raylet workers run in process groups of their own and exit once their raylet is gone
        deadline = time.time() + 20
        while time.time() < deadline and self.leftovers():
            time.sleep(0.5)

    def leftovers(self) -> list[str]:
        r = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True)
        return [ln for ln in r.stdout.splitlines() if self.temp_dir in ln and " Z" not in ln]


@pytest.fixture
def two_nodes(tmp_path, no_ray):
    cluster = LocalCluster(tmp_path)
    try:
        cluster.ids = cluster.start(2)
        yield cluster
    finally:
        cluster.stop()
        left = cluster.leftovers()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        assert not left, f"Ray processes survived the teardown: {left}"
