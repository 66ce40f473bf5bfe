"""Stacked copies: one widened network equals N separate ones, in the forward pass and in training."""

import copy

import pytest
import torch
from torch import nn

from prunelab.chain import Chain
from prunelab.errors import ConfigError, DivergenceError
from prunelab.hparams import ModelHparams, TrainingHparams
from prunelab.landscape import LandscapeHparams, landscape
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model
from prunelab.stability import LMCHparams, instability
from prunelab.stacked import (StackedLinear, split_outputs, stack_inputs, stack_mask, stack_models, train_copies,
                              unstack_states)
from prunelab.train import train

WIDTHS = {"convnet3": 8, "resnet10_bn": 4}
SEEDS = [(11, 12), (21, 22)]


def _net(name, seed=0):
    return build_model(ModelHparams(name=name, width=WIDTHS[name]), (1, 8, 8), 10, seed=seed)


def _max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["convnet3", "resnet10_bn"])
def test_stacked_forward_equals_separate_forwards(name):
    models = [_net(name, seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    for m in models:  # distinct BN statistics, so eval mode tells the copies apart
        for k, v in m.state_dict().items():
            if k.endswith("running_mean") or k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    stacked = stack_models(models)
    assert isinstance(stacked.classifier, StackedLinear)
    for k, s in unstack_states(stacked, 3)[1].items():
        assert torch.equal(s, models[1].state_dict()[k]), k
    xs = [torch.randn(7, 1, 8, 8, generator=g) for _ in models]
    for mode in (False, True):
        stacked.train(mode)
        out = split_outputs(stacked(stack_inputs(xs)), 3)
        assert out.shape == (7, 3, 10)
        for i, m in enumerate(models):
            m.train(mode)
            assert torch.allclose(out[:, i], m(xs[i]), atol=1e-5), (mode, i)
    # the train-mode forward updated each copy's running statistics like the separate forwards did
    for m, s in zip(models, unstack_states(stacked, 3)):
        assert _max_diff(m.state_dict(), s) < 1e-6


def test_unsupported_layers_are_named():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(ConfigError, match="'1'.*LayerNorm"):
        stack_models([net, net])


def test_stacked_mask_layout():
    m = _net("convnet3")
    mask = magnitude_prune(Mask.ones_like(m), m.state_dict(), 0.5)
    stacked = stack_models([m, m])
    sm = stack_mask(stacked, mask, 2)
    sm.check_fits(stacked)
    assert torch.equal(sm["classifier.weight"][1], mask["classifier.weight"])
    w = mask["features.0.weight"]
    assert torch.equal(sm["features.0.weight"], torch.cat([w, w]))


# (model, training, mask?, start_step, stop_step). ResNet-10's ReLUs on 2x2 and 1x1 maps make its
# training on digits flip activations under any 1e-7 perturbation within an epoch or two (a one-by-one
# run perturbed that much drifts as far), so its comparison is a short window across an epoch boundary.
CASES = {
    "sgd_mask_standard": ("convnet3", TrainingHparams(epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4),
                          True, 0, None),
    "dsa_cutmix_resumed": ("convnet3", TrainingHparams(epochs=3, lr=0.05, augment="dsa_cutmix"), False, 30, None),
    "adam": ("convnet3", TrainingHparams(epochs=1, lr=0.003, optimizer="adam"), True, 0, None),
    "resnet_bn_mask": ("resnet10_bn", TrainingHparams(epochs=2, lr=0.02), True, 20, 26),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_training_matches_separate_runs(digits, case):
    name, hp, use_mask, start, stop = CASES[case]
    model = _net(name, seed=1)
    mask = magnitude_prune(Mask.ones_like(model), model.state_dict(), 0.6) if use_mask else None
    before = copy.deepcopy(model.state_dict())
    copies, results = train_copies(model, digits.train, hp, seeds=SEEDS, mask=mask, start_step=start,
                                   stop_step=stop)
    assert _max_diff(model.state_dict(), before) == 0  # the template is left as it was
    alone = []
    for (order, aug), c, r in zip(SEEDS, copies, results):
        solo = copy.deepcopy(model)
        ref = train(solo, digits.train, hp, order_seed=order, aug_seed=aug, mask=mask, start_step=start,
                    stop_step=stop)
        assert type(c) is type(model) and r.steps == ref.steps and r.epochs == ref.epochs
        assert [h["epoch"] for h in r.history] == [h["epoch"] for h in ref.history]
        assert [h["lr"] for h in r.history] == [h["lr"] for h in ref.history]
        assert [h["train_loss"] for h in r.history] == pytest.approx([h["train_loss"] for h in ref.history],
                                                                     abs=1e-4)
        assert _max_diff(c.state_dict(), solo.state_dict()) < 1e-3  # BN running statistics included
        if mask is not None:
            params = dict(c.named_parameters())
            for n, keep in mask.items():
                assert (params[n][~keep] == 0).all()
        alone.append(solo)
    # different seeds give clearly different copies, each matching its own solo run
    assert _max_diff(copies[0].state_dict(), copies[1].state_dict()) > 1e-2
    assert _max_diff(copies[0].state_dict(), alone[1].state_dict()) > 1e-2


def test_divergence_names_the_copy(digits):
    hp = TrainingHparams(epochs=2, lr=1e6, weight_decay=0.0)
    with pytest.raises(DivergenceError, match=r"copy 0 \(order seed 11, augmentation seed 12\).*learning rate"):
        train_copies(_net("convnet3"), digits.train, hp, seeds=SEEDS)


def _round_one(hp, digits):
    """The rewind point and round-1 mask of a tiny IMP chain."""
    chain = Chain(hp, data=digits, pruning_data=digits.train)
    chain.step()
    return chain.state.rewind_point, chain.mask


def test_instability_stacked_matches_sequential(digits, tiny_chain_hp):
    weights, mask = _round_one(tiny_chain_hp, digits)
    lmc = LMCHparams(num_points=5, eval_examples=400)
    seq = instability(tiny_chain_hp, digits, weights, mask, lmc)
    stk = instability(tiny_chain_hp, digits, weights, mask, lmc.replace(stacked=True))
    for kind in ("barrier_mid", "barrier_max"):
        assert stk[kind] == pytest.approx(seq[kind], abs=1e-4)
    assert stk["train_loss"] == pytest.approx(seq["train_loss"], abs=1e-4)
    for a, b in zip(seq["copies"], stk["copies"]):
        assert set(a) == set(b) == {"test_accuracy", "test_loss", "train_loss", "steps", "seed"}
        assert a["seed"] == b["seed"] and a["steps"] == b["steps"]
        assert b["test_loss"] == pytest.approx(a["test_loss"], abs=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)


def test_landscape_stacked_matches_sequential(digits, tiny_chain_hp):
    weights, mask = _round_one(tiny_chain_hp, digits)
    land = LandscapeHparams(grid=3, seeds=(0, 1, 2), eval_examples=300)
    seq = landscape(tiny_chain_hp, digits, weights, mask, land)
    stk = landscape(tiny_chain_hp, digits, weights, mask, land.replace(stacked=True))
    assert float((torch.tensor(stk["loss"]) - torch.tensor(seq["loss"])).abs().max()) < 1e-4
    for a, b in zip(seq["copies"], stk["copies"]):
        assert set(a) == set(b)
        assert a["seed"] == b["seed"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], abs=1e-4)
