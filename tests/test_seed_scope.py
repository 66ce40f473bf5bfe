"""`ChainHparams.seed_scope`: what a chain's `seed` varies (the mask and every training, or only the
trainings after pruning)."""

import torch

from prunelab.chain import Chain, derive_seed, mask_seed
from prunelab.evaluation import control_subnetwork
from prunelab.hparams import ChainHparams
from prunelab.masks import density_after, magnitude_prune
from prunelab.models import build_model
from prunelab.stability import train_pair
from prunelab.train import train


def _same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _with(hp: ChainHparams, **changes) -> ChainHparams:
    return ChainHparams.from_dict({**hp.to_dict(), **changes})


def test_mask_seed_and_hashes():
    # the switch at its default leaves every stored hash as it was
    assert ChainHparams().hash() == "2ab6df90f501b7d2"
    for seed in (0, 3):
        assert mask_seed(ChainHparams(seed=seed)) == seed
        assert mask_seed(ChainHparams(seed=seed, seed_scope="training")) == 0
    # chains that share a mask under "training" are still distinct chains
    assert ChainHparams(seed_scope="training").hash() != ChainHparams().hash()
    assert ChainHparams(seed=1, seed_scope="training").hash() != ChainHparams(seed_scope="training").hash()


def test_all_scope_draws_everything_from_seed(digits, tiny_chain_hp):
    hp = tiny_chain_hp.replace(seed=3)
    c = Chain(hp, data=digits)
    init = build_model(hp.model, digits.train.shape, digits.train.num_classes, seed=derive_seed(hp.seed, "init"))
    assert _same_state(c.state.init, init.state_dict())

    # round 0 by hand, its streams drawn from hp.seed itself
    model = c.subnetwork()
    train(model, digits.train, hp.pruning_training, mask=c.mask,
          order_seed=derive_seed(hp.seed, "prune", 0, "order"), aug_seed=derive_seed(hp.seed, "prune", 0, "augment"))
    target = int(round(c.mask.total * density_after(1, hp.pruning.fraction)))
    expect = magnitude_prune(c.mask, {k: v.detach() for k, v in model.state_dict().items()},
                             target_remaining=target, scope=hp.pruning.scope)
    c.step()
    assert c.mask.equal(expect)

    other = Chain(hp.replace(seed=1), data=digits)
    other.step()
    assert not other.mask.equal(c.mask)
    assert not _same_state(other.state.init, c.state.init)
    # controls follow the seed as well
    _, m3 = control_subnetwork(c.hp, digits, c.state.init, c.mask, "shuffled")
    _, m1 = control_subnetwork(other.hp, digits, c.state.init, c.mask, "shuffled")
    assert not m3.equal(m1)


def test_training_scope_fixes_the_mask_not_the_trainings(digits, tiny_chain_hp):
    hp = _with(tiny_chain_hp, seed_scope="training", pruning={"rounds": 2, "rewind_epoch": 1})
    a, b = Chain(hp, data=digits), Chain(hp.replace(seed=1), data=digits)
    init = build_model(hp.model, digits.train.shape, digits.train.num_classes, seed=derive_seed(0, "init"))
    assert _same_state(a.state.init, init.state_dict()) and _same_state(b.state.init, a.state.init)
    assert _same_state(b.state.rewind, a.state.rewind)
    a.run(), b.run()
    assert a.mask.equal(b.mask) and a.mask.sparsity > 0
    assert a.hp.hash() != b.hp.hash()

    # the trainings after pruning follow `seed`
    (a0, _), _ = train_pair(a.hp, digits, a.state.rewind_point, a.mask)
    (b0, _), _ = train_pair(b.hp, digits, b.state.rewind_point, b.mask)
    assert not _same_state(a0.state_dict(), b0.state_dict())
    assert a.evaluate()["train_loss"] != b.evaluate()["train_loss"]

    # the controls follow the mask's seed, so they are the same for every seed
    for name in ("shuffled", "reinit"):
        wa, ma = control_subnetwork(a.hp, digits, a.state.rewind_point, a.mask, name)
        wb, mb = control_subnetwork(b.hp, digits, b.state.rewind_point, b.mask, name)
        assert ma.equal(mb) and _same_state(wa, wb)
