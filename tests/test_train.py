import pytest
import torch

from prunelab.errors import DivergenceError
from prunelab.hparams import ModelHparams, TrainingHparams
from prunelab.masks import Mask, magnitude_prune
from prunelab.models import build_model
from prunelab.train import evaluate, lr_factor, train


def _net(seed=0):
    return build_model(ModelHparams(name="convnet3", width=8), (1, 8, 8), 10, seed=seed)


def test_training_learns_digits(digits):
    m = _net()
    before = evaluate(m, digits.test)["accuracy"]
    train(m, digits.train, TrainingHparams(epochs=4, lr=0.05))
    after = evaluate(m, digits.test)["accuracy"]
    assert after > 0.7 and after > before + 0.4


def test_pruned_weights_stay_exactly_zero(digits):
    m = _net()
    mask = magnitude_prune(Mask.ones_like(m), m.state_dict(), 0.7)
    train(m, digits.train, TrainingHparams(epochs=1, lr=0.05, weight_decay=5e-4), mask=mask)
    params = dict(m.named_parameters())
    for n, keep in mask.items():
        assert (params[n][~keep] == 0).all()
        assert (params[n][keep] != 0).float().mean() > 0.99


def test_seeds_are_separate_and_reproducible(digits):
    hp = TrainingHparams(epochs=1, lr=0.05)

    def run(order, aug):
        m = _net()
        train(m, digits.train, hp, order_seed=order, aug_seed=aug)
        return m.classifier.weight.detach().clone()

    a = run(0, 0)
    assert torch.equal(a, run(0, 0))
    assert not torch.equal(a, run(1, 0))
    assert not torch.equal(a, run(0, 1))


def test_schedule_milestones_on_epoch_boundaries():
    hp = TrainingHparams(epochs=6, batch_size=10, milestones=(0.5,), gamma=0.1)
    f = lr_factor(hp, 100)  # 10 steps per epoch, milestone at epoch 3 = step 30
    assert f(29) == 1.0 and f(30) == pytest.approx(0.1)
    w = lr_factor(TrainingHparams(steps=100, warmup_steps=4), 100)
    assert w(0) == pytest.approx(0.25) and w(4) == 1.0


def test_resume_mid_schedule_matches_uninterrupted(digits):
    hp = TrainingHparams(epochs=2, lr=0.05, augment="none", momentum=0.0)
    full = _net()
    train(full, digits.train, hp, order_seed=3)
    part = _net()
    steps = len(digits.train) // 64 + 1
    train(part, digits.train, hp, order_seed=3, stop_step=steps)
    train(part, digits.train, hp, order_seed=3, start_step=steps)
    # no momentum and no augmentation: the only state is the weights and the data order
    assert torch.allclose(full.classifier.weight, part.classifier.weight, atol=1e-6)


def test_divergence_is_reported(digits):
    with pytest.raises(DivergenceError, match="learning rate"):
        train(_net(), digits.train, TrainingHparams(epochs=2, lr=1e6, weight_decay=0.0))


def test_callback_gets_epoch_metrics(digits):
    seen = []
    train(_net(), digits.train, TrainingHparams(epochs=2, lr=0.05), eval_data=digits.test, eval_every=1,
          callback=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2]
    assert "test_accuracy" in seen[-1][1] and seen[-1][1]["train_loss"] > 0


def test_examples_drawn_counts_partial_batches():
    from prunelab.train import examples_drawn

    assert examples_drawn(10, 64, 5) == 50  # a 10-image set: 10 per step, not 64
    assert examples_drawn(100, 64, 2) == 100 and examples_drawn(100, 64, 3) == 164
    assert examples_drawn(1438, 64, 23 * 4) == 4 * 1438
