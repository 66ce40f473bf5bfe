"""The tracking server goes away mid-sweep.

Chains must keep training (the result store is the source of truth), their MLflow runs must be
complete once the server is back, with every step logged once; if it never comes back, the sweep
ends non-zero with the list of what was not logged and where its results are, and running the same
command again once the server answers logs them without training.

The unit test simulates the outage on a SQLite store; the sweep tests stop and restart a real
`mlflow server` on the same port while the driver runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeptools import BASE, FIGURE, ROOT, MlflowServer, cache_dir, write_config, sweep_doc  # noqa: F401

ROUNDS = 6
EVAL_ROUND = 2
# rounds of a few seconds each, so that most of a chain is still ahead when the server goes away
CHAIN_BASE = {**BASE, "pruning": {"rounds": ROUNDS}, "pruning_training": {"epochs": 5, "lr": 0.1},
              "training": {"epochs": 2, "lr": 0.1}}
# where what happens after the server is gone does not matter (it never comes back), shorter rounds
SHORT_BASE = {**CHAIN_BASE, "pruning_training": {"epochs": 2, "lr": 0.1}}


# ---------------------------------------------------------------------------------------------
# TrialLog against a store that refuses calls for a while


class FlakyClient:
    """An MlflowClient whose every call raises ConnectionError while `down` is set."""

    def __init__(self, real, state):
        self._real, self._state = real, state

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._state["calls"] += 1
            if self._state["down"]:
                raise ConnectionError("Connection refused (simulated outage)")
            return attr(*args, **kwargs)

        return call


def test_trial_log_buffers_while_away_and_catches_up(tmp_path, monkeypatch, digits):
    from mlflow import MlflowClient

    from prunelab.chain import Chain
    from prunelab.evaluation import EvalHparams, evaluate_round, result_key
    from prunelab.hparams import ChainHparams
    from prunelab.store import ChainStore
    from sweeps import sync, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "outage")
    parent = MlflowClient(uri).create_run(exp).info.run_id
    hp = ChainHparams.from_dict({**BASE, "pruning": {"rounds": 3}})
    ev = {"rounds": [2], "lmc": False}
    spec = {"key": "k1", "variant": "imp", "label": "imp,seed=0", "figure": FIGURE, "chain": hp.to_dict(),
            "chain_hash": hp.hash(), "eval": ev, "rounds": [2],
            "store": str(tmp_path / "store"), "tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent}
    state = {"down": True, "calls": 0}
    monkeypatch.setattr(tracking, "client", lambda u: FlakyClient(MlflowClient(u), state))
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)  # retries' back-off: not worth waiting for
    monkeypatch.setattr(sync, "BACKOFF_FIRST_S", 60.0)
    clock = {"now": 1000.0}
    monkeypatch.setattr(sync.time, "time", lambda: clock["now"])

    log = sync.TrialLog(spec, quiet=True)
    assert not log.open() and log.run_id is None and log.outage  # no run yet: the trial goes on all the same
    store = ChainStore(spec["store"], hp)
    chain = Chain(hp, data=digits)
    log.note("a warning found while MLflow was away", "warnings/corrupt_state.txt")
    assert (store.dir / "notes" / "k1" / "warnings__corrupt_state.txt").is_file()  # survives this process
    while not chain.done:  # rounds go on while MLflow refuses every call
        chain.step()
        store.save_state(chain.state)
        if chain.round == 2:
            e = EvalHparams.from_dict(ev)
            store.save_eval(result_key(e), 2, evaluate_round(hp, e, digits, chain.state.rewind_point, chain.mask, 2))
        before = state["calls"]
        clock["now"] += 1
        assert log.sync(chain.state.history) is False and log.behind
        assert state["calls"] == before, "a sync inside the back-off window still called MLflow"
    clock["now"] += 61  # the back-off window has passed: the next round boundary tries again
    assert log.sync(chain.state.history) is False and "simulated outage" in log.last_error
    assert log._retry_at == clock["now"] + 120  # and the window doubled

    state["down"] = False
    assert log.sync(chain.state.history) is False  # still inside the window: no call
    clock["now"] += 121
    assert log.sync(chain.state.history) and not log.behind  # caught up at a round boundary, not forced
    c = MlflowClient(uri)
    chains = "tags.`prunelab.role` = 'chain'"
    (run,) = c.search_runs([exp], chains)
    rid = run.info.run_id
    assert sorted(m.step for m in c.get_metric_history(rid, "pruning_accuracy")) == [0, 1, 2]
    assert [m.step for m in c.get_metric_history(rid, "test_accuracy")] == [2]
    assert {a.path for a in c.list_artifacts(rid, "masks")} == {"masks/round_02.pt", "masks/round_02.pt.sha256"}
    assert {a.path for a in c.list_artifacts(rid, "warnings")} == {"warnings/corrupt_state.txt"}
    assert not list((store.dir / "notes" / "k1").iterdir())
    assert log.finish(chain.state.history, "FINISHED")
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["prunelab.status"] == "finished"
    # catching up again repeats nothing
    assert not sync.catch_up(spec, "FINISHED", run_id=rid).behind
    assert sorted(m.step for m in c.get_metric_history(rid, "pruning_accuracy")) == [0, 1, 2]
    assert len(c.search_runs([exp], chains)) == 1
    # a request the store refuses (the run was deleted) is not an outage: nobody should wait for it
    c.delete_run(rid)
    refused = sync.catch_up(spec, "FINISHED", run_id=rid)
    assert refused.behind and not refused.outage, refused.last_error


def test_outage_is_told_from_a_refusal():
    from mlflow.exceptions import MlflowException

    from sweeps.tracking import is_outage

    assert is_outage(ConnectionRefusedError(111, "Connection refused"))
    try:
        try:
            raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded")
        except ConnectionError as inner:
            raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed") from inner
    except MlflowException as e:
        assert is_outage(e)
    assert not is_outage(MlflowException("Run 'abc' not found", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not is_outage(KeyError("pruning_accuracy"))


def test_driver_waits_no_longer_than_asked(tmp_path, monkeypatch):
    """Many chains pending and a server that does not answer: one probe per pass, the deadline kept,
    every chain listed with its store folder."""
    from sweeps import sync

    calls = {"probe": 0, "catch_up": 0}

    def probe(uri):
        calls["probe"] += 1
        return "ConnectionError: Connection refused"

    monkeypatch.setattr(sync, "probe", probe)
    monkeypatch.setattr(sync, "catch_up", lambda *a, **k: calls.__setitem__("catch_up", calls["catch_up"] + 1))
    pending = [({"key": f"k{i}", "label": f"imp,seed={i}", "store": str(tmp_path / "store"), "chain_hash": f"h{i}"},
                "FINISHED", "", None) for i in range(50)]
    t0 = time.time()
    lines = sync.catch_up_all(pending, "http://127.0.0.1:1", wait_s=1.0)
    assert time.time() - t0 < 15
    assert calls["catch_up"] == 0 and calls["probe"] >= 1
    assert len(lines) == 50 and lines[7] == (f"imp,seed=7 [k7]: ConnectionError: Connection refused; "
                                             f"results in {tmp_path / 'store' / 'chains' / 'h7'}")


# ---------------------------------------------------------------------------------------------
# a real `mlflow server` stopped mid-sweep


def _driver(config: str, storage: Path, uri: str, log: Path, *extra: str) -> subprocess.Popen:
    code = f"import sys; from sweeps.driver import main; sys.exit(main({FIGURE!r}, sys.argv[1:]))"
    env = dict(os.environ, PRUNELAB_CACHE=str(storage.parent / "cache"), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", code, "--config", config, "--storage-path", str(storage),
                             "--tracking-uri", uri, "--num-cpus", "2", "--no-analysis", *extra],
                            env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rounds_stored(storage: Path) -> dict[str, int]:
    """chain hash -> rounds in the store's history (what the chains computed, MLflow or not)."""
    out = {}
    for h in (storage / "store" / "chains").glob("*/history.jsonl"):
        out[h.parent.name] = len(h.read_text().splitlines())
    return out


def _wait_first_round_logged(uri: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the driver ended early: " + log.read_text()[-3000:]
        assert time.time() < deadline, "no chain logged a round in time: " + log.read_text()[-3000:]
        exp = c.get_experiment_by_name(f"prunelab-{FIGURE}")
        if exp is not None:
            chains = c.search_runs([exp.experiment_id], "tags.`prunelab.role` = 'chain'")
            if any("pruning_accuracy" in r.data.metrics for r in chains):
                return
        time.sleep(0.3)


def _check_runs(uri: str, storage: Path) -> list:
    """One finished run per chain, each round and evaluation logged once, artifacts there."""
    from mlflow import MlflowClient

    from prunelab.chain import Chain
    from prunelab.hparams import ChainHparams
    from prunelab.masks import Mask

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(f"prunelab-{FIGURE}")
    chains = c.search_runs([exp.experiment_id], "tags.`prunelab.role` = 'chain'")
    keys = [r.data.tags["prunelab.trial_key"] for r in chains]
    assert len(chains) == 2 and len(set(keys)) == 2, f"one run per chain, got {keys}"
    for run in chains:
        rid = run.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["prunelab.status"] == "finished"
        for key in ("sparsity", "pruning_accuracy", "pruning_images_seen"):
            assert sorted(m.step for m in c.get_metric_history(rid, key)) == list(range(ROUNDS)), key
        for key in ("eval_sparsity", "test_accuracy", "barrier_mid_train_loss"):
            assert [m.step for m in c.get_metric_history(rid, key)] == [EVAL_ROUND], key
        assert {a.path for a in c.list_artifacts(rid, "lmc")} == {f"lmc/round_{EVAL_ROUND:02d}.json"}
        assert {a.path for a in c.list_artifacts(rid, "masks")} == {f"masks/round_{EVAL_ROUND:02d}.pt{x}"
                                                                    for x in ("", ".sha256")}
        # nothing lost: the stored final mask is the one an uninterrupted chain finds
        hp = ChainHparams.from_dict(json.loads((storage / "store" / "chains" / run.data.tags["prunelab.chain_hash"]
                                                / "config.json").read_text()))
        clean = Chain(hp)
        clean.run()
        stored = Mask.load(storage / "store" / "chains" / hp.hash() / "rounds" / f"round_{ROUNDS:02d}.mask.pt")
        assert stored.equal(clean.mask)
    return chains


def _sweep_then_kill_server(tmp_path, wait_s: str, base: dict = CHAIN_BASE):
    """Start a `mlflow server` and the two-chain sweep against it; SIGKILL the server once a chain
    has logged its first round. Returns (server, uri, config, storage, driver log, driver process)."""
    server = MlflowServer(tmp_path)
    uri = server.start()
    config = write_config(tmp_path, sweep_doc(base=base, grid={"seed": [0, 1]}, variants={"imp": {}},
                                              evaluation={"rounds": [EVAL_ROUND], "lmc": True}))
    storage = tmp_path / "storage"
    log = tmp_path / "driver.log"
    proc = _driver(config, storage, uri, log, "--tracking-wait", wait_s)
    try:
        _wait_first_round_logged(uri, proc, log)
    except BaseException:
        proc.kill()
        server.stop()
        raise
    server.stop(kill=True)
    return server, uri, config, storage, log, proc


@pytest.mark.slow
def test_tracking_server_away_mid_sweep_then_back(tmp_path):
    server, uri, config, storage, log, proc = _sweep_then_kill_server(tmp_path, "300")
    try:
        at_stop = _rounds_stored(storage)
        # the chains go on without MLflow: every round and evaluation reaches the store
        deadline = time.time() + 240
        while not (len(_rounds_stored(storage)) == 2 and all(n == ROUNDS for n in _rounds_stored(storage).values())
                   and len(list((storage / "store" / "chains").glob("*/evals/*/round_*.json"))) == 2):
            assert proc.poll() is None, "the driver ended while MLflow was away: " + log.read_text()[-3000:]
            assert time.time() < deadline, "the chains stopped while MLflow was away: " + log.read_text()[-3000:]
            time.sleep(0.5)
        assert sum(_rounds_stored(storage).values()) > sum(at_stop.values()), "no round was trained while away"
        while "does not answer" not in log.read_text():  # the driver now waits for the server
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        server.start()
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        out = log.read_text()
        assert rc == 0, out[-4000:]
        assert "2 trials, 2 run, 0 reused, 0 failed" in out
        _check_runs(uri, storage)
    finally:
        server.stop()


@pytest.mark.slow
def test_tracking_server_never_back_lists_what_was_not_logged(tmp_path):
    server, uri, config, storage, log, proc = _sweep_then_kill_server(tmp_path, "5", SHORT_BASE)
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 1, out[-4000:]
    assert "0 failed, 2 not logged to MLflow" in out, out[-3000:]
    listed = re.findall(r"^  imp,seed=\d \[[0-9a-f]+\]: .*; results in (\S+)$", out, re.M)
    assert len(listed) == 2, out[-3000:]
    for folder in map(Path, listed):  # where the local copy is: every round and evaluation
        assert folder.parent == storage / "store" / "chains"
        assert len((folder / "history.jsonl").read_text().splitlines()) == ROUNDS
        assert (folder / "evals").is_dir() and list((folder / "evals").glob(f"*/round_{EVAL_ROUND:02d}.json"))
    state_mtimes = {p: p.stat().st_mtime_ns for p in (storage / "store" / "chains").glob("*/state.pt")}

    # the server is back: the same command logs the chains from the store, training nothing
    server.start()
    try:
        proc = _driver(config, storage, uri, tmp_path / "again.log")
        rc = proc.wait(timeout=300)
        again = (tmp_path / "again.log").read_text()
        assert rc == 0, again[-4000:]
        assert "0 failed" in again
        assert {p: p.stat().st_mtime_ns for p in state_mtimes} == state_mtimes, "a chain was trained again"
        _check_runs(uri, storage)
    finally:
        server.stop()
