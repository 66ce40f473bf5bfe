"""Permutation alignment (weight matching) that carries the mask, and REPAIR."""

import copy

import pytest
import torch
from torch import nn

from prunelab.align import (aligned_pair, apply_permutation, channel_stats, corrections_applied, mask_union,
                            permutation_spec, repair, repair_corrections, weight_matching)
from prunelab.hparams import ModelHparams
from prunelab.masks import Mask, masked_state
from prunelab.models import build_model
from prunelab.stability import interpolate_states


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _conv_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))


def _randomize_norms(model, seed):
    """Give every norm layer distinct, signed affine parameters and BN statistics, so that a wrong
    permutation of them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _convnet(seed=0):
    return _randomize_norms(build_model(ModelHparams(name="convnet3", width=8), (1, 8, 8), 10, seed), seed)


def _resnet(name="resnet10_bn", seed=0):
    return _randomize_norms(build_model(ModelHparams(name=name, width=4), (3, 16, 16), 10, seed), seed)


CASES = {
    "mlp": (_mlp, (10,)),
    "conv_mlp": (_conv_mlp, (1, 8, 8)),
    "convnet3": (_convnet, (1, 8, 8)),
    "resnet10_bn": (_resnet, (3, 16, 16)),
    "resnet18_bn": (lambda seed=0: _resnet("resnet18_bn", seed), (3, 16, 16)),
}


def _batch(shape, n=16, seed=1):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _random_perms(spec, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(n, generator=g) for name, n in spec.groups.items()}


def _random_mask(model, seed, density=0.6):
    g = torch.Generator().manual_seed(seed)
    return Mask((n, torch.rand(m.shape, generator=g) < density) for n, m in Mask.ones_like(model).items())


def _with_state(model, state):
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out.eval()


def _close(a, b, tol=1e-5):
    return torch.allclose(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Specs


def test_convnet_spec_groups_and_flattened_classifier_blocks():
    model = _convnet()
    spec = permutation_spec(model)
    assert spec.groups == {"features.0": 8, "features.4": 8}  # 8 px digits: two blocks
    cls = spec.entry_axes("classifier.weight")
    assert [(a.axis, a.group, a.block) for a in cls] == [(1, "features.4", 4)]  # a 2x2 map per channel
    assert {a.entry for a in spec.group_axes("features.0")} == {
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias", "features.4.weight"}
    # instance norm undoes a correction placed before it: REPAIR corrects the norm's output
    assert [(p.module, p.how) for p in spec.points] == [("features.1", "output"), ("features.5", "output")]


def test_resnet_spec_shares_one_permutation_per_residual_stream():
    model = _resnet()
    spec = permutation_spec(model)
    # stem + layer1 (identity shortcut), then one stream per stage with a 1x1 shortcut, plus the inner ones
    streams = [g for g in spec.groups if g.startswith("residual.")]
    assert streams == ["residual.stem", "residual.layer2.0", "residual.layer3.0", "residual.layer4.0"]
    assert len(spec.groups) == 4 + 4
    stem = {(a.entry, a.axis) for a in spec.group_axes("residual.stem")}
    assert {("conv1.weight", 0), ("bn1.running_var", 0), ("layer1.0.bn2.weight", 0), ("layer1.0.conv2.weight", 0),
            ("layer1.0.conv1.weight", 1), ("layer2.0.conv1.weight", 1), ("layer2.0.shortcut.0.weight", 1)} <= stem
    assert ("classifier.weight", 1) in {(a.entry, a.axis) for a in spec.group_axes("residual.layer4.0")}
    assert "layer1.0.bn1.running_mean" in spec.buffers and "conv1.weight" not in spec.buffers
    # every conv output before its BN: stem, conv1 and conv2 of each block, and the three shortcut convs
    assert len(spec.points) == 1 + 2 * 4 + 3 and all(p.how == "bn_input" for p in spec.points)
    # every float tensor of the model but the image-channel axis and the logits is covered
    covered = {a.entry for a in spec.axes}
    assert covered == {k for k, v in model.state_dict().items() if v.is_floating_point()} - {"classifier.bias"}


class Odd(nn.Module):
    def forward(self, x):
        return x


def test_unsupported_architecture_raises_naming_it():
    with pytest.raises(ValueError, match="Odd"):
        permutation_spec(Odd())
    with pytest.raises(ValueError, match="MultiheadAttention"):
        permutation_spec(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="GroupNorm with 2 groups"):
        permutation_spec(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 3)))


# ---------------------------------------------------------------------------------------------
# Permuting and matching


@pytest.mark.parametrize("case", list(CASES))
def test_permuting_with_the_mask_keeps_the_subnetwork_and_its_function(case):
    make, shape = CASES[case]
    model = make().eval()
    spec = permutation_spec(model)
    mask = _random_mask(model, seed=3)
    state = model.state_dict()
    perms = _random_perms(spec, seed=4)
    state_p, mask_p = apply_permutation(spec, perms, state, mask)

    assert isinstance(mask_p, Mask) and list(mask_p) == list(mask)
    for n in mask:
        assert int(mask_p[n].sum()) == int(mask[n].sum())  # every layer keeps its density
    permuted_masked, _ = apply_permutation(spec, perms, masked_state(state, mask))
    assert all(torch.equal(v, masked_state(state_p, mask_p)[k]) for k, v in permuted_masked.items())

    x = _batch(shape)
    original = mask.apply(_with_state(model, state))
    permuted = mask_p.apply(_with_state(model, state_p))
    assert _close(permuted(x), original(x))
    assert not all(torch.equal(perms[g], torch.arange(n)) for g, n in spec.groups.items())


@pytest.mark.parametrize("case", list(CASES))
def test_weight_matching_recovers_a_random_permutation_exactly(case):
    make, shape = CASES[case]
    model = make().eval()
    spec = permutation_spec(model)
    state = model.state_dict()
    perms = _random_perms(spec, seed=5)
    state_b, _ = apply_permutation(spec, perms, state)

    found = weight_matching(spec, state, state_b, seed=0)
    for g in spec.groups:
        assert torch.equal(found[g], torch.argsort(perms[g])), g  # aligned[i] = b[found[i]] = a[i]
    aligned, _ = apply_permutation(spec, found, state_b)
    assert all(torch.equal(aligned[k], state[k]) for k in state)

    # zero barrier: the midpoint of the aligned pair is the original network
    x = _batch(shape)
    mid = _with_state(model, interpolate_states(state, aligned, 0.5))
    assert _close(mid(x), model(x))


def test_aligned_pair_matches_masked_weights_and_permutes_the_mask():
    model_a = _convnet(seed=0).eval()
    spec = permutation_spec(model_a)
    mask = _random_mask(model_a, seed=6, density=0.5)
    mask.apply(model_a)
    perms = _random_perms(spec, seed=7)
    # b: a permuted copy whose pruned weights hold junk, which the masked matching must ignore
    junk = {k: v.clone() for k, v in model_a.state_dict().items()}
    for n, m in mask.items():
        junk[n][~m] = torch.randn(int((~m).sum()))
    state_b, mask_b = apply_permutation(spec, perms, junk, mask)
    model_b = _with_state(model_a, state_b)

    state_b_aligned, mask_b_aligned, found = aligned_pair(model_a, model_b, mask_b)
    assert all(torch.equal(found[g], torch.argsort(perms[g])) for g in spec.groups)
    assert mask_b_aligned.equal(mask)
    assert all(torch.equal(v, model_a.state_dict()[k])
               for k, v in masked_state(state_b_aligned, mask_b_aligned).items())
    assert mask_union(mask, mask_b_aligned).equal(mask)


# ---------------------------------------------------------------------------------------------
# REPAIR


def _targets(stats_a, stats_b, alpha):
    return {k: ((1 - alpha) * stats_a[k][0] + alpha * stats_b[k][0], (1 - alpha) * stats_a[k][1] + alpha * stats_b[k][1])
            for k in stats_a}


def _assert_stats(stats, targets, tol=1e-4):
    assert stats.keys() == targets.keys()
    for k, (mean, std) in stats.items():
        tm, ts = targets[k]
        scale = ts.abs().max()
        assert (mean - tm).abs().max() <= tol * scale, k
        assert ((std - ts).abs() <= tol * ts.abs().clamp_min(1e-3 * scale)).all(), k


@pytest.mark.parametrize("case", ["conv_mlp", "mlp", "convnet3"])
def test_repair_restores_the_interpolated_channel_statistics(case):
    make, shape = CASES[case]
    model_a, model_b = make(seed=0).eval(), make(seed=1).eval()
    batches = [_batch(shape, n=32, seed=s) for s in (10, 11)]
    alpha = 0.5
    spec = permutation_spec(model_a)
    targets = _targets(channel_stats(model_a, batches), channel_stats(model_b, batches), alpha)

    plain = _with_state(model_a, interpolate_states(model_a.state_dict(), model_b.state_dict(), alpha))
    before = channel_stats(plain, batches)
    # variance collapse: the interpolated channels spread less than the endpoints' interpolated spread
    ratios = torch.cat([before[k][1] / targets[k][1] for k in targets])
    assert ratios.mean() < 0.9, ratios

    repaired = repair(model_a, model_b, alpha, batches, spec)
    assert type(repaired) is type(model_a) and list(repaired.state_dict()) == list(model_a.state_dict())
    _assert_stats(channel_stats(repaired, batches), targets)
    # the endpoints need no correction
    at_a = repair(model_a, model_b, 0.0, batches)
    assert all(torch.allclose(v, model_a.state_dict()[k], atol=1e-6) for k, v in at_a.state_dict().items())


def test_repair_keeps_a_pruned_interpolation_sparse():
    model_a, model_b = _conv_mlp(seed=0).eval(), _conv_mlp(seed=1).eval()
    mask = _random_mask(model_a, seed=8, density=0.4)
    mask.apply(model_a)
    mask.apply(model_b)
    repaired = repair(model_a, model_b, 0.3, [_batch((1, 8, 8), n=32)])
    params = dict(repaired.named_parameters())
    assert all(not params[n][~m].any() for n, m in mask.items())


def test_repair_on_batchnorm_resnet_fuses_the_pre_norm_correction_into_the_norm():
    make, shape = CASES["resnet10_bn"]
    model_a, model_b = make(seed=0).eval(), make(seed=1).eval()
    batches = [(_batch(shape, n=16, seed=12), torch.zeros(16, dtype=torch.long))]  # (x, y) pairs work too
    alpha = 0.4
    targets = _targets(channel_stats(model_a, batches), channel_stats(model_b, batches), alpha)

    net, corrections = repair_corrections(model_a, model_b, alpha, batches)
    ratios = torch.cat([channel_stats(net, batches)[k][1] / targets[k][1] for k in targets])
    assert ratios.mean() < 0.9, ratios
    # with the corrections in place every conv output has the target statistics ...
    _assert_stats(channel_stats(net, batches, corrections=corrections), targets)
    # ... and the fused network computes exactly that corrected network
    repaired = repair(model_a, model_b, alpha, batches)
    x = batches[0][0]
    with torch.no_grad(), corrections_applied(net, net, corrections):
        expected = net(x)
    assert _close(repaired.eval()(x), expected, 1e-4)


def test_repair_rejects_a_layer_it_cannot_fuse_into():
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2))

    with pytest.raises(ValueError, match="no weight and bias"):
        repair(make(0), make(1), 0.5, [torch.randn(8, 4)])
