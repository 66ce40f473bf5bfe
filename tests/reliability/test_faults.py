"""Faults a long sweep meets on preemptible machines, injected for real on a local Ray with a
temporary MLflow SQLite store: an exception mid-round, a worker process killed by SIGKILL mid-round,
a chain failing every attempt, a diverging chain, and the driver killed mid-sweep. Each must end
with the masks an uninterrupted run gives, one MLflow run per chain, and no metric step logged twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeptools import (BASE, FIGURE, ROOT, cache_dir, check_metric_steps, drive, masks, mlflow_client,  # noqa: F401
                        no_ray, ray_session, reference_sweep, runs, same_masks, steps, sweep_doc, write_config)

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("mid_round", [False, True], ids=["round-checkpoints", "mid-round-checkpoints"])
def test_worker_killed_mid_round_resumes_same_mask(reference_sweep, tmp_path, capsys, ray_session, mid_round):
    """Each chain's worker process dies by SIGKILL in the middle of round 2 (after an epoch of its
    training): the retry resumes from the round-1 checkpoint (or, with `checkpoint_minutes: 0`, from
    the state stored at that epoch's end, mid-round) and ends with the uninterrupted sweep's masks, in
    one MLflow run per chain with each metric step logged once."""
    ray_session()
    storage = tmp_path / "storage"
    extra = ["--set", "resources.checkpoint_minutes=0"] if mid_round else []
    rc, out, err = drive(capsys, reference_sweep["config"], storage, "--inject-fault", "2:1::kill", *extra)
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
        assert not (storage / "store" / "chains" / chash / "round_partial.pt").exists()


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


@pytest.mark.slow
def test_driver_killed_mid_sweep_then_resume(tmp_path, capsys, no_ray):
    """The driver process (and the local Ray it started) dies by SIGKILL once a chain has finished;
    `--resume` finishes the remaining chains, reuses the finished one, and the experiment ends with
    one run per chain, each metric step logged once."""
    config = write_config(tmp_path, sweep_doc(grid={"seed": [0, 1]}, variants={"imp": {}},
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
    assert len(set(keys)) == 2 and len(keys) == 2, f"one MLflow run per chain, got {len(keys)} for {len(set(keys))}"
    for c in chains:
        assert c.data.tags["prunelab.status"] == "finished" and c.info.status == "FINISHED"
        for key in ("sparsity", "pruning_accuracy"):
            assert steps(storage, c.info.run_id, key) == [0, 1, 2, 3], key


def test_damaged_evaluation_recomputed_in_the_same_run(tmp_path, capsys, ray_session):
    """A finished sweep's stored evaluation is damaged: the next sweep finds the chain incomplete,
    evaluates that round again (no pruning round is trained again) and logs it into the chain's
    existing run, without a second run or a second step."""
    ray_session()
    config = write_config(tmp_path, sweep_doc(base={**BASE, "pruning": {"rounds": 2}}, variants={"imp": {}},
                                              evaluation={"rounds": [2], "lmc": False}))
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--no-analysis")
    assert rc == 0, out[-3000:] + err[-3000:]
    (run,) = runs(storage, "chain")
    (evaluation,) = (storage / "store" / "chains").glob("*/evals/*/round_02.json")
    state = evaluation.parents[2] / "state.pt"
    state_mtime = state.stat().st_mtime_ns
    doc = json.loads(evaluation.read_text())
    doc["result"]["metrics"]["test_accuracy"] = 1.0
    evaluation.write_text(json.dumps(doc))

    rc, out, err = drive(capsys, config, storage, "--no-analysis")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "1 trials (0 already complete)" in out and "1 run, 0 reused, 0 failed" in out
    (after,) = runs(storage, "chain")
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert steps(storage, run.info.run_id, "test_accuracy") == [2]
    assert steps(storage, run.info.run_id, "sparsity") == [0, 1]
    assert state.stat().st_mtime_ns == state_mtime, "a pruning round was trained again"
    assert json.loads(evaluation.read_text())["result"]["metrics"]["test_accuracy"] != 1.0
