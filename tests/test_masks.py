import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.hparams import ModelHparams
from prunelab.masks import Mask, magnitude_prune, prunable_names, rounds_for_sparsity
from prunelab.models import build_model


def _model(seed=0):
    return build_model(ModelHparams(name="resnet10_bn", width=4), (3, 8, 8), 10, seed=seed)


def test_prunable_weights_are_conv_and_linear_weights_only():
    m = _model()
    names = prunable_names(m)
    assert names[-1] == "classifier.weight" and "conv1.weight" in names
    assert not any("bn" in n or n.endswith("bias") for n in names)
    assert "classifier.weight" not in prunable_names(m, prune_classifier=False)


def test_density_after_r_rounds_is_point_eight_to_the_r():
    m = _model()
    mask = Mask.ones_like(m)
    w = m.state_dict()
    for r in range(1, 11):
        target = round(mask.total * 0.8 ** r)
        mask = magnitude_prune(mask, w, target_remaining=target)
        assert abs(mask.remaining - mask.total * 0.8 ** r) <= 1
    # the fraction form prunes 20% of what remains, to the nearest weight
    m2 = Mask.ones_like(m)
    pruned = magnitude_prune(m2, w, 0.2)
    assert pruned.remaining == m2.total - round(0.2 * m2.total)


def test_threshold_is_global_not_layerwise():
    # layer a has large weights, layer b small ones: a global threshold prunes only b
    a, b = torch.full((10,), 5.0), torch.linspace(0.1, 1.0, 10)
    mask = Mask(a=torch.ones(10, dtype=torch.bool), b=torch.ones(10, dtype=torch.bool))
    out = magnitude_prune(mask, {"a": a, "b": b}, 0.3)
    assert out["a"].all() and out["b"].sum() == 4
    assert out["b"][:6].logical_not().all()  # the smallest magnitudes went
    lw = magnitude_prune(mask, {"a": a, "b": b}, 0.3, scope="layerwise")
    assert lw["a"].sum() == 7 and lw["b"].sum() == 7


def test_pruned_weights_are_not_revived_and_ties_are_deterministic():
    w = {"a": torch.zeros(20)}  # all tied
    mask = Mask(a=torch.ones(20, dtype=torch.bool))
    m1 = magnitude_prune(mask, w, 0.5)
    assert torch.equal(m1["a"], magnitude_prune(mask, w, 0.5)["a"])
    big = {"a": torch.where(m1["a"], torch.tensor(0.0), torch.tensor(100.0))}
    m2 = magnitude_prune(m1, big, 0.5)  # large values at pruned positions do not come back
    assert not (m2["a"] & ~m1["a"]).any() and m2.remaining == 5


def test_apply_save_load_hash(tmp_path):
    m = _model()
    mask = magnitude_prune(Mask.ones_like(m), m.state_dict(), 0.5)
    mask.apply(m)
    for n, v in mask.items():
        assert (dict(m.named_parameters())[n][~v] == 0).all()
    mask.save(tmp_path / "m.pt")
    back = Mask.load(tmp_path / "m.pt")
    assert back.equal(mask) and back.hash() == mask.hash()
    other = magnitude_prune(Mask.ones_like(m), m.state_dict(), 0.4)
    assert other.hash() != mask.hash()
    rep = mask.report()
    assert rep["total"] == pytest.approx(0.5, abs=1e-3) and set(rep["layers"]) == set(mask)


def test_mask_that_does_not_fit_and_bad_fraction():
    mask = Mask.ones_like(_model())
    other = build_model(ModelHparams(name="convnet3", width=4), (3, 8, 8), 10, seed=0)
    with pytest.raises(ConfigError, match="mask"):
        mask.apply(other)
    with pytest.raises(ConfigError, match="pruning.fraction"):
        magnitude_prune(mask, _model().state_dict(), 1.5)
    with pytest.raises(ConfigError, match="pruning.fraction"):
        magnitude_prune(mask, _model().state_dict(), -0.2)


def test_rounds_for_paper_sparsities():
    assert rounds_for_sparsity(0.6, 0.2) == 4 and rounds_for_sparsity(0.87, 0.2) == 9
    assert rounds_for_sparsity(0.0, 0.2) == 0
