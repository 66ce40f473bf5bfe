"""A chain being computed holds its lease in the store; a trial that starts from its mask waits for it
instead of training the same chain a second time (prunelab.runner.start_mask)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import prunelab.runner as runner
from prunelab.chain import Chain
from prunelab.data import load_dataset
from prunelab.hparams import ChainHparams
from prunelab.store import ChainStore

START = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 2},
         "pruning_training": {"epochs": 1, "lr": 0.1}, "training": {"epochs": 1, "lr": 0.1}}


def combined() -> ChainHparams:
    return ChainHparams.from_dict({**START, "pruning": {"rounds": 4}, "start_from": START, "start_round": 2})


def mark_as(store: ChainStore, pid: str, age_s: float = 0.0) -> None:
    """The chain's lease as another process of this host would hold it."""
    gens = sorted(int(n) for n in store.files.list("lease") if n.isdigit())
    gen = gens[-1] + 1 if gens else 0
    doc = {"host": socket.gethostname(), "pid": int(pid), "token": f"other-{pid}", "renewed": time.time() - age_s,
           "released": False}
    store.files.write(f"lease/{gen:08d}", json.dumps(doc).encode())


def newest(store: ChainStore) -> dict:
    gens = sorted(n for n in store.files.list("lease") if n.isdigit())
    return json.loads(store.files.read(f"lease/{gens[-1]}"))


def test_the_lease_lives_while_the_block_runs(tmp_path):
    store = ChainStore(tmp_path, ChainHparams.from_dict(START))
    other = ChainStore(tmp_path, ChainHparams.from_dict(START))
    assert not other.computing_elsewhere()
    with store.computing(every_s=0.05):
        first = newest(store)["renewed"]
        deadline = time.time() + 10
        while newest(store)["renewed"] == first and time.time() < deadline:  # no fixed sleep: loaded CI
            time.sleep(0.02)
        assert newest(store)["renewed"] != first  # renewed
        assert other.computing_elsewhere()  # held by another ChainStore's lease, in this process
    assert newest(store)["released"] and not other.computing_elsewhere()
    mark_as(other, str(os.getppid()))  # a live process that is not this one
    assert other.computing_elsewhere()
    mark_as(other, str(os.getppid()), age_s=1000)
    assert not other.computing_elsewhere()  # stale: no renewal for too long
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mark_as(other, gone.stdout.strip())
    assert not other.computing_elsewhere()  # a fresh lease of a process of this host that has exited
    other.files.write("lease/99999999", b"garbled")
    assert not other.computing_elsewhere()


@pytest.fixture
def data():
    return load_dataset(ChainHparams.from_dict(START).dataset)


def test_a_dependent_waits_for_the_start_chain(tmp_path, data, monkeypatch):
    hp = combined()
    start_hp = hp.start_chain()
    reference = Chain(start_hp, "cpu", data=data)
    reference.run()
    store = ChainStore(tmp_path, start_hp)
    mark_as(store, str(os.getppid()))  # another trial is computing the start chain

    def finish_elsewhere():
        time.sleep(0.3)
        store.save_state(reference.state)

    monkeypatch.setattr(runner, "WAIT_POLL_S", 0.05)
    monkeypatch.setattr(runner, "Chain", lambda *a, **k: pytest.fail("the start chain was computed twice"))
    t = threading.Thread(target=finish_elsewhere)
    t.start()
    mask = runner.start_mask(hp, str(tmp_path), data, "cpu")
    t.join()
    assert mask.equal(reference.mask)


def test_a_dependent_computes_the_start_chain_when_nobody_does(tmp_path, data, monkeypatch):
    hp = combined()
    store = ChainStore(tmp_path, hp.start_chain())
    mark_as(store, str(os.getppid()), age_s=1000)  # a mark nobody has refreshed for long
    monkeypatch.setattr(runner, "WAIT_POLL_S", 30)  # a wait would show as a slow test
    t0 = time.time()
    mask = runner.start_mask(hp, str(tmp_path), data, "cpu")
    assert time.time() - t0 < 25
    reference = Chain(hp.start_chain(), "cpu", data=data)
    reference.run()
    assert mask.equal(reference.mask)
    assert store.mask_at(2).equal(mask) and not store.computing_elsewhere() and newest(store)["released"]


def test_a_damaged_start_mask_is_rewritten_from_the_start_chains_state(tmp_path, data, monkeypatch):
    hp = combined()
    reference = Chain(hp.start_chain(), "cpu", data=data)
    reference.run()
    store = ChainStore(tmp_path, hp.start_chain())
    store.save_state(reference.state)
    path = store.mask_path(2)
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    monkeypatch.setattr(runner, "Chain", lambda *a, **k: pytest.fail("the start chain was computed again"))
    mask = runner.start_mask(hp, str(tmp_path), data, "cpu")
    assert mask.equal(reference.mask) and store.mask_at(2).equal(reference.mask)
