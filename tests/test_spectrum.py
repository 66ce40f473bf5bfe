"""Lanczos top eigenvalues, Hutch++ trace and SLQ density of the Hessian restricted to a mask, against
exact Hessians (quadratics, and a trained MLP of ~3000 weights in float64 with a 60 % random mask)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prunelab.data import load_dataset
from prunelab.errors import ConfigError
from prunelab.hessian import HessianOperator, _batch
from prunelab.hparams import DatasetHparams, ModelHparams
from prunelab.masks import Mask
from prunelab.models import build_model
from prunelab.spectrum import (DataHessianOperator, SpectrumHparams, hutchpp_trace, lanczos, slq_density,
                               spectrum_analysis, top_eigenvalues)

BATCH = 64


def _quadratic_op(a):
    return HessianOperator(lambda w: 0.5 * w @ (a @ w), torch.zeros(a.shape[0], dtype=torch.float64))


def _sym(eig, seed=0):
    n = len(eig)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eig, dtype=torch.float64)) @ q.T


def _random_mask(model, keep, seed):
    g = torch.Generator().manual_seed(seed)
    mask = Mask.ones_like(model)
    for name in mask:
        mask[name] = torch.rand(mask[name].shape, generator=g) < keep
    return mask


def _flat_loss(model, mask):
    """(w0 ⊙ support, support, loss(w, x, y)) with the masked weights as one flat vector."""
    names, params = list(mask), dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    shapes = [params[n].shape for n in names]
    sup = torch.cat([mask[n].reshape(-1) for n in names]).double()
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names]) * sup
    others = {k: v.detach() for k, v in params.items() if k not in names}

    def loss(w, x, y):
        state = dict(others)
        state.update({n: p.view(s) for n, p, s in zip(names, torch.split(w * sup, sizes), shapes)})
        return F.cross_entropy(functional_call(model, state, (x.double(),)), y)

    return w0, sup, loss


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetHparams(name="digits"))


@pytest.fixture(scope="module")
def trained(digits):
    """A tanh MLP (64-40-10, 2960 prunable weights) after 100 SGD steps, a 60 % random mask, one batch,
    and the exact Hessian restricted to the mask (one-hot HVPs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 10)).double()
    train = digits.train
    x_all, y_all = train.normalize(train.pixels(train.x)).double(), train.y
    params = list(model.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    g = torch.Generator().manual_seed(0)
    for _ in range(100):  # SGD with momentum, written out (torch.optim's import costs seconds)
        idx = torch.randint(0, len(y_all), (64,), generator=g)
        grads = torch.autograd.grad(F.cross_entropy(model(x_all[idx]), y_all[idx]), params)
        with torch.no_grad():
            for p, v, gr in zip(params, velocity, grads):
                p.sub_(0.05 * v.mul_(0.9).add_(gr))
    model.eval()
    mask = _random_mask(model, 0.6, seed=1)
    w0, sup, loss = _flat_loss(model, mask)
    x, y = _batch(digits, BATCH, 0, "cpu")
    op = HessianOperator(lambda w: loss(w, x, y), w0, chunk=256)
    index = sup.bool().nonzero().flatten()
    onehot = torch.zeros(index.numel(), op.size, dtype=torch.float64)
    onehot[torch.arange(index.numel()), index] = 1.0
    h = op(onehot)[:, index]
    assert torch.allclose(h, h.T, atol=1e-10)
    h = (h + h.T) / 2
    return {"model": model, "mask": mask, "op": op, "support": sup, "h": h,
            "eig": torch.linalg.eigvalsh(h).flip(0), "index": index}


# ---- against quadratics ---------------------------------------------------------------------------

def test_lanczos_breaks_down_on_few_distinct_eigenvalues():
    a = torch.diag(torch.tensor([1.0, 2.0, 5.0] * 4, dtype=torch.float64))
    alpha, beta = lanczos(_quadratic_op(a), steps=12, seed=0)
    assert len(alpha) == 3 and len(beta) == 2  # the Krylov space of a 3-value diagonal has dimension 3
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    assert torch.allclose(torch.linalg.eigvalsh(t), torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), atol=1e-10)
    again = lanczos(_quadratic_op(a), steps=12, seed=0)
    assert torch.equal(alpha, again[0]) and torch.equal(beta, again[1])


def test_top_eigenvalues_largest_algebraic_first():
    eig = torch.linspace(0.5, 3.0, 20, dtype=torch.float64)
    eig[0] = -10.0  # dominant in magnitude, but the smallest
    a = _sym(eig, seed=1)
    top = top_eigenvalues(_quadratic_op(a), 3, seed=0)
    assert top == pytest.approx(eig.flip(0)[:3].tolist(), rel=1e-8)


def test_pruned_coordinates_are_excluded():
    # coordinates 0 and 5 carry the largest curvature; pruning them leaves the 10x10 submatrix
    a = _sym(torch.linspace(0.5, 4.0, 12), seed=2)
    a[0, 0] += 100.0
    a[5, 5] += 50.0
    op = _quadratic_op(a)
    sup = torch.ones(12, dtype=torch.float64)
    sup[[0, 5]] = 0
    keep = sup.bool()
    sub_eig = torch.linalg.eigvalsh(a[keep][:, keep]).flip(0)
    assert top_eigenvalues(op, 10, sup, seed=3) == pytest.approx(sub_eig.tolist(), rel=1e-8)
    assert top_eigenvalues(op, 1)[0] == pytest.approx(float(torch.linalg.eigvalsh(a).max()), rel=1e-8)
    # 3n HVPs: the sketch spans the whole subspace, so the trace is exact
    assert hutchpp_trace(op, 30, sup, seed=0) == pytest.approx(float(a[keep][:, keep].trace()), rel=1e-10)
    # n steps of Lanczos: each run's nodes are the submatrix's eigenvalues, none of them the zeros
    # that the pruned rows would add
    dens = slq_density(op, sup, vectors=2, steps=50, seed=0)
    nodes = torch.tensor(dens["nodes"], dtype=torch.float64)
    assert len(nodes) == 2 * 10
    for run in nodes.view(2, 10):
        assert torch.allclose(run.sort().values, sub_eig.flip(0), atol=1e-8)
    assert sum(dens["weights"]) == pytest.approx(1.0, abs=1e-12)


# ---- against the exact Hessian of a trained MLP ---------------------------------------------------

def test_top_eigenvalues_match_exact(trained, digits):
    eig = trained["eig"]
    for seed in range(3):
        top = top_eigenvalues(trained["op"], 8, trained["support"], seed=seed)
        assert top == pytest.approx(eig[:8].tolist(), rel=1e-3)
    res = spectrum_analysis(trained["model"], digits, SpectrumHparams(batch_size=BATCH), mask=trained["mask"])
    assert res["unpruned"] == trained["mask"].remaining == len(eig)
    assert res["weights"] == trained["mask"].total
    assert res["top_eigenvalues"] == pytest.approx(eig[:5].tolist(), rel=1e-3)


def test_pruning_one_more_weight_gives_the_submatrix(trained):
    index, h = trained["index"], trained["h"]
    sup = trained["support"].clone()
    drop = int(index[int(h.diagonal().argmax())])  # the unpruned weight with the largest curvature
    sup[drop] = 0
    keep = torch.ones(len(index), dtype=torch.bool)
    keep[(index == drop).nonzero()] = False
    sub_eig = torch.linalg.eigvalsh(h[keep][:, keep]).flip(0)
    assert not torch.allclose(sub_eig[:5], trained["eig"][:5], rtol=1e-3)
    assert top_eigenvalues(trained["op"], 5, sup) == pytest.approx(sub_eig[:5].tolist(), rel=1e-3)
    assert hutchpp_trace(trained["op"], 600, sup) == pytest.approx(float(sub_eig.sum()), rel=0.02)


def test_hutchpp_trace_within_two_percent(trained):
    # over 20 seeds the relative error of 600 HVPs has rms 0.3 % here (max 0.65 %): 2 % is ~7 rms
    exact = float(trained["eig"].sum())
    for seed in range(5):
        est = hutchpp_trace(trained["op"], 600, trained["support"], seed=seed)
        assert abs(est - exact) <= 0.02 * abs(exact)


def test_slq_density_integrates_to_one_and_has_the_right_mean(trained):
    h, eig = trained["h"], trained["eig"]
    n, vectors = len(eig), 10
    dens = slq_density(trained["op"], trained["support"], vectors=vectors, steps=40, seed=0)
    nodes = torch.tensor(dens["nodes"], dtype=torch.float64)
    weights = torch.tensor(dens["weights"], dtype=torch.float64)
    grid, density = torch.tensor(dens["grid"], dtype=torch.float64), torch.tensor(dens["density"], dtype=torch.float64)
    assert len(nodes) == len(weights) == vectors * 40 and len(grid) == len(density) == 400
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-3)
    assert bool((density >= 0).all()) and grid[0] < nodes.min() and grid[-1] > nodes.max()
    # Ritz values lie inside the spectrum
    assert float(nodes.max()) <= float(eig[0]) + 1e-9 and float(nodes.min()) >= float(eig[-1]) - 1e-9
    assert dens["mean"] == pytest.approx(float((weights * nodes).sum()), rel=1e-12, abs=1e-15)
    # Σ w θ = mean over the runs of zᵀHz / n (Rademacher z): unbiased for tr(H)/n with standard
    # deviation sqrt(2 Σ_{i≠j} H_ij² / vectors) / n; allow 4 of them
    offdiag = float((h ** 2).sum() - (h.diagonal() ** 2).sum())
    sd = math.sqrt(2 * offdiag / vectors) / n
    assert abs(dens["mean"] - float(eig.sum()) / n) <= 4 * sd
    # the broadening width is honoured and the grid still integrates it
    narrow = slq_density(trained["op"], trained["support"], vectors=2, steps=20, seed=1, grid_points=2000, sigma=0.01)
    assert narrow["sigma"] == 0.01
    assert float(torch.trapezoid(torch.tensor(narrow["density"]), torch.tensor(narrow["grid"]))) == pytest.approx(
        1.0, abs=1e-3)


# ---- the whole training set, in chunks ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(digits):
    model = build_model(ModelHparams(name="convnet3", width=4), (1, 8, 8), 10, seed=0).double().eval()
    mask = _random_mask(model, 0.6, seed=2)
    return model, mask, digits.train.subset(torch.arange(23))


def test_data_operator_is_the_mean_of_chunk_operators(tiny):
    model, mask, small = tiny
    w0, _, loss = _flat_loss(model, mask)
    prepare = lambda xb: small.normalize(small.pixels(xb)).double()  # noqa: E731
    x_all = prepare(small.x)
    whole = HessianOperator(lambda w: loss(w, x_all, small.y), w0)
    v = torch.randn(3, w0.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = whole(v)
    # by hand: Σ_b (n_b / N) H_b v over chunks of 10 (10, 10, 3)
    by_hand = sum(len(yb) / 23 * HessianOperator(lambda w: loss(w, prepare(xb), yb), w0)(v)
                  for xb, yb in zip(small.x.split(10), small.y.split(10)))
    assert torch.allclose(by_hand, ref, rtol=1e-10, atol=1e-12)
    for batch_size in (1, 4, 10, 23, 100):
        op = DataHessianOperator(loss, w0, small.x, small.y, batch_size, chunk=2, prepare=prepare)
        assert op.size == w0.numel() and op.examples == 23
        assert torch.allclose(op(v), ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(op(v[0]), ref[0], rtol=1e-10, atol=1e-12)
        assert op.count == 4
        assert op.loss == pytest.approx(float(whole.loss.detach()), rel=1e-12)


def test_spectrum_analysis_full_data_matches_one_batch(tiny):
    model, mask, small = tiny
    hp = SpectrumHparams(k=3, trace_samples=30, density_vectors=2, density_steps=20, grid_points=100)
    one = spectrum_analysis(model, small, hp.replace(data="batch", batch_size=100), mask=mask)
    full = spectrum_analysis(model, small, hp.replace(data="full", batch_size=7), mask=mask)
    assert one["examples"] == full["examples"] == 23
    assert (one["data"], full["data"]) == ("batch", "full")
    assert full["loss"] == pytest.approx(one["loss"], rel=1e-10)
    assert full["top_eigenvalues"] == pytest.approx(one["top_eigenvalues"], rel=1e-8)
    assert full["trace"] == pytest.approx(one["trace"], rel=1e-8)
    assert full["density"]["mean"] == pytest.approx(one["density"]["mean"], rel=1e-8)
    assert full["hvps"] == one["hvps"] == 30 + 30 + 2 * 20
    assert full["hvps_by_part"] == {"top_eigenvalues": 30, "trace": 30, "density": 40}


def test_spectrum_analysis_output_is_plain_data(tiny, digits):
    model, mask, _ = tiny
    res = spectrum_analysis(model, digits, SpectrumHparams(batch_size=32), mask=mask)
    back = json.loads(json.dumps(res))
    assert set(back) >= {"top_eigenvalues", "trace", "trace_per_weight", "density", "unpruned", "weights",
                         "data", "examples", "hvps", "wall_s", "loss"}
    assert set(back["density"]) == {"nodes", "weights", "grid", "density", "sigma", "mean"}
    assert len(back["top_eigenvalues"]) == 5 and back["top_eigenvalues"] == sorted(back["top_eigenvalues"])[::-1]
    assert back["unpruned"] == mask.remaining < back["weights"] == mask.total
    assert back["trace_per_weight"] == pytest.approx(back["trace"] / mask.remaining)
    assert back["examples"] == 32 and back["data"] == "batch"
    assert back["hvps"] == 30 + 99 + 3 * 60
    unmasked = spectrum_analysis(model, digits, SpectrumHparams(batch_size=32, k=2, trace_samples=9,
                                                                density_steps=5))
    assert unmasked["unpruned"] == unmasked["weights"] == mask.total


@pytest.mark.parametrize("bad, field", [({"k": 0}, "k"), ({"lanczos_steps": 3}, "lanczos_steps"),
                                        ({"trace_samples": 2}, "trace_samples"), ({"data": "all"}, "data"),
                                        ({"density_vectors": 0}, "density_vectors"),
                                        ({"grid_points": 1}, "grid_points"), ({"batch_size": 0}, "batch_size")])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        SpectrumHparams.from_dict(bad)
    assert e.value.field == field


def test_analysis_validates_and_rejects_empty_masks(tiny, digits):
    model, mask, _ = tiny
    with pytest.raises(ConfigError) as e:
        spectrum_analysis(model, digits, SpectrumHparams(data="everything"), mask=mask)
    assert e.value.field == "data"
    empty = Mask((n, torch.zeros_like(v)) for n, v in mask.items())
    with pytest.raises(ConfigError) as e:
        spectrum_analysis(model, digits, SpectrumHparams(), mask=empty)
    assert e.value.field == "mask"
