"""Mid-round checkpoints: a round's training state stored part-way resumes to the same weights and the
same mask as a run that was never interrupted, and a damaged one only restarts the round."""

from __future__ import annotations

import pytest
import torch

from prunelab.chain import Chain
from prunelab.data import load_dataset
from prunelab.evaluation import EvalHparams
from prunelab.hparams import ChainHparams, DatasetHparams, ModelHparams, TrainingHparams
from prunelab.models import build_model
from prunelab.runner import run_chain
from prunelab.store import ChainStore
from prunelab.train import train

CHAIN = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 4}, "pruning": {"rounds": 2},
         "pruning_training": {"epochs": 3, "lr": 0.05}, "training": {"epochs": 1, "lr": 0.05}}


@pytest.fixture(scope="module")
def data():
    return load_dataset(DatasetHparams(name="digits"))


def test_train_resumes_to_the_same_weights(data):
    hp = TrainingHparams(epochs=3, lr=0.05, batch_size=128)  # standard augmentation: its generator is resumed too

    def model():
        return build_model(ModelHparams(name="convnet3", width=4), data.train.shape, 10, seed=1)

    saved = []
    whole = model()
    full = train(whole, data.train, hp, order_seed=3, aug_seed=4, checkpoint=saved.append, checkpoint_every_s=0)
    assert [p["step"] for p in saved] == [12, 24]  # after epochs 1 and 2 (12 steps each), not at the end
    resumed = model()
    res = train(resumed, data.train, hp, order_seed=3, aug_seed=4, resume=saved[0])
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert res.history == full.history and res.train_loss == full.train_loss and res.steps == full.steps


class Killed(Exception):
    pass


def kill_at(round_: int, epoch: int, seen: list):
    """A round callback raising in `round_` at the end of `epoch` (after that epoch's checkpoint)."""
    def for_round(r):
        def hook(e, metrics):
            seen.append((r, e))
            if (r, e) == (round_, epoch):
                raise Killed(f"round {r} epoch {e}")
        return hook
    return for_round


def test_a_killed_round_resumes_from_its_checkpoint_to_the_same_mask(tmp_path, data):
    hp = ChainHparams.from_dict(CHAIN)
    reference = Chain(hp, data=data)
    reference.run()
    ev = EvalHparams(lmc=False)
    store = ChainStore(tmp_path, hp)

    seen: list = []
    with pytest.raises(Killed):
        run_chain(hp, ev, [], store, data=data, round_callback=kill_at(1, 2, seen), checkpoint_every_s=0)
    assert store.load_state().round == 1 and store.load_partial(1)["step"] > 0

    seen = []
    chain = run_chain(hp, ev, [], ChainStore(tmp_path, hp), data=data, round_callback=kill_at(-1, -1, seen),
                      checkpoint_every_s=0)
    assert seen == [(1, 3)]  # only the epoch the killed run had not finished
    assert chain.mask.equal(reference.mask)
    assert store.load_partial(1) is None and not (store.dir / "round_partial.pt").exists()


def test_a_damaged_checkpoint_restarts_the_round(tmp_path, data):
    hp = ChainHparams.from_dict(CHAIN)
    store = ChainStore(tmp_path, hp)
    with pytest.raises(Killed):
        run_chain(hp, EvalHparams(lmc=False), [], store, data=data, round_callback=kill_at(0, 2, []),
                  checkpoint_every_s=0)
    path = store.dir / "round_partial.pt"
    path.write_bytes(path.read_bytes()[:-9])  # a torn write
    heard, seen = [], []
    chain = run_chain(hp, EvalHparams(lmc=False), [], ChainStore(tmp_path, hp), data=data,
                      round_callback=kill_at(-1, -1, seen), on_corrupt=heard.append, checkpoint_every_s=0)
    assert len(heard) == 1 and "round_partial.pt" in heard[0] and "restarts" in heard[0]
    assert seen[:3] == [(0, 1), (0, 2), (0, 3)]  # round 0 trained again from its start
    reference = Chain(hp, data=data)
    reference.run()
    assert chain.mask.equal(reference.mask)


@pytest.mark.parametrize("method,kw", [("dm", {}), ("idc", {"inner_loop": 2, "net_width": 4})])
def test_a_distillation_resumes_to_the_same_images(data, method, kw):
    from prunelab.synthetic import build_synthetic

    saved = []
    whole = build_synthetic(method, data.train, ipc=1, seed=2, budget=4, checkpoint=saved.append,
                            checkpoint_every_s=0, **kw)
    assert [p["next"] for p in saved] == [1, 2, 3]  # after each iteration but the last
    resumed = build_synthetic(method, data.train, ipc=1, seed=2, budget=4, resume=saved[1], **kw)
    assert torch.equal(whole.x, resumed.x) and torch.equal(whole.y, resumed.y)


def test_a_killed_distillation_continues_where_it_stopped(tmp_path, data, monkeypatch):
    from prunelab.synthetic import get_synthetic
    from prunelab.synthetic.store import SyntheticStore

    ds = DatasetHparams(name="digits")
    kw = dict(ipc=1, seed=0, budget=4, checkpoint_every_s=0)
    fresh = get_synthetic(ds, data.train, "dm", store=str(tmp_path / "fresh"), **kw)

    real_save = SyntheticStore.save_partial

    def save_then_die(self, key, payload):
        real_save(self, key, payload)
        if payload["next"] == 2:
            raise Killed("distillation killed after iteration 2")

    monkeypatch.setattr(SyntheticStore, "save_partial", save_then_die)
    with pytest.raises(Killed):
        get_synthetic(ds, data.train, "dm", store=str(tmp_path / "s"), **kw)
    (partial,) = (tmp_path / "s").glob("*/partial.pt")
    monkeypatch.undo()

    logs = []
    again = get_synthetic(ds, data.train, "dm", store=str(tmp_path / "s"), log=logs.append, **kw)
    assert torch.equal(again.x, fresh.x)
    assert not any("iteration 1/4" in line for line in logs)  # iterations 1 and 2 were not run again
    assert any("iteration 4/4" in line for line in logs) and not partial.exists()
