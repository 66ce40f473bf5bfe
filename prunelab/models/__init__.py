"""Model registry: `build_model(ModelHparams, data) -> nn.Module`, shapes taken from the data set."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .convnet import ConvNet
from .resnet import Bottleneck, ResNet


def default_convnet_depth(image_size: int) -> int:
    """IDC's 3 blocks at 32 px, one more per doubling above (capped at 5 for 224 px ImageNet), and
    never fewer than 2; so 8 px digits get 2 blocks and a 2x2 last map rather than instance-norming
    a 2x2 map down to 1x1."""
    return max(2, min(5, int(math.log2(image_size)) - 2))


def _convnet3(c, s, k, width=None, depth=None):
    return ConvNet(c, s, k, width=width or 128, depth=depth or default_convnet_depth(s))


def _resnet10(c, s, k, width=None, depth=None):
    return ResNet([1, 1, 1, 1], c, s, k, width=width or 64)


def _resnet18(c, s, k, width=None, depth=None):
    return ResNet([2, 2, 2, 2], c, s, k, width=width or 64)


def _resnet50(c, s, k, width=None, depth=None):
    return ResNet([3, 4, 6, 3], c, s, k, width=width or 64, block=Bottleneck)


MODELS = {"convnet3": _convnet3, "resnet10_bn": _resnet10, "resnet18_bn": _resnet18, "resnet50_bn": _resnet50}


def build_model(hp, shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
    """A freshly initialized model; the same `seed` gives the same weights on the same device type."""
    if hp.name not in MODELS:
        raise ConfigError("model.name", f"unknown model {hp.name!r}", "use one of " + ", ".join(sorted(MODELS)))
    c, h, w = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[hp.name](c, h, num_classes, width=hp.width, depth=hp.depth)


__all__ = ["MODELS", "build_model", "ConvNet", "ResNet"]
