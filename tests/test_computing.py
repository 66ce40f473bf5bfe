"""A chain being computed is marked in the store; a trial that starts from its mask waits for it
instead of training the same chain a second time (sweeps.trainable._start_mask)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from prunelab.chain import Chain
from prunelab.data import load_dataset
from prunelab.hparams import ChainHparams
from prunelab.store import ChainStore

START = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 2},
         "pruning_training": {"epochs": 1, "lr": 0.1}, "training": {"epochs": 1, "lr": 0.1}}


def combined() -> ChainHparams:
    return ChainHparams.from_dict({**START, "pruning": {"rounds": 4}, "start_from": START, "start_round": 2})


def mark_as(store: ChainStore, pid: str, age_s: float = 0.0) -> None:
    store.dir.mkdir(parents=True, exist_ok=True)
    (store.dir / "computing").write_text(f"{socket.gethostname()} {pid} {time.time() - age_s!r}")


def test_the_mark_lives_while_the_block_runs(tmp_path):
    store = ChainStore(tmp_path, ChainHparams.from_dict(START))
    other = ChainStore(tmp_path, ChainHparams.from_dict(START))
    assert not other.computing_elsewhere()
    with store.computing(every_s=0.05):
        first = (store.dir / "computing").read_text().split()[2]
        time.sleep(0.2)
        assert (store.dir / "computing").read_text().split()[2] != first  # refreshed
        assert not store.computing_elsewhere()  # this process's own mark
    assert not (store.dir / "computing").exists()
    mark_as(other, "999999999")
    assert other.computing_elsewhere()
    mark_as(other, "999999999", age_s=1000)
    assert not other.computing_elsewhere()  # stale: that process is gone


@pytest.fixture
def data():
    return load_dataset(ChainHparams.from_dict(START).dataset)


def test_a_dependent_waits_for_the_start_chain(tmp_path, data, monkeypatch):
    import sweeps.trainable as trainable

    hp = combined()
    start_hp = hp.start_chain()
    reference = Chain(start_hp, "cpu", data=data)
    reference.run()
    store = ChainStore(tmp_path, start_hp)
    mark_as(store, "999999999")  # another trial is computing the start chain

    def finish_elsewhere():
        time.sleep(0.3)
        store.save_state(reference.state)

    monkeypatch.setattr(trainable, "WAIT_POLL_S", 0.05)
    monkeypatch.setattr(trainable, "Chain", lambda *a, **k: pytest.fail("the start chain was computed twice"))
    t = threading.Thread(target=finish_elsewhere)
    t.start()
    mask = trainable._start_mask(hp, str(tmp_path), data, "cpu")
    t.join()
    assert mask.equal(reference.mask)


def test_a_dependent_computes_the_start_chain_when_nobody_does(tmp_path, data, monkeypatch):
    import sweeps.trainable as trainable

    hp = combined()
    store = ChainStore(tmp_path, hp.start_chain())
    mark_as(store, "999999999", age_s=1000)  # a trial that died long ago
    monkeypatch.setattr(trainable, "WAIT_POLL_S", 30)  # a wait would show as a slow test
    t0 = time.time()
    mask = trainable._start_mask(hp, str(tmp_path), data, "cpu")
    assert time.time() - t0 < 25
    reference = Chain(hp.start_chain(), "cpu", data=data)
    reference.run()
    assert mask.equal(reference.mask)
    assert store.mask_at(2).equal(mask) and not (store.dir / "computing").exists()
