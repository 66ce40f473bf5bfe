"""Masks at initialization: score functions against hand computations, ERK allocation and selection."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.allocation import erk_densities, select
from prunelab.errors import ConfigError
from prunelab.hparams import ModelHparams
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model
from prunelab.sources import DATA_FREE, SOURCES, find_mask
from prunelab.sources import grasp, snip, synflow


def _mlp(*layers, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(*layers).to(dtype)


def _partial_mask(model, seed=1, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    return Mask((n, torch.rand(m.shape, generator=g) < keep) for n, m in Mask.ones_like(model).items())


def _batch(n, shape, classes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _convnet(seed=0):
    return build_model(ModelHparams(name="convnet3", width=16), (1, 8, 8), 10, seed=seed)


# ---- scores against hand computations -----------------------------------------------------------

def test_snip_is_weight_times_loss_gradient_in_eval_mode_without_touching_the_model():
    # dropout is active in train mode: the scores match the dropout-free gradient only in eval mode
    model = _mlp(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3)).train()
    mask = _partial_mask(model)
    x, y = _batch(6, (5,), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = snip.scores(model, mask, (x, y))

    b1, b2 = model[0].bias.detach(), model[3].bias.detach()

    def loss(w1, w2):
        return F.cross_entropy(torch.relu(x @ w1.T + b1) @ w2.T + b2, y)

    w1 = model[0].weight.detach() * mask["0.weight"]
    w2 = model[3].weight.detach() * mask["3.weight"]
    g1, g2 = torch.func.grad(loss, argnums=(0, 1))(w1, w2)
    torch.testing.assert_close(s["0.weight"], (w1 * g1).abs())
    torch.testing.assert_close(s["3.weight"], (w2 * g2).abs())
    assert (s["0.weight"][~mask["0.weight"]] == 0).all() and s["0.weight"].gt(0).any()
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("temperature", [200.0, 1.0])
@pytest.mark.parametrize("partial", [False, True])
def test_grasp_is_minus_weight_times_hessian_gradient_product(temperature, partial):
    model = _mlp(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), dtype=torch.float64)
    mask = _partial_mask(model) if partial else Mask.ones_like(model)
    x, y = _batch(8, (4,), 3, dtype=torch.float64)
    names = list(mask)
    sizes = [mask[n].numel() for n in names]
    keep = torch.cat([mask[n].flatten() for n in names]).double()
    theta = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in names]) * keep
    biases = {n: p.detach() for n, p in model.named_parameters() if n not in mask}

    def loss(t):
        ws = {n: c.view(mask[n].shape) for n, c in zip(names, t.split(sizes))}
        return F.cross_entropy(torch.func.functional_call(model, {**ws, **biases}, (x,)) / temperature, y)

    hessian = torch.autograd.functional.hessian(loss, theta)
    g = torch.autograd.functional.jacobian(loss, theta)
    # gradient flow through the kept weights only: pruned weights never train
    expected = -theta * (hessian @ (g * keep))
    got = grasp.grasp_scores(model, mask, (x, y), temperature=temperature)
    got = torch.cat([got[n].flatten() for n in names])
    assert got.dtype == torch.float64 and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))
    if temperature == 200.0:  # what find_mask ranks: higher = keep, so GraSP's highest values go first
        s = grasp.scores(model, mask, (x, y))
        assert all(torch.equal(s[n], -v) for n, v in grasp.grasp_scores(model, mask, (x, y)).items())


def test_synflow_is_path_flow_of_absolute_weights_with_norms_removed():
    model = _mlp(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    # a batch norm far from identity: synflow must not see it
    model[1].running_var.fill_(9.0)
    model[1].running_mean.fill_(-2.0)
    nn.init.constant_(model[1].weight, 3.0)
    mask = _partial_mask(model, keep=0.7)
    a1 = model[0].weight.detach().abs() * mask["0.weight"]
    a2 = model[3].weight.detach().abs() * mask["3.weight"]
    # R = 1ᵀ |W2| |W1| 1, so dR/dW1[i, j] = column sums of |W2|, dR/dW2[k, i] = row sums of |W1|
    want1 = a1 * a2.sum(0)[:, None]
    want2 = a2 * a1.sum(1)[None, :]
    s = synflow.scores(model, mask, None, input_shape=(4,))
    assert s["0.weight"].dtype == torch.float64
    torch.testing.assert_close(s["0.weight"], want1.double())
    torch.testing.assert_close(s["3.weight"], want2.double())
    assert (s["3.weight"][~mask["3.weight"]] == 0).all()


def test_magnitude_init_and_random_scores():
    model = _convnet()
    mask = _partial_mask(model)
    s = SOURCES["magnitude_init"](model, mask, None)
    params = dict(model.named_parameters())
    assert all(torch.equal(s[n], params[n].detach().abs() * mask[n]) for n in mask)
    # random: the seed alone decides, not the weights
    r = SOURCES["random"](model, mask, None, seed=3)
    r_other_model = SOURCES["random"](_convnet(seed=5), mask, None, seed=3)
    assert all(torch.equal(r[n], r_other_model[n]) for n in mask)


# ---- SynFlow's mask ---------------------------------------------------------------------------

def test_synflow_mask_does_not_depend_on_the_batch():
    model = _convnet()
    mask = Mask.ones_like(model)
    target = round(0.05 * mask.total)
    a = find_mask("synflow", model, mask, target, batch=_batch(4, (1, 8, 8), 10, seed=1), iterations=20)
    b = find_mask("synflow", model, mask, target, batch=_batch(16, (1, 8, 8), 10, seed=2), iterations=20)
    c = find_mask("synflow", model, mask, target, input_shape=(1, 8, 8), iterations=20)
    assert a.remaining == target and a.equal(b) and a.equal(c)
    with pytest.raises(ValueError, match="input_shape"):
        find_mask("synflow", model, mask, target)


@pytest.mark.parametrize("sparsity", [0.99, 0.995])
def test_iterative_synflow_keeps_every_layer_where_one_shot_magnitude_empties_some(sparsity):
    model = _convnet()
    mask = Mask.ones_like(model)
    target = round((1 - sparsity) * mask.total)
    sf = find_mask("synflow", model, mask, target, input_shape=(1, 8, 8))
    assert sf.remaining == target
    assert all(v.any() for v in sf.values()), {n: int(v.sum()) for n, v in sf.items()}
    # the kept weights still connect input to output
    assert synflow.scores(model, sf, None, input_shape=(1, 8, 8))["classifier.weight"].sum() > 0
    mag = find_mask("magnitude_init", model, mask, target)
    assert any(not v.any() for v in mag.values())


# ---- ERK --------------------------------------------------------------------------------------

SHAPES = {"conv1": (8, 3, 3, 3), "conv2": (16, 8, 3, 3), "fc": (10, 64)}


def _raw(shape):
    return sum(shape) / math.prod(shape)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.6, 0.9])
def test_erk_densities_follow_the_formula_and_reach_the_target(density):
    d = erk_densities(SHAPES, density)
    n = {k: math.prod(s) for k, s in SHAPES.items()}
    assert sum(n[k] * d[k] for k in d) == pytest.approx(density * sum(n.values()), rel=1e-12)
    assert all(0 < v <= 1 for v in d.values())
    sparse = [k for k in d if d[k] < 1]
    dense = [k for k in d if d[k] == 1]
    for a in sparse:
        for b in sparse:
            assert d[a] / d[b] == pytest.approx(_raw(SHAPES[a]) / _raw(SHAPES[b]), rel=1e-12)
    # the layers made dense are those with the highest raw_l
    assert all(_raw(SHAPES[a]) >= _raw(SHAPES[b]) for a in dense for b in sparse)
    assert bool(dense) == (density >= 0.6)


def test_erk_densities_by_hand_and_bad_density():
    # raw = 1 and 0.2; eps = 52/24 makes "a" exceed 1, so "a" is dense and eps = (52 - 4)/20 = 2.4
    d = erk_densities({"a": (2, 2), "b": (10, 10)}, 0.5)
    assert d["a"] == 1.0 and d["b"] == pytest.approx(0.48)
    assert erk_densities(SHAPES, 1.0) == {k: 1.0 for k in SHAPES}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            erk_densities(SHAPES, bad)


# ---- select -----------------------------------------------------------------------------------

def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = Mask((k, torch.rand(s, generator=g) < 0.7) for k, s in SHAPES.items())
    scores = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return mask, scores


def test_select_global_keeps_exactly_the_target_and_never_revives():
    mask, scores = _layers()
    # huge scores on pruned positions and NaN on kept ones: the first never return, the second go first
    scores = {k: torch.where(mask[k], v, torch.tensor(1e9)) for k, v in scores.items()}
    scores["fc"].view(-1)[mask["fc"].view(-1).nonzero()[:5]] = float("nan")
    for target in (0, 1, 100, mask.remaining // 2, mask.remaining):
        out = select(scores, mask, target)
        assert out.remaining == target
        assert not any((out[k] & ~mask[k]).any() for k in mask)
        if 0 < target < mask.remaining - 5:
            assert not out["fc"].view(-1)[mask["fc"].view(-1).nonzero()[:5]].any()
    with pytest.raises(ConfigError, match="pruning"):
        select(scores, mask, mask.remaining + 1)


def test_select_on_magnitudes_is_magnitude_pruning_ties_included():
    g = torch.Generator().manual_seed(2)
    # values on a coarse grid: many ties, broken by position in both
    weights = {k: (torch.randn(s, generator=g) * 2).round() / 2 for k, s in SHAPES.items()}
    mask, _ = _layers()
    for target in (10, 500, 1000):
        want = magnitude_prune(mask, weights, target_remaining=target)
        got = select({k: v.abs() for k, v in weights.items()}, mask, target)
        assert got.equal(want)
        assert got.equal(select({k: v.abs() for k, v in weights.items()}, mask, target))


def test_select_layerwise_keeps_the_same_fraction_in_every_layer():
    mask, scores = _layers()
    target = mask.remaining // 5
    out = select(scores, mask, target, scope="layerwise")
    frac = target / mask.remaining
    for k in mask:
        assert int(out[k].sum()) == round(int(mask[k].sum()) * frac)
        assert not (out[k] & ~mask[k]).any()
    # within a layer the highest scores survive
    kept, dropped = scores["conv2"][out["conv2"]], scores["conv2"][mask["conv2"] & ~out["conv2"]]
    assert kept.min() >= dropped.max()


def test_select_erk_follows_erk_densities_capped_by_what_is_left():
    mask, scores = _layers()
    mask["conv1"] = torch.zeros(SHAPES["conv1"], dtype=torch.bool)
    mask["conv1"].view(-1)[:3] = True  # far fewer left than ERK would give it
    for target in (50, 400):
        d = erk_densities(SHAPES, target / mask.total)
        out = select(scores, mask, target, scope="erk")
        for k in mask:
            want = min(round(mask[k].numel() * d[k]), int(mask[k].sum()))
            assert int(out[k].sum()) == want
            assert not (out[k] & ~mask[k]).any()
        assert out["conv1"].sum() == 3


def test_select_rejects_an_unknown_scope():
    mask, scores = _layers()
    with pytest.raises(ConfigError) as e:
        select(scores, mask, 10, scope="per_layer")
    assert e.value.field == "pruning.scope"


# ---- find_mask ---------------------------------------------------------------------------------

def test_random_masks_are_seeded_and_layerwise_hits_every_layers_density():
    model = _convnet()
    mask = Mask.ones_like(model)
    target = mask.total // 4
    a = find_mask("random", model, mask, target, seed=1)
    assert a.equal(find_mask("random", model, mask, target, seed=1))
    assert not a.equal(find_mask("random", model, mask, target, seed=2))
    lw = find_mask("random", model, mask, target, scope="layerwise", seed=1)
    for k, v in lw.items():
        assert int(v.sum()) == round(v.numel() * target / mask.total)


@pytest.mark.parametrize("method", sorted(SOURCES))
def test_find_mask_leaves_the_model_alone(method):
    model = _convnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = _partial_mask(model)
    out = find_mask(method, model, mask, mask.remaining // 3, batch=_batch(8, (1, 8, 8), 10), iterations=5)
    assert out.remaining == mask.remaining // 3 and not any((out[k] & ~mask[k]).any() for k in mask)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_find_mask_errors():
    model = _convnet()
    mask = Mask.ones_like(model)
    for method in set(SOURCES) - set(DATA_FREE):
        with pytest.raises(ValueError, match="batch"):
            find_mask(method, model, mask, 10)
    with pytest.raises(ConfigError) as e:
        find_mask("sniff", model, mask, 10)
    assert e.value.field == "pruning.method" and "snip" in str(e.value)
