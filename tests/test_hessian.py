"""Hessian diagonal and top eigenvalue against quadratics with a known Hessian, and on a tiny ConvNet."""

import pytest
import torch

from prunelab.data import load_dataset
from prunelab.errors import ConfigError
from prunelab.hessian import (HessianHparams, HessianOperator, diagonal_exact, diagonal_hutchinson,
                              diagonal_stats, hessian_analysis, top_eigenvalue)
from prunelab.hparams import DatasetHparams, ModelHparams
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model


def _spd(n, seed=0, diag_boost=5.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    eig[-1] = 7.0
    a = q @ torch.diag(eig) @ q.T
    return a + diag_boost * torch.eye(n, dtype=torch.float64), eig.max() + diag_boost


def _quadratic(a):
    return lambda w: 0.5 * w @ (a @ w)


def test_exact_diagonal_of_quadratic():
    a, _ = _spd(30)
    w = torch.randn(30, dtype=torch.float64)
    op = HessianOperator(_quadratic(a), w, chunk=7)
    assert torch.allclose(diagonal_exact(op), a.diagonal(), atol=1e-5)
    idx = torch.tensor([3, 17, 29])
    assert torch.allclose(diagonal_exact(op, idx), a.diagonal()[idx], atol=1e-5)
    assert torch.allclose(op(torch.eye(30, dtype=torch.float64)), a, atol=1e-10)


def test_hutchinson_diagonal_of_quadratic():
    # error per entry ~ sqrt(sum_{j!=i} A_ij^2 / samples); here that is < 0.15 for 4000 samples
    a, _ = _spd(30)
    w = torch.zeros(30, dtype=torch.float64)
    op = HessianOperator(_quadratic(a), w, chunk=64)
    est = diagonal_hutchinson(op, samples=4000, seed=0)
    offdiag = ((a ** 2).sum(1) - a.diagonal() ** 2).sqrt() / 4000 ** 0.5
    err = (est - a.diagonal()).abs()
    assert float(err.max()) < 0.15
    assert bool((err < 4 * offdiag + 1e-12).all())
    # a diagonal Hessian is recovered exactly: z_i^2 = 1
    d = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    op = HessianOperator(_quadratic(d), torch.zeros(10, dtype=torch.float64))
    assert torch.allclose(diagonal_hutchinson(op, samples=3, seed=1), d.diagonal())
    # seeded
    assert torch.equal(diagonal_hutchinson(op, 5, seed=2), diagonal_hutchinson(op, 5, seed=2))


def test_hutchinson_support_restricts_to_subspace():
    a, _ = _spd(12)
    op = HessianOperator(_quadratic(a), torch.zeros(12, dtype=torch.float64))
    sup = torch.zeros(12, dtype=torch.float64)
    sup[:4] = 1
    est = diagonal_hutchinson(op, samples=3000, seed=0, support=sup)
    assert torch.all(est[4:] == 0)
    assert torch.allclose(est[:4], a.diagonal()[:4], atol=0.2)


def test_power_iteration_finds_top_eigenvalue():
    a, top = _spd(40, seed=3)
    op = HessianOperator(_quadratic(a), torch.randn(40, dtype=torch.float64))
    res = top_eigenvalue(op, iters=500, tol=1e-10, seed=0)
    assert res["converged"]
    assert res["eigenvalue"] == pytest.approx(float(top), rel=1e-6)
    sup = torch.zeros(40, dtype=torch.float64)
    sup[:10] = 1
    sub = top_eigenvalue(op, iters=1000, tol=1e-12, seed=0, support=sup)
    assert sub["eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(a[:10, :10]).max()), rel=1e-6)


def test_power_iteration_with_dominant_negative_curvature():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.5, 3.0, 20, dtype=torch.float64)
    eig[0] = -10.0
    a = q @ torch.diag(eig) @ q.T
    res = top_eigenvalue(HessianOperator(_quadratic(a), torch.zeros(20, dtype=torch.float64)),
                         iters=2000, tol=1e-12, seed=0)
    assert res["dominant"] == pytest.approx(-10.0, rel=1e-6)
    assert res["eigenvalue"] == pytest.approx(3.0, rel=1e-5)


def test_stats():
    s = diagonal_stats(torch.tensor([-1.0, 1.0, 3.0]))
    assert s == pytest.approx({"min": -1.0, "max": 3.0, "mean": 1.0, "std": (8 / 3) ** 0.5,
                               "mean_abs": 5 / 3, "count": 3})
    with pytest.raises(ConfigError):
        diagonal_stats(torch.tensor([]))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    data = load_dataset(DatasetHparams())
    model = build_model(ModelHparams(name="convnet3", width=4), data.train.shape, 10, seed=0)
    return data, model


def test_model_exact_matches_hutchinson_and_masking(tiny):
    data, model = tiny
    base = HessianHparams(batch_size=64, power_iters=50, chunk=32)
    ex = hessian_analysis(model, data, base.replace(method="exact"), return_diagonal=True)
    assert ex["method"] == "exact" and ex["unpruned"] == ex["weights"] == len(ex["diagonal"])
    hu = hessian_analysis(model, data, base.replace(method="hutchinson", samples=400), return_diagonal=True)
    d_ex, d_hu = torch.tensor(ex["diagonal"]), torch.tensor(hu["diagonal"])
    assert float((d_ex - d_hu).abs().mean()) < 0.5 * float(d_ex.abs().mean()) + 1e-6
    assert ex["top_eigenvalue"] > 0 and ex["power_iteration"]["iterations"] > 0
    assert ex["top_eigenvalue"] >= ex["stats"]["max"] - 1e-4  # λ_max ≥ max H_ii
    assert hessian_analysis(model, data, base.replace(power_iters=0))["top_eigenvalue"] is None
    auto = hessian_analysis(model, data, base.replace(method="auto", exact_max_weights=10))
    assert auto["method"] == "hutchinson"

    w = {k: v.detach() for k, v in model.state_dict().items()}
    mask = magnitude_prune(Mask.ones_like(model), w, 0.5)
    pruned = hessian_analysis(model, data, base.replace(method="exact"), mask=mask, return_diagonal=True)
    assert pruned["unpruned"] == mask.remaining and len(pruned["diagonal"]) == mask.remaining
    allw = hessian_analysis(model, data, base.replace(method="exact", include_pruned=True), mask=mask,
                            return_diagonal=True)
    assert len(allw["diagonal"]) == mask.total
    assert sum(1 for v in allw["diagonal"] if v == 0.0) >= mask.total - mask.remaining
    import json
    json.dumps(pruned)


def test_bad_config():
    with pytest.raises(ConfigError):
        HessianHparams.from_dict({"samples": 0})
    with pytest.raises(ConfigError):
        HessianHparams.from_dict({"method": "lanczos"})
