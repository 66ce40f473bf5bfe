"""ConvNet-3 as IDC defines it: [conv 3x3 -> instance norm -> ReLU -> avg-pool 2x2] x depth -> linear."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """IDC's ConvNet. Instance norm is GroupNorm with one group per channel (affine), as in IDC.

    Pooling stops once the feature map is 1x1, so the same net fits 8x8 digits and 224px ImageNet.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 128, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c, s = channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True)]
            if s >= 2:
                layers.append(nn.AvgPool2d(2, 2))
                s //= 2
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * s * s, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
