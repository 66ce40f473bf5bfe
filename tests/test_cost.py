"""prunelab.cost: a chain's steps and operations counted from its config, and the sweep order they give."""

from __future__ import annotations

import math

import pytest

from prunelab.cost import Cost, chain_cost, evaluation_cost, forward_flops, pruning_set_size, training_cost
from prunelab.data import dataset_sizes, load_dataset
from prunelab.evaluation import EvalHparams
from prunelab.hparams import ChainHparams, DatasetHparams, ModelHparams, TrainingHparams


def chain(**over) -> ChainHparams:
    d = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 16}, "pruning": {"rounds": 4},
         "pruning_training": {"epochs": 3}, "training": {"epochs": 2}}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return ChainHparams.from_dict(d)


DM10 = {"kind": "distilled", "method": "dm", "ipc": 10}


@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_dataset_sizes_are_the_loaded_sizes(name):
    for hp in (DatasetHparams(name=name), DatasetHparams(name=name, train_size=500, test_size=100)):
        data = load_dataset(hp)
        assert dataset_sizes(hp) == (len(data.train), len(data.test))


def test_forward_flops_follow_the_architecture():
    digits, cifar = DatasetHparams(name="digits"), DatasetHparams(name="cifar10")
    narrow = forward_flops(ModelHparams(name="convnet3", width=16), cifar)
    wide = forward_flops(ModelHparams(name="convnet3", width=32), cifar)
    assert 3 < wide / narrow < 4  # convolutions between width-w maps: ~w^2 (the first one and the classifier ~w)
    assert forward_flops(ModelHparams(name="convnet3", width=16), digits) < narrow / 10  # 8 px vs 32 px
    r10 = forward_flops(ModelHparams(name="resnet10_bn"), cifar)
    r18 = forward_flops(ModelHparams(name="resnet18_bn"), cifar)
    assert r18 > 1.8 * r10 > 0


def test_training_cost_counts_steps_and_examples():
    hp = TrainingHparams(batch_size=64, epochs=3)
    c = training_cost(hp, 100, flops=10.0)
    assert c.steps == 3 * math.ceil(100 / 64)
    assert c.flops == c.steps * 64 * 3 * 10.0  # the partial last batch counts as a full one
    assert training_cost(hp, 10, flops=10.0).flops == 3 * 10 * 3 * 10.0  # a batch larger than the set
    assert training_cost(hp, 100, 10.0, start_step=2).steps == c.steps - 2
    assert training_cost(TrainingHparams(steps=7, batch_size=8), 1000, 1.0).steps == 7


def test_pruning_set_sizes():
    assert pruning_set_size(chain()) == dataset_sizes(DatasetHparams(name="digits"))[0]
    assert pruning_set_size(chain(pruning_data=DM10)) == 100
    idc = chain(dataset={"name": "cifar10"}, pruning_data={"kind": "distilled", "method": "idc", "ipc": 10})
    assert pruning_set_size(idc) == 10 * 10 * 4  # CIFAR's multi-formation factor 2: 2 x 2 images each
    assert pruning_set_size(chain(dataset={"name": "cifar10"}, pruning_data={
        "kind": "distilled", "method": "idc", "ipc": 10, "factor": 3})) == 10 * 10 * 9


def test_chain_cost_phases():
    ev = EvalHparams(lmc=True)
    real = chain_cost(chain(), ev, [2, 4])
    assert real["synthetic"] == Cost()
    assert real["total"].flops == pytest.approx(sum(real[k].flops for k in ("synthetic", "pruning", "evaluation")))
    # twice the rounds, twice the pruning; twice the evaluation rounds, twice the evaluation
    assert chain_cost(chain(pruning={"rounds": 8}), ev, [2, 4])["pruning"].flops == pytest.approx(
        2 * real["pruning"].flops)
    assert chain_cost(chain(), ev, [2])["evaluation"].flops == pytest.approx(real["evaluation"].flops / 2)

    dm = chain_cost(chain(pruning_data=DM10), ev, [2, 4])
    assert dm["synthetic"].flops > 0 and dm["evaluation"] == real["evaluation"]
    assert dm["pruning"].steps == 4 * 3 * 2 + 4 * 1  # 100 images at batch 64: 2 steps an epoch (+ a fit pass)
    # a set of ipc 1 is cheaper to train on than ipc 10; a file costs nothing to build
    assert chain_cost(chain(pruning_data={**DM10, "ipc": 1}), ev, [2])["pruning"].flops < dm["pruning"].flops
    assert chain_cost(chain(pruning_data={"kind": "random_subset", "ipc": 10}), ev, [2])["synthetic"] == Cost()


def test_evaluation_cost_follows_what_is_measured():
    hp = chain()
    lmc = evaluation_cost(hp, EvalHparams(lmc=True))
    one = evaluation_cost(hp, EvalHparams(lmc=False))
    assert lmc.flops > 2 * one.flops and lmc.steps > 2 * one.steps  # two copies, plus the curve's forward passes
    from prunelab.stability import LMCHparams

    fewer = evaluation_cost(hp, EvalHparams(lmc=True, lmc_hparams=LMCHparams(num_points=3)))
    assert 2 * one.flops < fewer.flops < lmc.flops
    land = evaluation_cost(hp, EvalHparams(lmc=False, landscape=True))
    assert land.flops > 4 * one.flops  # four copies and a 100 x 100 grid
    hess = evaluation_cost(hp, EvalHparams(lmc=False, hessian=True))
    assert hess.flops > one.flops
    # rewinding to epoch 1 of 2 halves each copy's training
    rewound = evaluation_cost(chain(pruning={"rewind_epoch": 1}), EvalHparams(lmc=False))
    assert rewound.steps < one.steps


def test_rewinding_and_starting_late_change_the_pruning_cost():
    base = chain_cost(chain(), EvalHparams(), [4])["pruning"]
    rewound = chain_cost(chain(pruning={"rewind_epoch": 1}), EvalHparams(), [4])["pruning"]
    # each round continues from epoch 1 (one epoch less), the rewind point costs one epoch once
    n = dataset_sizes(DatasetHparams(name="digits"))[0]
    spe = math.ceil(n / 64)
    assert rewound.steps == base.steps - 4 * spe + spe
    late = chain(start_from=chain().to_dict(), start_round=2)
    assert chain_cost(late, EvalHparams(), [4])["pruning"].steps == pytest.approx(base.steps / 2)


def test_seconds_model():
    c = Cost(steps=1000, flops=3e12)
    assert c.seconds("cpu", threads=2) < c.seconds("cpu")
    assert c.seconds("gpu") < c.seconds("cpu")
    assert Cost().seconds("gpu") == 0


# the demo on two models and one seed: chains of very different lengths
TWO_MODELS = [("model", ["convnet3", "resnet10_bn"]), ("seeds", [0])]


def test_sweep_order_longest_first():
    from sweeps.config import expand, load_sweep
    from sweeps.plan import longest_first

    trials = expand(load_sweep("fig6", "demo", TWO_MODELS)[0], "fig6")
    ordered = longest_first(trials)
    est = [t.estimated_s() for t in ordered]
    assert est == sorted(est, reverse=True)
    labels = [t.label() for t in ordered]
    # the demo's measured order on a CPU (a ResNet-10 chain on ipc 10 first, the ConvNet-3 IMP chain last)
    assert labels[0] == "distilled,seed=0,model=resnet10_bn,ipc=10"
    assert labels[-1] == "imp,seed=0,model=convnet3"
    assert all("resnet10_bn" in lab for lab in labels[:3])


def test_a_trial_without_estimate_goes_last(monkeypatch, capsys):
    from sweeps.config import Trial, expand, load_sweep
    from sweeps.plan import longest_first

    trials = expand(load_sweep("fig6", "demo", TWO_MODELS)[0], "fig6")
    real = Trial.estimated_s

    def flaky(self, store=None):
        if self.label() == "imp,seed=0,model=resnet10_bn":
            raise ValueError("no such model size")
        return real(self, store)

    monkeypatch.setattr(Trial, "estimated_s", flaky)
    ordered = [t.label() for t in longest_first(trials)]
    assert "no time estimate for imp,seed=0,model=resnet10_bn (no such model size)" in capsys.readouterr().out
    assert ordered[-1] == "imp,seed=0,model=resnet10_bn"  # counted as 0: last, after every estimated chain
    assert ordered[0] == "distilled,seed=0,model=resnet10_bn,ipc=10"


def test_start_chains_go_before_the_chains_that_start_from_them():
    from sweeps.config import expand, load_sweep
    from sweeps.plan import estimates, longest_first

    # the IMP chains from the distilled mask train longer than that chain itself
    longer = [("variants.distilled_then_imp.set.training.epochs", 40)]
    trials = expand(load_sweep("fig7", "demo", longer)[0], "fig7")
    est = estimates(trials)
    order = [t.variant for t in longest_first(trials)]
    for seed in (0, 1):
        start = next(t for t in trials if t.variant == "distilled" and t.chain.seed == seed)
        dependent = next(t for t in trials if t.variant == "distilled_then_imp" and t.chain.seed == seed)
        assert est[start.key] < est[dependent.key]  # shorter on its own, yet it starts first
        labels = [t.label() for t in longest_first(trials)]
        assert labels.index(start.label()) < labels.index(dependent.label())
    assert order.index("distilled") < order.index("distilled_then_imp")


def test_hessian_cost_follows_the_method_and_the_sparsity():
    from prunelab.cost import unpruned_weights
    from prunelab.hessian import HessianHparams

    hp = chain()
    exact = EvalHparams(lmc=False, hessian=True, hessian_hparams=HessianHparams(method="exact"))
    dense, sparse = evaluation_cost(hp, exact, 0), evaluation_cost(hp, exact, 4)
    assert unpruned_weights(hp, 4) == round(unpruned_weights(hp, 0) * 0.8 ** 4)
    assert dense.flops > sparse.flops > evaluation_cost(hp, EvalHparams(lmc=False), 4).flops
    hutch = EvalHparams(lmc=False, hessian=True, hessian_hparams=HessianHparams(method="hutchinson", samples=10))
    assert evaluation_cost(hp, hutch, 0).flops < dense.flops
    # auto: exact up to exact_max_weights unpruned weights, Hutchinson above
    n0 = unpruned_weights(hp, 0)
    auto_exact = EvalHparams(lmc=False, hessian=True, hessian_hparams=HessianHparams(exact_max_weights=n0))
    auto_hutch = EvalHparams(lmc=False, hessian=True, hessian_hparams=HessianHparams(exact_max_weights=n0 - 1))
    assert evaluation_cost(hp, auto_exact, 0) == dense
    assert evaluation_cost(hp, auto_hutch, 0) == evaluation_cost(
        hp, EvalHparams(lmc=False, hessian=True, hessian_hparams=HessianHparams(method="hutchinson")), 0)


def test_lmc_cost_counts_the_midpoint_an_even_grid_adds():
    from prunelab.stability import LMCHparams

    hp = chain()
    cost = {n: evaluation_cost(hp, EvalHparams(lmc_hparams=LMCHparams(num_points=n))) for n in (3, 4, 5)}
    step = cost[5].flops - cost[3].flops  # two more points
    assert cost[4].flops - cost[3].flops == pytest.approx(step)  # 4 points + the midpoint = 5 points


def test_what_is_left_of_a_chain(tmp_path):
    from prunelab.chain import Chain
    from prunelab.store import ChainStore
    from sweeps.config import Trial

    ev = EvalHparams(lmc=False)
    hp = chain(pruning={"rounds": 4}, pruning_data=DM10, model={"width": 8}, pruning_training={"epochs": 1},
               training={"epochs": 1})
    full = chain_cost(hp, ev, [2, 4])
    left = chain_cost(hp, ev, [2, 4], reached=2, evaluated=[2])
    assert left["synthetic"] == Cost()  # a stored state: the set was built
    assert left["pruning"].flops == pytest.approx(full["pruning"].flops / 2)
    assert left["evaluation"].flops == pytest.approx(full["evaluation"].flops / 2)

    # the store's progress, read without loading anything
    store = ChainStore(tmp_path / "store", hp)
    assert store.progress("k", [2, 4]) == (None, [])
    trial = Trial("distilled", hp, [2, 4], ev, {})
    before = trial.estimated_s(str(tmp_path / "store"))
    assert before == pytest.approx(trial.estimated_s())
    c = Chain(hp, "cpu")
    c.step()
    c.step()
    store.save_state(c.state)
    store.save_eval("k", 2, {"metrics": {}})
    assert store.progress("k", [2, 4]) == (2, [2])
    from prunelab.evaluation import result_key

    store.save_eval(result_key(ev), 2, {"metrics": {}})
    assert trial.estimated_s(str(tmp_path / "store")) < before


def test_controls_and_the_second_bn_mode_are_counted():
    from prunelab.stability import LMCHparams

    for model, has_bn in (("convnet3", False), ("resnet10_bn", True)):
        hp = chain(model={"name": model, "width": 8})
        one_mode = evaluation_cost(hp, EvalHparams(lmc_hparams=LMCHparams(both_bn_modes=False)))
        both = evaluation_cost(hp, EvalHparams())
        # the other mode's curve (with its BN re-estimation) only where there is BN to recompute
        assert (both.flops > one_mode.flops) == has_bn
        # each control is one more pair and its curves: the cost scales by 1 + controls
        two = evaluation_cost(hp, EvalHparams(controls=("shuffled", "reinit")))
        assert two.flops == pytest.approx(3 * both.flops) and two.steps == 3 * both.steps
