"""A data set as a folder of memory-mapped arrays: x.npy (uint8 or float pixels), y.npy (labels) and
meta.json (normalization and augmentation spec), so a set larger than memory (ImageNet-1k at 224 px:
about 193 GB) is read a batch's pages at a time. `save_folder` writes one from an ImageData,
`FolderWriter` fills one part by part, `open_folder` maps it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..errors import DataNotFoundError
from .base import ImageData


def _spec(num_classes: int, mean, std, name: str, crop_pad: int, flip: bool) -> dict:
    return {"num_classes": num_classes, "mean": list(mean), "std": list(std), "name": name,
            "crop_pad": crop_pad, "flip": flip}


def save_folder(data: ImageData, folder: Union[str, os.PathLike]) -> Path:
    """Write `data` as a streaming folder: x.npy, y.npy and meta.json (the normalization and
    augmentation spec; `data.meta` is not kept). meta.json is written last: it marks a whole folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", data.x.cpu().numpy())
    np.save(folder / "y.npy", data.y.cpu().numpy())
    spec = _spec(data.num_classes, data.mean, data.std, data.name, data.crop_pad, data.flip)
    (folder / "meta.json").write_text(json.dumps(spec))
    return folder


def open_folder(folder: Union[str, os.PathLike]) -> ImageData:
    """The set of a streaming folder with memory-mapped pixels and labels: a batch reads only its pages."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise DataNotFoundError("data", f"{folder} is not a streaming folder (it has no meta.json)",
                                "write one with prunelab.data.folder.save_folder(data, folder)")
    spec = json.loads((folder / "meta.json").read_text())
    # copy-on-write mapping: writable for torch, nothing read before it is indexed
    x, y = (torch.from_numpy(np.load(folder / f, mmap_mode="c")) for f in ("x.npy", "y.npy"))
    return ImageData(x, y, spec["num_classes"], tuple(spec["mean"]), tuple(spec["std"]), name=spec["name"],
                     crop_pad=spec["crop_pad"], flip=spec["flip"])


@contextmanager
def exclusive(folder: Union[str, os.PathLike]):
    """Hold the lock of `folder` (an flock on `<folder>.lock` beside it) while the block runs: one
    process of a machine makes a folder, the others wait, then find it made."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FolderWriter:
    """A streaming folder of `n` images of `shape` (uint8) filled part by part in a temporary folder
    beside `folder`, which `finish` moves into place whole (meta.json written last): a reader never
    maps a half-written set. Write under `exclusive(folder)`: the temporary folders a killed writer
    of this machine left are then nobody's, and are removed first."""

    def __init__(self, folder: Union[str, os.PathLike], n: int, shape: tuple[int, int, int]):
        self.folder = Path(folder)
        # this machine's only: on a shared file system whose locks hold within one machine, another
        # machine's writer may be at work
        host = socket.gethostname()
        for stale in self.folder.parent.glob(f"{self.folder.name}.partial-{host}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.folder.with_name(f"{self.folder.name}.partial-{host}-{os.getpid()}")
        self.tmp.mkdir(parents=True)
        self.x = np.lib.format.open_memmap(self.tmp / "x.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
        self.y = np.lib.format.open_memmap(self.tmp / "y.npy", mode="w+", dtype=np.int64, shape=(n,))
        self.filled = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The next `len(x)` images and their labels."""
        end = self.filled + len(x)
        self.x[self.filled:end] = x.numpy()
        self.y[self.filled:end] = y.numpy()
        self.filled = end

    def finish(self, num_classes: int, mean, std, name: str, crop_pad: int, flip: bool = True) -> Path:
        if self.filled != len(self.y):
            raise RuntimeError(f"{self.filled} of {len(self.y)} images written")
        self.x.flush()
        self.y.flush()
        del self.x, self.y
        (self.tmp / "meta.json").write_text(json.dumps(_spec(num_classes, mean, std, name, crop_pad, flip)))
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.tmp, self.folder)
        return self.folder
