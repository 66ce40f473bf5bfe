"""The tensor data set every part of prunelab trains and evaluates on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


@dataclass
class ImageData:
    """Images in pixel space plus what is needed to normalize and augment them.

    `x` is (N, C, H, W), either uint8 in [0, 255] or float in [0, 1] pixel space (distilled images may
    stray outside it); normalization with `mean`/`std` happens per batch, on the device, so the stored
    set stays compact (uint8 CIFAR is 150 MB).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    crop_pad: int = 4
    flip: bool = True
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.x.ndim != 4:
            raise ValueError(f"ImageData.x must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageData.y must be ({self.x.shape[0]},), got shape {tuple(self.y.shape)}")
        if len(self.mean) != self.x.shape[1] or len(self.std) != self.x.shape[1]:
            raise ValueError("ImageData.mean/std must have one entry per channel")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.x.element_size() * self.x.nelement() + self.y.element_size() * self.y.nelement()

    def to(self, device) -> "ImageData":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def subset(self, index: torch.Tensor) -> "ImageData":
        return replace(self, x=self.x[index], y=self.y[index])

    def with_images(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, **changes) -> "ImageData":
        """Same normalization and augmentation spec, other images (used for synthetic sets)."""
        return replace(self, x=x, y=self.y if y is None else y, **changes)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float batch -> float pixels in [0, 1]."""
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def counts(self) -> torch.Tensor:
        return torch.bincount(self.y.cpu(), minlength=self.num_classes)


@dataclass
class DataSplit:
    train: ImageData
    test: ImageData
