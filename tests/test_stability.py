"""Instability analysis: interpolation, barriers, BN handling, masks, and trained pairs on digits."""

import json

import pytest
import torch

from prunelab import stability
from prunelab.chain import train_subnetwork
from prunelab.errors import ConfigError
from prunelab.hparams import ChainHparams, ModelHparams, TrainingHparams
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model
from prunelab.stability import (LMCHparams, barriers, bn_batches, flat_barriers, instability,
                                interpolate_states, lmc_alphas, lmc_curve, recompute_bn_stats, train_pair)

HP = ChainHparams(model=ModelHparams(name="convnet3", width=8),
                  training=TrainingHparams(lr=0.05, epochs=8, batch_size=64))


@pytest.fixture
def data(digits):  # the session's digits split (conftest)
    return digits


def _init(hp, data, seed):
    return {k: v.clone() for k, v in build_model(hp.model, data.train.shape, 10, seed=seed).state_dict().items()}


def _model(hp, data, seed=0):
    return build_model(hp.model, data.train.shape, 10, seed=seed)


def test_alphas_and_barrier_definitions():
    assert lmc_alphas(11) == pytest.approx([i / 10 for i in range(11)])
    assert 0.5 in lmc_alphas(11) and len(lmc_alphas(11)) == 11
    assert lmc_alphas(4) == pytest.approx([0, 1 / 3, 0.5, 2 / 3, 1])  # 0.5 added when off the grid
    assert lmc_alphas(2) == [0.0, 0.5, 1.0]
    a = [0.0, 0.25, 0.5, 0.75, 1.0]
    b = barriers(a, [1.0, 2.0, 2.5, 3.5, 3.0])
    assert b["mid"] == pytest.approx(2.5 - 2.0)
    assert b["max"] == pytest.approx(3.5 - 2.5)  # at α=0.75 the line is at 2.5
    assert barriers(a, [1.0, 0.5, 0.2, 0.5, 1.0])["mid"] == pytest.approx(-0.8)
    assert barriers(a, [1.0, 0.5, 0.2, 0.5, 1.0])["max"] == 0.0


def test_self_interpolation_has_zero_barrier(data):
    m = _model(HP, data)
    r = lmc_curve(m, m, data, LMCHparams(num_points=5, eval_examples=300))
    for kind in ("barrier_mid", "barrier_max"):
        for v in r[kind].values():
            assert abs(v) < 1e-6
    assert max(r["train_loss"]) - min(r["train_loss"]) < 1e-6
    assert set(r["barrier_mid"]) == {"train_loss", "train_error", "test_loss", "test_error"}
    assert r["eval_examples"] == {"train": 300, "test": 300}
    json.dumps(r)
    flat = flat_barriers(r)
    assert "lmc_train_loss_barrier_mid" in flat and len(flat) == 8


def test_interpolation_matches_hand_computation_and_keeps_mask(data):
    hp = ChainHparams(model=ModelHparams(name="resnet10_bn", width=4))
    a, b = _init(hp, data, 1), _init(hp, data, 2)
    g = torch.Generator().manual_seed(0)
    for s in (a, b):
        for k, v in s.items():
            if k.endswith("running_mean") or k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.1)
    a["bn1.num_batches_tracked"].fill_(10)
    b["bn1.num_batches_tracked"].fill_(21)
    out = interpolate_states(a, b, 0.3)
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(out[k], 0.7 * a[k] + 0.3 * b[k], atol=1e-6), k
    assert int(out["bn1.num_batches_tracked"]) == round(0.7 * 10 + 0.3 * 21)
    assert out["bn1.num_batches_tracked"].dtype == torch.int64
    for k in a:  # endpoints bit for bit
        assert torch.equal(interpolate_states(a, b, 0.0)[k], a[k])
        assert torch.equal(interpolate_states(a, b, 1.0)[k], b[k])

    model = build_model(hp.model, data.train.shape, 10, seed=1)
    mask = magnitude_prune(Mask.ones_like(model), a, 0.5)
    for alpha in (0.0, 0.1, 0.5, 0.9, 1.0, 1.5, -0.5):
        s = interpolate_states(a, b, alpha, mask)  # endpoints deliberately not masked
        for n, m in mask.items():
            assert torch.all(s[n][~m] == 0)
            assert torch.count_nonzero(s[n][m]) > 0


def test_pruned_weights_zero_at_every_alpha_in_lmc_curve(data, monkeypatch):
    a, b = _model(HP, data, 1), _model(HP, data, 2)
    mask = magnitude_prune(Mask.ones_like(a), a.state_dict(), 0.7)
    mask.apply(a)
    mask.apply(b)
    with torch.no_grad():  # a tensor the copies would never have: the curve must still zero it
        dict(b.named_parameters())["features.0.weight"].add_(1.0)
    seen = []
    original = stability.EvalSet.evaluate

    def spy(self, model):
        params = dict(model.named_parameters())
        seen.append(all(bool(torch.all(params[n][~m] == 0)) for n, m in mask.items()))
        return original(self, model)

    monkeypatch.setattr(stability.EvalSet, "evaluate", spy)
    lmc_curve(a, b, data, LMCHparams(num_points=6, eval_examples=100), mask=mask)
    assert len(seen) == 2 * 7 and all(seen)


def test_bn_recompute(data):
    hp = ChainHparams(model=ModelHparams(name="resnet10_bn", width=4))
    model = build_model(hp.model, data.train.shape, 10, seed=0).eval()
    batches = bn_batches(data.train, "cpu", num_batches=3, batch_size=50)
    assert len(batches) == 3 and all(x.shape[0] == 50 for x in batches)
    before = model.bn1.running_mean.clone()
    assert recompute_bn_stats(model, batches)
    # exact average over the batches: running_mean of the first BN = mean of conv1's output
    with torch.no_grad():
        feats = torch.cat([model.conv1(x) for x in batches])
    assert torch.allclose(model.bn1.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(model.bn1.running_mean, before)
    assert model.bn1.momentum == 0.1 and not model.training
    assert not recompute_bn_stats(_model(HP, data), batches)  # ConvNet-3 has no BN

    a, b = build_model(hp.model, data.train.shape, 10, seed=1), build_model(hp.model, data.train.shape, 10, seed=2)
    for m in (a, b):
        recompute_bn_stats(m, batches)
    lh = LMCHparams(num_points=3, eval_examples=100, bn_batches=2, bn_batch_size=64)
    plain = lmc_curve(a, b, data, lh)
    rec = lmc_curve(a, b, data, lh.replace(bn_mode="recompute"))
    assert rec["bn_recomputed"] and not plain["bn_recomputed"]
    assert rec["train_loss"][1] != pytest.approx(plain["train_loss"][1])


def test_bad_input(data):
    for bad in ({"num_points": 1}, {"seeds": [0]}, {"splits": ["val"]}, {"bn_mode": "foo"},
                {"eval_examples": 0}):
        with pytest.raises(ConfigError):
            LMCHparams.from_dict(bad)
    a = _model(HP, data)
    other = build_model(ModelHparams(name="convnet3", width=4), data.train.shape, 10, seed=0)
    with pytest.raises(ConfigError):
        lmc_curve(a, other, data, LMCHparams(num_points=3))
    with pytest.raises(ConfigError):
        lmc_curve(a, a, data, LMCHparams(num_points=3), mask=Mask.ones_like(other))
    with pytest.raises(ConfigError):
        interpolate_states(a.state_dict(), other.state_dict(), 0.5)
    with pytest.raises(ConfigError):
        train_pair(HP, data, a.state_dict(), Mask.ones_like(a), seeds=(0, 1, 2))


def test_trained_pairs_on_digits(data):
    mask = Mask.ones_like(_model(HP, data))
    w1, w2 = _init(HP, data, 1), _init(HP, data, 2)
    lh = LMCHparams(num_points=5)
    # same init, same data order: bitwise identical copies, no barrier
    (a, b), metrics = train_pair(HP, data, w1, mask, seeds=(0, 0))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    same = lmc_curve(a, b, data, lh)
    assert all(abs(v) < 1e-9 for v in same["barrier_mid"].values())
    # different inits: different basins, a clear barrier
    b2, _ = train_subnetwork(HP, data, w2, mask, seed=0)
    diff = lmc_curve(a, b2, data, lh)
    assert diff["train_loss"][0] < 0.5 and diff["train_loss"][-1] < 0.5
    assert diff["barrier_mid"]["train_loss"] > 0.5
    assert diff["barrier_max"]["test_error"] > 0.2
    assert diff["barrier_max"]["train_loss"] >= diff["barrier_mid"]["train_loss"] - 1e-12


def test_instability_end_to_end(data):
    w = _init(HP, data, 1)
    model = _model(HP, data, 1)
    mask = magnitude_prune(Mask.ones_like(model), w, 0.5)
    r = instability(HP, data, w, mask, LMCHparams(num_points=3, splits=("test",)))
    assert [c["seed"] for c in r["copies"]] == [0, 1]
    assert r["copies"][0]["test_accuracy"] != r["copies"][1]["test_accuracy"] or \
        r["copies"][0]["test_loss"] != r["copies"][1]["test_loss"]
    assert r["test_loss"][0] == pytest.approx(r["copies"][0]["test_loss"], abs=1e-6)
    assert r["test_loss"][-1] == pytest.approx(r["copies"][1]["test_loss"], abs=1e-6)
    assert "train_loss" not in r and set(r["barrier_mid"]) == {"test_loss", "test_error"}
    assert r["sparsity"] == pytest.approx(0.5, abs=0.01)
    json.dumps(r)
