"""2D loss landscape: plane geometry, reconstruction of the copies, grid, BN, bad input."""

import json

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.hparams import ChainHparams, ModelHparams, TrainingHparams
from prunelab.landscape import LandscapeHparams, combine_into, fit_plane, landscape, loss_landscape
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model

HP = ChainHparams(model=ModelHparams(name="convnet3", width=8),
                  training=TrainingHparams(lr=0.05, epochs=3, batch_size=64))


@pytest.fixture
def data(digits):  # the session's digits split (conftest)
    return digits


def _models(hp, data, seeds):
    return [build_model(hp.model, data.train.shape, 10, seed=s).eval() for s in seeds]


def _flat(state, names):
    return torch.cat([state[n].reshape(-1).double() for n in names])


@pytest.mark.parametrize("method", ["svd", "gram_schmidt"])
def test_three_copies_are_reconstructed_exactly(data, method):
    models = _models(HP, data, (1, 2, 3))
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    plane = fit_plane(states, method=method)
    assert float(plane.residuals.max()) < 1e-6 * float(plane.distances.max())
    target = {k: torch.empty_like(v) for k, v in states[0].items()}
    for i, s in enumerate(states):
        w = plane.weights(float(plane.coords[i, 0]), float(plane.coords[i, 1]))
        assert float(w.sum()) == pytest.approx(1.0)
        combine_into(target, states, w)
        for k in s:
            assert torch.allclose(target[k], s[k], atol=1e-5), k
    names = list(states[0])
    flat = torch.stack([_flat(s, names) for s in states])
    assert torch.allclose(plane.distances, torch.cdist(flat, flat), rtol=1e-6)
    # coordinates reproduce the distances within the plane
    assert torch.allclose(torch.cdist(plane.coords, plane.coords), plane.distances, rtol=1e-6)


def test_known_plane_geometry():
    # four points near a known plane of R^50; their off-plane offsets (±0.1) are orthogonal to the
    # in-plane coordinates, so the best-fit plane is that plane and every residual is 0.1
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 3, generator=g, dtype=torch.float64))
    pts = torch.tensor([[0.0, 0.0, 0.1], [3.0, 0.0, -0.1], [0.0, 4.0, -0.1], [3.0, 4.0, 0.1]], dtype=torch.float64)
    states = [{"w": (p @ q.T).float()} for p in pts]
    plane = fit_plane(states, method="svd")
    centered = pts - pts.mean(0)
    assert torch.allclose(plane.residuals, torch.full((4,), 0.1, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(torch.cdist(plane.coords, plane.coords), torch.cdist(pts[:, :2], pts[:, :2]), atol=1e-5)
    gs = fit_plane(states, method="gram_schmidt")
    sq = (centered ** 2).sum(1)
    assert torch.allclose((gs.coords ** 2).sum(1) + gs.residuals ** 2, sq, atol=1e-4)


def test_masked_plane_and_grid(data):
    models = _models(HP, data, (1, 2, 3, 4))
    mask = magnitude_prune(Mask.ones_like(models[0]), models[0].state_dict(), 0.6)
    for m in models:
        mask.apply(m)
    lh = LandscapeHparams(grid=4, margin=0.2, eval_examples=200)
    r = loss_landscape(models, data, lh, mask=mask)
    assert len(r["xs"]) == len(r["ys"]) == 4 and len(r["loss"]) == 4 and all(len(row) == 4 for row in r["loss"])
    coords = torch.tensor([c["coords"] for c in r["copies"]])
    assert r["xs"][0] < float(coords[:, 0].min()) and r["xs"][-1] > float(coords[:, 0].max())
    assert r["ys"][0] < float(coords[:, 1].min()) and r["ys"][-1] > float(coords[:, 1].max())
    assert len(r["distances"]) == 4 and r["eval_examples"] == 200
    assert all(c["residual"] >= 0 for c in r["copies"])
    json.dumps(r)


def test_surface_reproduces_each_copy_with_three_copies(data):
    models = _models(HP, data, (1, 2, 3))
    r = loss_landscape(models, data, LandscapeHparams(grid=2, eval_examples=300))
    for c in r["copies"]:
        assert c["loss_on_plane"] == pytest.approx(c["loss"], rel=1e-4, abs=1e-5)
        assert c["accuracy_on_plane"] == pytest.approx(c["accuracy"], abs=1 / 300 + 1e-9)


def test_landscape_end_to_end_trained(data):
    w = {k: v.clone() for k, v in build_model(HP.model, data.train.shape, 10, seed=1).state_dict().items()}
    mask = magnitude_prune(Mask.ones_like(build_model(HP.model, data.train.shape, 10, seed=1)), w, 0.5)
    r = landscape(HP, data, w, mask, LandscapeHparams(grid=3, seeds=(0, 1, 2), eval_examples=300))
    assert [c["seed"] for c in r["copies"]] == [0, 1, 2]
    for c in r["copies"]:
        assert c["loss_on_plane"] == pytest.approx(c["loss"], rel=1e-4, abs=1e-5)
        assert c["loss"] < 2.0 and 0 < c["test_accuracy"] <= 1
    assert r["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_bn_recompute_landscape(data):
    hp = ChainHparams(model=ModelHparams(name="resnet10_bn", width=4))
    models = _models(hp, data, (1, 2, 3))
    lh = LandscapeHparams(grid=2, eval_examples=100, bn_batches=2, bn_batch_size=64)
    plain = loss_landscape(models, data, lh)
    rec = loss_landscape(models, data, lh.replace(bn_mode="recompute"))
    assert rec["bn_recomputed"] and not plain["bn_recomputed"]
    assert rec["loss"] != plain["loss"]
    for c in plain["copies"]:  # interpolated BN statistics: the copies themselves on the surface
        assert c["loss_on_plane"] == pytest.approx(c["loss"], rel=1e-4, abs=1e-5)


def test_bad_input(data):
    models = _models(HP, data, (1, 2, 3))
    with pytest.raises(ConfigError):
        loss_landscape(models[:2], data, LandscapeHparams(grid=2))
    with pytest.raises(ConfigError):
        loss_landscape([models[0], models[0], models[0]], data, LandscapeHparams(grid=2))
    other = build_model(ModelHparams(name="convnet3", width=4), data.train.shape, 10, seed=0)
    with pytest.raises(ConfigError):
        loss_landscape(models[:2] + [other], data, LandscapeHparams(grid=2))
    with pytest.raises(ConfigError):
        loss_landscape(models, data, LandscapeHparams(grid=2), mask=Mask.ones_like(other))
    for bad in ({"grid": 1}, {"seeds": [0, 1]}, {"margin": -1}, {"basis": "pca"}):
        with pytest.raises(ConfigError):
            LandscapeHparams.from_dict(bad)
