"""IDC's stored synthetic sets (`data.pt`) and their multi-formation decoding.

IDC (Kim et al., 2022) saves `[images (N, C, H, W) float, labels (N,)]`, class-major (ipc images of
class 0, then class 1, ...), unnormalized in [0, 1] pixel space. Each stored image packs f x f smaller
images ("multi-formation"); decoding cuts it into f x f crops and upsamples every crop bilinearly to
the full resolution, so ipc stored images train as ipc * f^2 images per class.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..data import ImageData, dataset_shape
from ..errors import ConfigError, DataNotFoundError, first_line

FIELD = "pruning_data.path"

# IDC's factors: 2 for CIFAR, 3 for ImageNet-10. The 8x8 digits stay at 1: a 4x4 crop holds too
# little of a digit to be worth four images. The 32x32 generated shapes follow CIFAR.
DEFAULT_FACTORS = {"cifar10": 2, "cifar100": 2, "imagenet10": 3, "shapes": 2, "digits": 1}


def formation_factor(dataset: str, factor: Optional[int] = None) -> int:
    """Images per side that each stored IDC image decodes to: `factor`, or the data set's default."""
    return default_factor(dataset) if factor is None else int(factor)


def default_factor(dataset: str) -> int:
    """The multi-formation factor used when `pruning_data.factor` is not set."""
    return DEFAULT_FACTORS.get(dataset, 2)


def decode_zoom(images: torch.Tensor, labels: torch.Tensor, factor: int,
                size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IDC's `decode_zoom` on one block of images: crop-major output order.

    The block is padded (value 0.5, right and bottom) to a multiple of `factor`, cut into
    factor x factor crops of side ceil(H / factor); crop (i, j) of every image comes before crop
    (i, j + 1) of any image. Each crop is upsampled bilinearly (align_corners=False) to `size`
    (default: the input size) and the labels are repeated factor^2 times to match.
    """
    if factor <= 1:
        return images, labels
    h = images.shape[-1]
    size = h if size is None else size
    rem = h % factor
    if rem:
        images = F.pad(images, (0, factor - rem, 0, factor - rem), value=0.5)
    s = math.ceil(h / factor)
    crops = [images[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s] for i in range(factor) for j in range(factor)]
    out = F.interpolate(torch.cat(crops), size=(size, size), mode="bilinear", align_corners=False)
    return out, labels.repeat(factor * factor)


def decode(images: torch.Tensor, labels: torch.Tensor, factor: int, num_classes: int,
           size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IDC's `decode`: `decode_zoom` applied per class block of a class-major set."""
    if factor <= 1:
        return images, labels
    ipc = len(images) // num_classes
    xs, ys = [], []
    for c in range(num_classes):
        x, y = decode_zoom(images[c * ipc:(c + 1) * ipc], labels[c * ipc:(c + 1) * ipc], factor, size)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def decode_set(data: ImageData) -> ImageData:
    """An encoded synthetic set (meta['factor'] > 1, not yet decoded) -> its decoded training set."""
    f = int(data.meta.get("factor", 1) or 1)
    if f <= 1 or data.meta.get("decoded", False):
        return data
    x, y = decode(data.x, data.y, f, data.num_classes)
    return data.with_images(x, y, meta={**data.meta, "decoded": True, "decoded_count": len(x)})


def resolve_path(path: str) -> Path:
    """`path` is IDC's data.pt or the folder that holds it."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "data.pt"
    if not p.is_file():
        raise DataNotFoundError(FIELD, f"{p} does not exist",
                                "point pruning_data.path at IDC's data.pt or the folder that holds it")
    return p


def read_idc_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load `[images, labels]` from an IDC file, turning every failure into a ConfigError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise ConfigError(FIELD, f"{path} cannot be read as a torch file ({type(e).__name__}: {first_line(e, 200)})",
                          "the file is truncated or not IDC's data.pt: copy it again") from None
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(torch.is_tensor(t) for t in obj)):
        raise ConfigError(FIELD, f"{path} does not hold [images, labels] (got {type(obj).__name__})",
                          "use the data.pt that IDC's condense.py saves")
    return obj[0], obj[1]


def validate_idc(images: torch.Tensor, labels: torch.Tensor, real: ImageData, source: str) -> int:
    """Check an IDC set against the real data set it stands in for; returns its ipc."""
    if not images.is_floating_point():
        raise ConfigError(FIELD, f"{source}: images have dtype {images.dtype}, expected float in [0, 1]",
                          "use IDC's data.pt (float images, unnormalized)")
    if images.ndim != 4:
        raise ConfigError(FIELD, f"{source}: images have shape {tuple(images.shape)}, expected (N, C, H, W)",
                          "use IDC's data.pt")
    want = tuple(real.shape)
    if tuple(images.shape[1:]) != want:
        what = "channel count" if images.shape[1] != want[0] else "image size"
        raise ConfigError(FIELD, f"{source}: images are {tuple(images.shape[1:])} (C, H, W) but the real "
                          f"{real.name or 'data'} set has {want} ({what} differs)",
                          "use the IDC file distilled from this data set, or change dataset.name / image_size")
    if labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfigError(FIELD, f"{source}: labels must be an integer vector of length {len(images)}, "
                          f"got {labels.dtype} {tuple(labels.shape)}", "use IDC's data.pt")
    k = real.num_classes
    n = len(images)
    if n == 0 or n % k:
        raise ConfigError(FIELD, f"{source}: {n} images cannot be {k} equal class blocks",
                          f"use an IDC file for a {k}-class data set")
    classes = int(labels.max()) + 1 if n else 0
    if classes != k or int(labels.min()) < 0:
        raise ConfigError(FIELD, f"{source}: labels span {classes} classes, the real set has {k}",
                          f"use the IDC file distilled from this {k}-class data set")
    ipc = n // k
    if not torch.equal(labels.long(), torch.arange(k).repeat_interleave(ipc)):
        raise ConfigError(FIELD, f"{source}: labels are not class-major and balanced "
                          f"({ipc} images of class 0, then class 1, ...)",
                          "sort the set by class, with the same number of images per class")
    if not torch.isfinite(images).all():
        raise ConfigError(FIELD, f"{source}: images contain NaN or infinite values",
                          "the distillation diverged: use another file")
    return ipc


def load_idc_file(path: str, real: ImageData, factor: Optional[int] = None,
                  expected_ipc: Optional[int] = None) -> ImageData:
    """IDC's saved synthetic set, validated against `real` and decoded with `factor`.

    `factor` defaults to `default_factor(real.name)`; ipc is read from the file (and, if
    `expected_ipc` is given, must match it). The result keeps `real`'s normalization and class count.
    """
    p = resolve_path(path)
    images, labels = read_idc_tensors(p)
    ipc = validate_idc(images, labels, real, str(p))
    _check_ipc(p, ipc, expected_ipc)
    f = formation_factor(real.name, factor)
    if f < 1:
        raise ConfigError("pruning_data.factor", f"must be >= 1, got {f}", "IDC uses 2 (CIFAR) or 3 (ImageNet)")
    x, y = decode(images.float(), labels.long(), f, real.num_classes)
    meta = {"kind": "idc_file", "source": str(p.resolve()), "ipc": ipc, "factor": f,
            "decoded": True, "decoded_count": len(x)}
    return real.with_images(x.contiguous(), y, name=f"{real.name}-idc-file-ipc{ipc}", meta=meta)


def _check_ipc(p: Path, ipc: int, expected_ipc: Optional[int]) -> None:
    if expected_ipc is not None and expected_ipc != ipc:
        raise ConfigError("pruning_data.ipc", f"{p} holds {ipc} images per class, not {expected_ipc}",
                          f"set pruning_data.ipc to {ipc} (or leave it out)")


def check_idc_file(pruning_data, dataset) -> int:
    """Before any compute, without the real data: the IDC file `pruning_data.path` is readable and
    fits the data set `dataset` names (image shape, classes, balance, ipc). Returns its ipc."""
    shape, k = dataset_shape(dataset)
    stand_in = ImageData(torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.long), num_classes=k,
                         mean=(0.0,) * shape[0], std=(1.0,) * shape[0], name=dataset.name)
    p = resolve_path(pruning_data.path)
    images, labels = read_idc_tensors(p)
    ipc = validate_idc(images, labels, stand_in, str(p))
    _check_ipc(p, ipc, pruning_data.ipc)
    return ipc
