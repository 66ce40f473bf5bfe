"""The sweep layer end to end: sweeps.driver on a real local Ray, logging to a temporary MLflow SQLite
store, on tiny digits chains (ConvNet-3 width 8, a few 1-epoch rounds).

One Ray session is shared by the module (`ray_session`); the tests that must see no Ray at all (config
errors, --dry-run) come first and shut it down if something started it. The two-node test starts its
own cluster with `ray start` in subprocesses and runs the driver in a subprocess against it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

FIGURE = "fig6"
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
EVAL_ROUNDS = [2, 4]  # rounds: [2] plus sparsity 0.6 -> round 4

BASE = {
    "dataset": {"name": "digits"},
    "model": {"name": "convnet3", "width": 8},
    "pruning": {"rounds": 4},
    "pruning_training": {"epochs": 1, "lr": 0.1},
    "training": {"epochs": 1, "lr": 0.1},
}
DISTILLED = {"set": {"pruning_data": {"kind": "distilled", "method": "dm", "ipc": 1, "budget": 5},
                     "pruning_training": {"epochs": 2, "lr": 0.1}}}


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
    return {"figure": FIGURE, "presets": {"demo": preset}}


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
# without Ray: config errors and --dry-run


CONFIG_ERRORS = {
    "unknown sweep key": (dict(resources={"cpus_per_trial": 1, "gpu": 1}), [], "resources.gpu"),
    "unknown chain key": (dict(base={**BASE, "training": {"epochs": 1, "lrr": 0.1}}), [], "training.lrr"),
    "bad type": (dict(base={**BASE, "pruning": {"rounds": "four"}}), [], "pruning.rounds"),
    "sparsity out of range": (dict(evaluation={"sparsities": [1.5]}), [], "evaluation.sparsities[0]"),
    "sparsity beyond the chain": (dict(evaluation={"sparsities": [0.87]}), [], "evaluation"),
    "gpus beyond the machine": (dict(resources={"cpus_per_trial": 1, "gpus_per_trial": 64}), [],
                                "resources.gpus_per_trial"),
    "gpus not a fraction of one": (dict(resources={"gpus_per_trial": 0.3}), [], "resources.gpus_per_trial"),
    "cpus beyond --num-cpus": (dict(resources={"cpus_per_trial": 3}), ["--num-cpus", "2"],
                               "resources.cpus_per_trial"),
    "relative storage path": ({}, ["--storage-path", "relative/runs"], "--storage-path"),
    "relative sqlite uri": ({}, ["--tracking-uri", "sqlite:///mlflow.db"], "--tracking-uri"),
    "bad --set": ({}, ["--set", "training.epochs"], "--set"),
    "missing data root": ({}, ["--set", "dataset=cifar10", "root=/nonexistent/cifar"], "dataset.root"),
    "unknown model": ({}, ["--set", "model=vgg16"], "model.name"),
    "unknown synthetic method": ({}, ["--set", "pruning_data.method=dc"], "pruning_data.method"),
    "missing IDC file": ({}, ["--set", "pruning_data.kind=idc_file", "pruning_data.path=/nonexistent/data.pt"],
                         "pruning_data.path"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_error_stops_before_ray(case, tmp_path, capsys, no_ray):
    changes, args, field = CONFIG_ERRORS[case]
    config = write_config(tmp_path, sweep_doc(**changes))
    storage = tmp_path / "storage"
    argv = ["--config", config, "--storage-path", str(storage)]
    from sweeps.driver import main

    rc = main(FIGURE, argv + args)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.startswith(f"error: {field}"), err
    assert "fix:" in err
    assert not no_ray.is_initialized()
    assert not storage.exists(), "a config error left files behind"


def test_dry_run_starts_nothing(tmp_path, capsys, no_ray):
    config = write_config(tmp_path, sweep_doc(grid={"seed": [0, 1]}))
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--dry-run")
    assert rc == 0, err
    assert out.startswith("4 trials (0 already complete), each 1 CPU + 0 GPU:")
    lines = [ln for ln in out.splitlines() if ln.startswith("  run  ")]
    assert len(lines) == 4
    labels = sorted(ln.split()[2] for ln in lines)
    assert labels == ["distilled,seed=0", "distilled,seed=1", "imp,seed=0", "imp,seed=1"]
    assert all("rounds->4 eval@[2, 4]" in ln for ln in lines)
    assert len({ln.split()[1] for ln in lines}) == 4  # distinct trial keys
    assert not no_ray.is_initialized()
    assert not storage.exists()


# ---------------------------------------------------------------------------------------------
# with the module's Ray


def test_sweep_end_to_end(reference_sweep):
    r = reference_sweep
    storage = r["storage"]
    assert r["rc"] == 0, r["out"][-3000:] + r["err"][-3000:]
    assert "2 trials, 2 run, 0 reused, 0 failed" in r["out"]

    parents = runs(storage, "sweep")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prunelab.figure"] == FIGURE
    local = mlflow_client(storage).download_artifacts(parent.info.run_id, "sweep/trials.json", str(storage / "dl"))
    trials = json.loads(Path(local).read_text())
    assert len(trials) == 2

    chains = runs(storage, "chain")
    assert len(chains) == 2
    assert {c.data.tags["prunelab.trial_key"] for c in chains} == {t["key"] for t in trials}
    kinds = set()
    for c in chains:
        tags, params = c.data.tags, c.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["prunelab.status"] == "finished"
        assert c.info.status == "FINISHED"
        assert tags["prunelab.variant"] in ("imp", "distilled")
        assert re.fullmatch(r"[0-9a-f]{20,}", tags["prunelab.node_id"]), tags.get("prunelab.node_id")
        assert params["dataset.name"] == "digits" and params["model.name"] == "convnet3"
        assert params["eval.rounds"] == "2,4"
        kinds.add(params["pruning_data.kind"])
        if tags["prunelab.variant"] == "distilled":
            assert params["pruning_data.method"] == "dm" and params["pruning_data.ipc"] == "1"
        check_metric_steps(storage, c)
        rid = c.info.run_id
        sparsity = {m.step: m.value for m in mlflow_client(storage).get_metric_history(rid, "eval_sparsity")}
        assert sparsity[4] == pytest.approx(1 - 0.8 ** 4, abs=0.01)
        assert artifact_paths(storage, rid, "lmc") == {"lmc/round_02.json", "lmc/round_04.json"}
        assert artifact_paths(storage, rid, "masks") == {"masks/round_02.pt", "masks/round_04.pt"}
        lmc = json.loads(Path(mlflow_client(storage).download_artifacts(rid, "lmc/round_04.json",
                                                                        str(storage / "dl"))).read_text())
        assert isinstance(lmc, dict) and lmc, "empty LMC artifact"
        # the result store holds every round's mask of this chain
        assert sorted(masks(storage, tags["prunelab.chain_hash"])) == [f"round_{i:02d}.mask.pt" for i in range(5)]
    assert kinds == {"real", "distilled"}

    pngs = figure_paths(r["out"])
    assert pngs, r["out"][-2000:]
    for p in pngs:
        assert p.parent == storage / "figures" / FIGURE
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_errored_trial(tmp_path, capsys, ray_session):
    """max_failures=0 and a fault in round 2: the trial errors, the driver exits 1 and closes its run
    as failed; `--resume` continues that trial from its checkpoint, in the same MLflow run, and the new
    sweep run lists that run in sweep/trials.json (the analysis reads it from there)."""
    ray_session()
    config = write_config(tmp_path, sweep_doc(base={**BASE, "pruning": {"rounds": 3}}, variants={"imp": {}},
                                              evaluation={"rounds": [], "lmc": False}))
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--inject-fault", "2", "--max-failures", "0", "--no-analysis")
    assert rc == 1, out[-3000:] + err[-3000:]
    (run,) = runs(storage, "chain")
    assert run.info.status == "FAILED" and run.data.tags["prunelab.status"] == "failed"
    assert "fault injected in round 2" in run.data.tags["prunelab.failure"]
    assert steps(storage, run.info.run_id, "sparsity") == [0, 1]

    rc, out, err = drive(capsys, config, storage, "--resume", "--no-analysis")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert f"resuming {storage / 'ray' / 'fig6-demo'}" in out
    (after,) = runs(storage, "chain")
    assert after.info.run_id == run.info.run_id
    assert after.info.status == "FINISHED" and after.data.tags["prunelab.status"] == "finished"
    assert "prunelab.failure" not in after.data.tags
    assert steps(storage, run.info.run_id, "sparsity") == [0, 1, 2]
    newest = max(runs(storage, "sweep"), key=lambda p: p.info.start_time)
    local = mlflow_client(storage).download_artifacts(newest.info.run_id, "sweep/trials.json", str(tmp_path / "dl"))
    assert [t["run_id"] for t in json.loads(Path(local).read_text())] == [run.info.run_id]


def test_fault_resumes_same_mask(reference_sweep, tmp_path, capsys, ray_session, monkeypatch):
    """Both chains raise in round 2 of their first attempt (the variable is set in the driver after
    Ray's workers exist); with max_failures=1 each resumes from its checkpoint and reaches the same
    masks as the uninterrupted sweep, in one MLflow run with each metric step logged once."""
    ray_session()
    monkeypatch.setenv("PRUNELAB_FAIL_AT_ROUND", "2")
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, reference_sweep["config"], storage)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "2 trials, 2 run, 0 reused, 0 failed" in out
    parent = runs(storage, "sweep")[0].info.run_id
    chains = runs(storage, "chain")
    assert len(chains) == 2, "a retried chain opened a second MLflow run"
    keys = {c.data.tags["prunelab.trial_key"] for c in chains}
    assert len(keys) == 2
    for c in chains:
        key, chash = c.data.tags["prunelab.trial_key"], c.data.tags["prunelab.chain_hash"]
        # the fault really fired in the trial (once), and the retry finished the chain
        marks = storage / "store" / "faults" / parent / key
        assert sorted(p.name for p in marks.iterdir()) == ["1"]
        err_file = mlflow_client(storage).download_artifacts(c.info.run_id, "warnings/last_error.txt",
                                                            str(tmp_path / "dl"))
        assert "fault injected in round 2" in Path(err_file).read_text()
        assert c.data.tags["prunelab.status"] == "finished" and c.info.status == "FINISHED"
        assert "prunelab.failure" not in c.data.tags, "a finished chain still carries the failed attempt's reason"
        check_metric_steps(storage, c)
        got, want = masks(storage, chash), masks(reference_sweep["storage"], chash)
        assert sorted(got) == [f"round_{i:02d}.mask.pt" for i in range(5)]
        assert same_masks(got, want), f"chain {chash}: resumed masks differ from the uninterrupted run"


def test_worker_killed_mid_round_resumes_same_mask(reference_sweep, tmp_path, capsys, ray_session):
    """Each chain's worker process dies by SIGKILL in the middle of round 2 (after an epoch of its
    training): the retry resumes from the round-1 checkpoint and ends with the uninterrupted sweep's
    masks, in one MLflow run per chain with each metric step logged once."""
    ray_session()
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, reference_sweep["config"], storage, "--inject-fault", "2:1::kill")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "2 trials, 2 run, 0 reused, 0 failed" in out
    parent = runs(storage, "sweep")[0].info.run_id
    chains = runs(storage, "chain")
    assert len(chains) == 2, "a retried chain opened a second MLflow run"
    for c in chains:
        key, chash = c.data.tags["prunelab.trial_key"], c.data.tags["prunelab.chain_hash"]
        assert sorted(p.name for p in (storage / "store" / "faults" / parent / key).iterdir()) == ["1"]
        # the process died: no Python error handler ran (a raised fault records warnings/last_error.txt)
        logged = {a.path for a in mlflow_client(storage).list_artifacts(c.info.run_id, "warnings")}
        assert "warnings/last_error.txt" not in logged
        assert c.data.tags["prunelab.status"] == "finished" and c.info.status == "FINISHED"
        check_metric_steps(storage, c)
        assert same_masks(masks(storage, chash), masks(reference_sweep["storage"], chash))


def test_chain_failing_every_attempt(tmp_path, capsys, ray_session):
    """A fault before the first checkpoint on every attempt: the driver exits 1 and names the trial;
    the retry reopened the same MLflow run (no checkpoint held its id), which ends failed."""
    ray_session()
    config = write_config(tmp_path, sweep_doc(base={**BASE, "pruning": {"rounds": 2}}, variants={"imp": {}},
                                              evaluation={"rounds": [], "lmc": False}))
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--inject-fault", "0:0", "--no-analysis")
    assert rc == 1, out[-3000:] + err[-3000:]
    assert "failed trials:" in err
    line = err.split("failed trials:", 1)[1].strip().splitlines()[0]
    assert line.startswith("imp,seed=0 [") and "fault injected in round 0" in line, err
    chains = runs(storage, "chain")
    assert len(chains) == 1
    c = chains[0]
    assert c.info.status == "FAILED"
    assert c.data.tags["prunelab.status"] == "failed"
    assert "fault injected in round 0" in c.data.tags["prunelab.failure"]
    parent = runs(storage, "sweep")[0]
    assert parent.info.status == "FAILED"
    marks = storage / "store" / "faults" / parent.info.run_id / c.data.tags["prunelab.trial_key"]
    assert len(list(marks.iterdir())) == 2  # max_failures=1: two attempts, both failed


def test_diverging_chain_recorded_as_failed(tmp_path, capsys, ray_session):
    ray_session()
    variants = {"imp": {}, "imp_lr1e6": {"set": {"pruning_training": {"lr": 1.0e6}}}}
    config = write_config(tmp_path, sweep_doc(base={**BASE, "pruning": {"rounds": 2}}, variants=variants,
                                              evaluation={"rounds": [], "lmc": False}))
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--no-analysis")
    assert rc == 1, out[-3000:] + err[-3000:]
    assert "1 failed" in out
    failed = err.split("failed trials:", 1)[1].strip().splitlines()
    assert len(failed) == 1 and failed[0].startswith("imp_lr1e6,seed=0 [") and "diverged" in failed[0], err
    chains = {c.data.tags["prunelab.variant"]: c for c in runs(storage, "chain")}
    assert sorted(chains) == ["imp", "imp_lr1e6"]
    bad, good = chains["imp_lr1e6"], chains["imp"]
    assert bad.info.status == "FAILED" and bad.data.tags["prunelab.status"] == "failed"
    assert bad.data.tags["prunelab.failure"].startswith("diverged: training loss became")
    assert good.info.status == "FINISHED" and good.data.tags["prunelab.status"] == "finished"
    assert "prunelab.failure" not in good.data.tags
    assert steps(storage, good.info.run_id, "sparsity") == [0, 1]


def test_gpus_beyond_cluster_after_ray(tmp_path, capsys, ray_session):
    """With Ray already up (0 GPUs), the request is checked against the cluster before any run exists."""
    ray_session()
    config = write_config(tmp_path, sweep_doc())
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--gpus-per-trial", "1")
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors and errors[0].startswith("error: resources.gpus_per_trial: each chain asks for 1 GPU but no node "
                                           "has that many"), err
    assert runs(storage) == [], "the sweep left an MLflow run behind"


def test_rerun_computes_nothing(reference_sweep, capsys, no_ray):
    """No Ray is needed (or started) when every trial is already complete."""
    r = reference_sweep
    storage = r["storage"]
    assert r["rc"] == 0
    before = {c.info.run_id for c in runs(storage, "chain")}
    figures = storage / "figures" / FIGURE
    for p in figures.glob("*"):
        p.unlink()
    rc, out, err = drive(capsys, r["config"], storage)
    assert rc == 0, err
    assert "2 trials (2 already complete)" in out
    assert "nothing to compute" in out
    assert "2 trials, 0 run, 2 reused, 0 failed" in out
    assert {c.info.run_id for c in runs(storage, "chain")} == before
    parents = runs(storage, "sweep")
    assert len(parents) == 2
    # the new sweep run lists the reused runs, which the analysis reads through sweep/trials.json
    newest = max(parents, key=lambda p: p.info.start_time)
    c = mlflow_client(storage)
    local = c.download_artifacts(newest.info.run_id, "sweep/trials.json", str(storage / "dl2"))
    assert {t["run_id"] for t in json.loads(Path(local).read_text())} == before
    pngs = figure_paths(out)
    assert pngs and all(p.exists() and p.parent == figures for p in pngs)
    # --dry-run reads what is complete from the existing store, and writes nothing
    db = (storage / "mlflow.db").stat().st_mtime_ns
    rc, out, err = drive(capsys, r["config"], storage, "--dry-run")
    assert rc == 0, err
    assert out.startswith("2 trials (2 already complete)")
    assert sum(ln.startswith("  done ") for ln in out.splitlines()) == 2
    assert (storage / "mlflow.db").stat().st_mtime_ns == db
    assert len(runs(storage, "sweep")) == 2
    assert not no_ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# two Ray nodes on this machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head and a worker node started with `ray start --block` in their own process groups; token
    authentication (on by default since Ray 2.59) with one token given to every process."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
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


@pytest.mark.slow
def test_two_node_cluster(two_nodes, tmp_path):
    config = write_config(tmp_path, sweep_doc(base={**BASE, "pruning": {"rounds": 3}}, grid={"seed": [0, 1]},
                                              variants={"imp": {}}, evaluation={"rounds": [], "lmc": False}))
    storage = tmp_path / "storage"
    code = ("import sys; from sweeps.driver import main; "
            f"sys.exit(main({FIGURE!r}, sys.argv[1:]))")
    # `--address auto` finds the cluster through RAY_ADDRESS, as on a cluster's head node
    argv = ["--config", config, "--storage-path", str(storage), "--address", "auto", "--no-analysis"]
    env = dict(two_nodes.env, PRUNELAB_CACHE=str(tmp_path / "cache"), RAY_ADDRESS=two_nodes.address)

    # local storage on a multi-node cluster is refused unless declared shared
    r = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error: --storage-path:" in r.stderr and "2 nodes" in r.stderr

    # the multi-node way: one `mlflow server` that every node reaches over HTTP
    env["PRUNELAB_SHARED_STORAGE"] = "1"
    with mlflow_server(tmp_path) as uri:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", code, *argv, "--tracking-uri", uri], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        wall = time.time() - t0
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # what the MLflow UI shows, read through the tracking server's REST API
        exp = rest(uri, "experiments/get-by-name", {"experiment_name": f"prunelab-{FIGURE}"})["experiment"]
        found = rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100},
                     post=True)["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in found]
    parents = [run["info"]["run_id"] for run, t in zip(found, tags) if t.get("prunelab.role") == "sweep"]
    chains = [(run, t) for run, t in zip(found, tags) if t.get("prunelab.role") == "chain"]
    assert len(parents) == 1 and len(chains) == 2
    for run, t in chains:
        assert t["prunelab.status"] == "finished" and run["info"]["status"] == "FINISHED"
        assert t["mlflow.parentRunId"] == parents[0]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["dataset.name"] == "digits" and params["pruning_data.kind"] == "real"
        assert {m["key"] for m in run["data"]["metrics"]} >= {"pruning_accuracy", "sparsity"}
    nodes = {t["prunelab.node_id"] for _, t in chains}
    # the same sweep on one node with one CPU, for the wall-time comparison
    one = dict(env)
    one.pop("RAY_ADDRESS")
    t0 = time.time()
    r1 = subprocess.run([sys.executable, "-c", code, "--config", config, "--storage-path", str(tmp_path / "one"),
                         "--num-cpus", "1", "--no-analysis"], env=one, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
    wall_one = time.time() - t0
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    print(f"two-node sweep {wall:.0f} s, one-node (1 CPU) {wall_one:.0f} s; cluster nodes {two_nodes.ids}, "
          f"chain nodes {sorted(nodes)}")
    assert nodes == set(two_nodes.ids), "both chains ran on one node"


@contextlib.contextmanager
def mlflow_server(tmp: Path):
    """`mlflow server` on a free localhost port, SQLite behind it, artifacts served by the server."""
    port = _free_port()
    log = open(tmp / "mlflow-server.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "server-artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, "mlflow server exited: " + (tmp / "mlflow-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not answer in 90 s"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


def test_start_from_a_variant_with_its_own_grid_axes_gives_one_chain_per_start_chain():
    from sweeps.config import SweepHparams, expand

    sweep = SweepHparams.from_dict({
        "base": {"model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 4},
                 "pruning_training": {"epochs": 1}, "training": {"epochs": 1}},
        "grid": {"seed": [0, 1]},
        "variants": [
            {"name": "distilled", "set": {"pruning": {"rounds": 2},
                                          "pruning_data": {"kind": "distilled", "method": "dm"}},
             "grid": {"pruning_data.ipc": [1, 10]}},
            {"name": "then_imp", "start_from": "distilled", "start_round": 2}],
        "evaluation": {"every_round": True, "lmc": False}})
    trials = expand(sweep, "fig7")
    combined = [t for t in trials if t.variant == "then_imp"]
    assert len(combined) == 4  # 2 seeds x 2 start chains (ipc 1, ipc 10)
    starts = {(t.chain.seed, t.chain.start_chain().pruning_data.ipc) for t in combined}
    assert starts == {(0, 1), (0, 10), (1, 1), (1, 10)}
    for t in combined:
        start = t.chain.start_chain()
        assert start.seed == t.chain.seed and t.axes["start.pruning_data.ipc"] == start.pruning_data.ipc
        assert f"start_ipc={start.pruning_data.ipc}" in t.label()
    assert len({t.key for t in combined}) == 4


@pytest.mark.slow
def test_driver_killed_mid_sweep_then_resume(tmp_path, capsys, no_ray):
    """The driver process (and the local Ray it started) dies by SIGKILL once a chain has finished;
    `--resume` finishes the remaining chains, reuses the finished one, and the experiment ends with
    one run per chain, each metric step logged once."""
    config = write_config(tmp_path, sweep_doc(grid={"seed": [0, 1, 2]}, variants={"imp": {}},
                                              evaluation={"rounds": [2], "lmc": False},
                                              resources={"cpus_per_trial": 1, "max_concurrent": 1}))
    storage = tmp_path / "storage"
    code = f"import sys; from sweeps.driver import main; sys.exit(main({FIGURE!r}, sys.argv[1:]))"
    env = dict(os.environ, PRUNELAB_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code, "--config", config, "--storage-path", str(storage),
                             "--num-cpus", "1", "--no-analysis"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    try:
        while True:
            assert proc.poll() is None, "the driver ended before it was killed: " + \
                (tmp_path / "driver.log").read_text()[-3000:]
            # the store is read only once the driver has made it (a second writer races its migration)
            if "MLflow: experiment" in (tmp_path / "driver.log").read_text():
                done = [r for r in runs(storage, "chain") if r.data.tags.get("prunelab.status") == "finished"]
                if done:
                    break
            assert time.time() < deadline, "no chain finished in 240 s"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished_before = {r.data.tags["prunelab.trial_key"] for r in done}
    time.sleep(2)  # Ray's processes share the driver's fate; let them go

    rc = subprocess.run([sys.executable, "-c", code, "--config", config, "--storage-path", str(storage),
                         "--num-cpus", "2", "--no-analysis", "--resume"], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    assert f"{len(finished_before)} reused" in rc.stdout, rc.stdout[-2000:]
    chains = runs(storage, "chain")
    keys = [c.data.tags["prunelab.trial_key"] for c in chains]
    assert len(set(keys)) == 3 and len(keys) == 3, f"one MLflow run per chain, got {len(keys)} for {len(set(keys))}"
    for c in chains:
        assert c.data.tags["prunelab.status"] == "finished" and c.info.status == "FINISHED"
        for key in ("sparsity", "pruning_accuracy"):
            assert steps(storage, c.info.run_id, key) == [0, 1, 2, 3], key
