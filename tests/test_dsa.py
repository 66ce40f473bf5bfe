import torch

from prunelab.data.dsa import apply_dsa, dsa, dsa_siamese, make_dsa_augment, sample_dsa_params


def _x(n=6, c=3, s=8, seed=0):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def test_dsa_is_deterministic_for_a_seed_and_keeps_shape():
    x = _x()
    a = dsa(x, torch.Generator().manual_seed(3))
    b = dsa(x, torch.Generator().manual_seed(3))
    c = dsa(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_flows_to_inputs():
    x = _x().requires_grad_(True)
    dsa(x, torch.Generator().manual_seed(0)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    y = _x(seed=1).requires_grad_(True)
    a, b = dsa_siamese(y, y * 2, torch.Generator().manual_seed(0))
    (a.sum() + b.sum()).backward()
    assert y.grad.abs().sum() > 0


def test_siamese_applies_identical_transform():
    x = _x(n=4)
    a, b = dsa_siamese(x, x.clone(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # one shared draw: each image transformed as it would be alone
    p = sample_dsa_params(1, (8, 8), torch.Generator().manual_seed(7))
    assert torch.equal(apply_dsa(x[:1], p), a[:1])


def test_augment_without_and_with_cutmix():
    x, y = _x(n=16, c=1), torch.arange(16) % 10
    aug = make_dsa_augment(cutmix=False)
    xa, t = aug(x, y, torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and torch.equal(t, y)
    aug = make_dsa_augment(cutmix=True, num_classes=10)
    mixed = 0
    for s in range(8):
        xa, t = aug(x, y, torch.Generator().manual_seed(s))
        assert t.shape == (16, 10) and torch.allclose(t.sum(1), torch.ones(16))
        mixed += int((t.max(1).values < 1).any())
    assert 0 < mixed < 8  # CutMix fires on some batches only (p = 1/2)


def test_train_accepts_dsa_cutmix(digits):
    from prunelab.hparams import ModelHparams, TrainingHparams
    from prunelab.models import build_model
    from prunelab.train import train

    model = build_model(ModelHparams(name="convnet3", width=8), digits.train.shape, 10, seed=0)
    res = train(model, digits.train.subset(torch.arange(64)), TrainingHparams(steps=3, augment="dsa_cutmix"))
    assert res.steps == 3


def test_standard_cutmix_mixes_crops_and_labels(digits):
    from prunelab.hparams import ModelHparams, TrainingHparams
    from prunelab.models import build_model
    from prunelab.train import make_augment, train

    aug = make_augment("standard_cutmix", digits.train)
    x, y = digits.train.pixels(digits.train.x[:32]), digits.train.y[:32]
    mixed = [aug(x, y, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(t.shape == (32, 10) and torch.allclose(t.sum(1), torch.ones(32)) for _, t in mixed)
    assert any((t.max(1).values < 1).any() for _, t in mixed)  # some batches were cut and mixed
    model = build_model(ModelHparams(name="convnet3", width=8), digits.train.shape, 10, seed=0)
    assert train(model, digits.train.subset(torch.arange(64)), TrainingHparams(steps=3, augment="standard_cutmix")).steps == 3


def test_dsa_runs_on_normalized_images_as_idc_does():
    # by hand: normalize with the data set's mean/std, apply DSA drawn from the same seed, map back
    x, y = _x(n=5, c=3), torch.arange(5)
    mean, std = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    got, t = make_dsa_augment(cutmix=False, mean=mean, std=std)(x, y, torch.Generator().manual_seed(5))
    ref = dsa((x - m) / s, torch.Generator().manual_seed(5)) * s + m
    assert torch.allclose(got, ref, atol=1e-6) and torch.equal(t, y)
    # not the same as DSA in pixel space: a brightness shift of b moves pixels by b·std, not b
    pixel = dsa(x, torch.Generator().manual_seed(5))
    assert (got - pixel).abs().max() > 1e-2
