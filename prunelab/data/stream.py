"""Global batches streamed from host memory, for sets that do not fit on the device.

`StreamingBatches` yields the batches of the device-resident loop (`prunelab.train.ResidentBatches`, what
`prunelab.train.train` draws): the same `DataOrder` index list at every step, gathered in host memory
by a DataLoader (in worker processes if asked), moved to the device and augmented there with the
same generator stream, so a run gets the same batches whichever path feeds it. A set can also live in
a folder of memory-mapped arrays (`prunelab.data.folder`), so the host does not hold it either.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..hparams import TrainingHparams
from ..train import RESIDENT_FRACTION, DataOrder, make_augment, resolve_device, total_steps
from .base import ImageData
from .folder import open_folder, save_folder

__all__ = ["StreamingBatches", "OrderSampler", "open_folder", "resident_fits", "save_folder"]

Batch = tuple[torch.Tensor, torch.Tensor]


def resident_fits(data: ImageData, device, fraction: float = RESIDENT_FRACTION,
                  budget_bytes: Optional[int] = None) -> bool:
    """Whether `data` should be kept on `device` rather than streamed: its bytes are at most
    `fraction` of `budget_bytes`, which defaults to the free memory of a CUDA device and to no
    limit on the CPU (the rule `prunelab.train.place` applies)."""
    device = resolve_device(device)
    if budget_bytes is None:
        if device.type != "cuda" or data.x.device == device:
            return True
        budget_bytes, _ = torch.cuda.mem_get_info(device)
    return data.nbytes <= fraction * budget_bytes


class OrderSampler(Sampler):
    """The index lists of steps [start, stop) of `DataOrder(seed, n, batch_size, start)`, one per step."""

    def __init__(self, seed: int, n: int, batch_size: int, start: int, stop: int):
        self.seed, self.n, self.batch_size, self.start, self.stop = seed, n, batch_size, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = DataOrder(self.seed, self.n, self.batch_size, self.start)
        for step in range(self.start, self.stop):
            # a copy, not a view of the epoch's permutation: workers receive only the batch's indices
            yield order.indices(step).clone()


class _Gather(Dataset):
    """Indexed by a whole batch's index list: one gather per batch instead of one fetch per example."""

    def __init__(self, data: ImageData):
        self.x, self.y = data.x, data.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: torch.Tensor) -> Batch:
        return self.x[idx], self.y[idx]


class StreamingBatches:
    """The global batches of steps [start_step, stop) streamed from host memory.

    `data_or_folder` is an ImageData (moved to the CPU if it is not there) or a folder written by
    `save_folder`. Steps and batches are those of `ResidentBatches` for the same `hp`, seeds and
    `start_step`: the batch of a step holds the same examples, in the same order, with the same
    augmentation draws. `stop_step` defaults to the end of the schedule (`hp.epochs` or `hp.steps`).
    Batches are gathered by a DataLoader (`num_workers` processes; 0 = in this process), pinned
    when the device is CUDA, and augmented on the device. Every iteration starts the streams afresh
    (the augmentation's at `aug_state` when given: a run resumed part-way); `gen` is the running one's.
    """

    def __init__(self, data_or_folder: Union[ImageData, str, os.PathLike], hp: TrainingHparams,
                 order_seed: int = 0, aug_seed: int = 0, start_step: int = 0, *, stop_step: Optional[int] = None,
                 device="cpu", num_workers: int = 0, aug_state: Optional[torch.Tensor] = None):
        data = data_or_folder if isinstance(data_or_folder, ImageData) else open_folder(data_or_folder)
        self.data = data if data.x.device.type == "cpu" else data.to("cpu")
        self.device = resolve_device(device)
        n = len(self.data)
        total = total_steps(hp, n)
        self.sampler = OrderSampler(order_seed, n, hp.batch_size, start_step,
                                    total if stop_step is None else min(stop_step, total))
        self.augment = make_augment(hp.augment, self.data, hp.cutmix_prob)
        self.aug_seed, self.aug_state, self.num_workers = aug_seed, aug_state, num_workers
        self.gen: Optional[torch.Generator] = None  # the augmentation stream of the running iteration

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        data, device = self.data, self.device
        loader = DataLoader(_Gather(data), sampler=self.sampler, batch_size=None, num_workers=self.num_workers,
                            pin_memory=device.type == "cuda")
        gen = self.gen = torch.Generator(device=device).manual_seed(self.aug_seed)  # as Loop.aug_generator
        if self.aug_state is not None:  # a run resumed part-way (see prunelab.train.train)
            gen.set_state(self.aug_state)
        for x, y in loader:
            xb = data.pixels(x.to(device, non_blocking=True))
            yb = y.to(device, non_blocking=True)
            if self.augment is not None:
                xb, yb = self.augment(xb, yb, gen)
            yield data.normalize(xb), yb
