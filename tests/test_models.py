import pytest
import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.hparams import ModelHparams
from prunelab.models import build_model


@pytest.mark.parametrize("name", ["convnet3", "resnet10_bn", "resnet18_bn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_models_fit_any_data_shape(name, shape):
    m = build_model(ModelHparams(name=name, width=8), shape, 7, seed=0)
    assert m(torch.zeros(2, *shape)).shape == (2, 7)


def test_convnet3_is_idc_shaped():
    m = build_model(ModelHparams(name="convnet3"), (3, 32, 32), 10, seed=0)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    norms = [x for x in m.modules() if isinstance(x, nn.GroupNorm)]
    assert len(convs) == 3 and all(c.out_channels == 128 and c.kernel_size == (3, 3) for c in convs)
    assert all(g.num_groups == g.num_channels == 128 and g.affine for g in norms)  # instance norm
    assert m.classifier.in_features == 128 * 4 * 4


def test_convnet_depth_adapts_to_input_size():
    from prunelab.models import default_convnet_depth

    assert [default_convnet_depth(s) for s in (8, 16, 32, 64, 224)] == [2, 2, 3, 4, 5]


def test_resnet_depths_and_stems():
    r10 = build_model(ModelHparams(name="resnet10_bn"), (3, 32, 32), 10, seed=0)
    r18 = build_model(ModelHparams(name="resnet18_bn"), (3, 32, 32), 10, seed=0)
    count = lambda m: sum(isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules())
    assert count(r10) == 1 + 4 * 2 and count(r18) == 1 + 8 * 2
    assert r10.conv1.kernel_size == (3, 3)
    big = build_model(ModelHparams(name="resnet10_bn", width=8), (3, 64, 64), 10, seed=0)
    assert big.conv1.kernel_size == (7, 7)
    assert any(isinstance(x, nn.BatchNorm2d) for x in r10.modules())


def test_same_seed_same_init():
    a = build_model(ModelHparams(name="convnet3", width=8), (1, 8, 8), 10, seed=5)
    b = build_model(ModelHparams(name="convnet3", width=8), (1, 8, 8), 10, seed=5)
    c = build_model(ModelHparams(name="convnet3", width=8), (1, 8, 8), 10, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unknown_model():
    with pytest.raises(ConfigError, match="model.name"):
        ModelHparams.from_dict({"name": "vgg"}, "model")
    bad = ModelHparams()
    object.__setattr__(bad, "name", "vgg")  # bypasses validation: build_model checks again
    with pytest.raises(ConfigError, match="model.name"):
        build_model(bad, (1, 8, 8), 10, 0)
