"""The training engine: SGD/Adam over a device-resident tensor data set, masks enforced every step.

Data order and augmentation have their own seeds (the model's initialization is seeded where it is
built), so two copies that differ only in data order are one argument apart. The loop's pieces
(`Loop`, `DataOrder`, `LossMeter`, `optimizer_step`, `run_state`) also drive
`prunelab.stacked.train_copies` and `prunelab.parallel.train_data_parallel`, to which `delegated`
hands every `train` (and `train_each`) call of a data-parallel chain.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import to_cpu
from .data.augment import random_crop_flip
from .data.dsa import CUTMIX_PROB, apply_cutmix, make_dsa_augment
from .data.base import ImageData
from .errors import ConfigError, DivergenceError
from .hparams import TrainingHparams
from .masks import Mask

# (pixels in [0,1], labels, generator) -> (augmented pixels, targets: class ids or soft labels)
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
EpochCallback = Callable[[int, dict], None]

# fraction of free GPU memory a data set may take before it is streamed from host memory instead
RESIDENT_FRACTION = 0.5


def resolve_device(device) -> torch.device:
    """A torch.device from a string/device; 'cuda' without an index is left to the current device."""
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{d} was requested but CUDA is not available", "use device='cpu'")
    return d


def make_augment(kind: str, data: ImageData, cutmix_prob: float = CUTMIX_PROB) -> Optional[Augment]:
    """The augmentation named by TrainingHparams.augment, for this data set (CutMix, where the kind
    has it, on each batch with probability `cutmix_prob`)."""
    if kind == "none":
        return None
    if kind in ("standard", "standard_cutmix"):
        pad, flip, k = data.crop_pad, data.flip, data.num_classes
        if kind == "standard_cutmix":
            def standard_cutmix(x, y, gen):
                return apply_cutmix(random_crop_flip(x, pad, flip, gen), y, k, gen, prob=cutmix_prob)

            return standard_cutmix

        def standard(x, y, gen):
            return random_crop_flip(x, pad, flip, gen), y

        return standard
    if kind in ("dsa", "dsa_cutmix"):
        return make_dsa_augment(cutmix=kind == "dsa_cutmix", num_classes=data.num_classes, prob=cutmix_prob,
                                mean=data.mean, std=data.std)
    raise ConfigError("training.augment", f"unknown augmentation {kind!r}",
                      "use standard, standard_cutmix, none, dsa or dsa_cutmix")


def place(data: ImageData, device: torch.device) -> ImageData:
    """Move the set onto the device if it fits comfortably; otherwise keep it in host memory and let
    the loop stream uint8 batches: pinned when that also fits comfortably in the host's free memory,
    else where it is (a memory-mapped set such as ImageNet-1k is read a batch's pages at a time)."""
    if device.type != "cuda" or data.x.device == device:
        return data.to(device) if device.type != "cuda" else data
    free, _ = torch.cuda.mem_get_info(device)
    if data.nbytes <= RESIDENT_FRACTION * free:
        return data.to(device)
    if data.nbytes > RESIDENT_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"):
        return data
    return ImageData(**{**data.__dict__, "x": data.x.cpu().pin_memory(), "y": data.y.cpu().pin_memory()})


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def examples_drawn(n: int, batch_size: int, steps: int) -> int:
    """Training examples drawn by `steps` steps over a set of `n` (an epoch's last batch is partial)."""
    spe = steps_per_epoch(n, batch_size)
    return (steps // spe) * n + min((steps % spe) * batch_size, n)


def total_steps(hp: TrainingHparams, n: int) -> int:
    return hp.steps if hp.steps else hp.epochs * steps_per_epoch(n, hp.batch_size)


def lr_factor(hp: TrainingHparams, n: int) -> Callable[[int], float]:
    """Step -> lr multiplier: linear warm-up, then x gamma at each milestone (a fraction of all
    steps; for 300 epochs the 2/3 and 5/6 milestones fall on epochs 200 and 250 exactly)."""
    total = total_steps(hp, n)
    miles = [int(round(m * total)) for m in hp.milestones]

    def factor(step: int) -> float:
        f = hp.gamma ** sum(step >= m for m in miles)
        if hp.warmup_steps and step < hp.warmup_steps:
            f *= (step + 1) / hp.warmup_steps
        return f

    return factor


def make_optimizer(model: nn.Module, hp: TrainingHparams, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                               nesterov=hp.nesterov, **fused)
    return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)


@dataclass
class TrainResult:
    steps: int
    epochs: float
    train_loss: float
    history: list[dict] = field(default_factory=list)


def autocast(hp: TrainingHparams, device: torch.device):
    """bf16 autocast where `hp.precision` asks for it and the device is CUDA; a no-op otherwise."""
    enabled = hp.precision == "bf16" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def prepare(model: nn.Module, hp: TrainingHparams, device: torch.device) -> nn.Module:
    """Move `model` to the device (channels-last where asked); returns what the loop calls (compiled
    if asked)."""
    model.to(device)
    if hp.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if not hp.compile:
        return model
    return torch.compile(model, mode=None if hp.compile_mode == "default" else hp.compile_mode)


def masker(mask: Optional[Mask], model: nn.Module) -> Callable[[], None]:
    """A function zeroing `model`'s pruned weights in place (one fused multiply; a no-op without a mask)."""
    pairs = mask.device_tensors(model) if mask is not None else []
    params, values = [p for p, _ in pairs], [m for _, m in pairs]

    @torch.no_grad()
    def apply() -> None:
        if params:
            torch._foreach_mul_(params, values)

    return apply


class DataOrder:
    """One run's data order: a fresh permutation of the set every epoch from its own CPU generator."""

    def __init__(self, seed: int, n: int, batch_size: int, start_step: int = 0, device=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.n, self.batch_size = n, batch_size
        self.spe = steps_per_epoch(n, batch_size)
        self.device = device  # where the indices go (the data's device), None = stay on the CPU
        self.perm: Optional[torch.Tensor] = None
        # skip the permutations of the epochs before start_step, so a resumed run sees the same order
        for _ in range(start_step // self.spe):
            torch.randperm(n, generator=self.gen)

    def indices(self, step: int) -> torch.Tensor:
        """The example indices of `step`'s batch (steps are visited in order)."""
        pos = step % self.spe
        if self.perm is None or pos == 0:
            self.perm = torch.randperm(self.n, generator=self.gen)
            if self.device is not None:
                self.perm = self.perm.to(self.device)
        return self.perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class LossMeter:
    """Sums per-step losses on the device (one value, or one per copy); `take` is the epoch's single
    host sync."""

    def __init__(self, size: int, device: torch.device):
        self.sum = torch.zeros(size, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach().float()
        self.count += 1

    def take(self) -> list[float]:
        """The mean losses since the last call, then reset."""
        means = [v / self.count for v in self.sum.tolist()]
        self.sum.zero_()
        self.count = 0
        return means


@dataclass
class Loop:
    """What a training loop needs besides the model: the placed data, the schedule, the augmentation."""

    hp: TrainingHparams
    data: ImageData
    device: torch.device
    spe: int
    stop: int
    factor: Callable[[int], float]
    augment: Optional[Augment]

    @classmethod
    def make(cls, data: ImageData, hp: TrainingHparams, device, stop_step: Optional[int] = None) -> "Loop":
        device = resolve_device(device)
        data = place(data, device)
        n = len(data)
        total = total_steps(hp, n)
        return cls(hp, data, device, steps_per_epoch(n, hp.batch_size),
                   total if stop_step is None else min(stop_step, total), lr_factor(hp, n),
                   make_augment(hp.augment, data, hp.cutmix_prob))

    def order(self, seed: int, start_step: int) -> DataOrder:
        return DataOrder(seed, len(self.data), self.hp.batch_size, start_step,
                         self.device if self.data.x.device == self.device else None)

    def aug_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized (augmented) pixels and targets of the examples `idx`, on the device."""
        data, device = self.data, self.device
        xb = data.pixels(data.x[idx].to(device, non_blocking=True))
        yb = data.y[idx].to(device, non_blocking=True)
        if self.augment is not None:
            xb, yb = self.augment(xb, yb, gen)
        return data.normalize(xb), yb

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        if self.hp.channels_last and self.device.type == "cuda":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def lr(self, step: int) -> float:
        return self.hp.lr * self.factor(step)

    def epoch_ends(self, step: int) -> bool:
        """True after the last step of an epoch, or of the run."""
        return step % self.spe == 0 or step == self.stop

    def record(self, step: int, loss: float, lr: float) -> dict:
        return {"epoch": step / self.spe, "step": step, "train_loss": loss, "lr": lr}

    def divergence(self, loss: float, step: int, lr: float, who: str = "") -> DivergenceError:
        return DivergenceError(f"{who}training loss became {loss} at step {step} (epoch {step / self.spe:.2f}, "
                               f"lr {lr:g}); lower the learning rate")


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, remask: Callable[[], None]) -> None:
    """Backward and one optimizer step at `lr`, then zero the pruned weights again."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    remask()


# what `train` (and `train_each`) hand their calls to inside `delegated` (prunelab.parallel's leader)
_delegate: ContextVar[Optional["Trainer"]] = ContextVar("prunelab_train_delegate", default=None)


class Trainer(Protocol):
    """What `delegated` takes: `train`'s signature, and `train_each` over jobs."""

    def train(self, model: nn.Module, data: ImageData, hp: TrainingHparams, **kwargs) -> "TrainResult": ...

    def train_each(self, jobs: list["Job"]) -> list["TrainResult"]: ...


@contextmanager
def delegated(trainer: Trainer):
    """Inside the block (in this thread), every `train(model, data, hp, **keywords)` call returns
    `trainer.train(model, data, hp, **keywords)` instead, and `train_each(jobs)` returns
    `trainer.train_each(jobs)`: how `prunelab.parallel` makes every training of a chain (rounds,
    rewinding, evaluations, LMC copies) data-parallel without a parameter through each caller."""
    token = _delegate.set(trainer)
    try:
        yield
    finally:
        _delegate.reset(token)


def is_delegated() -> bool:
    """Whether `train` calls go to a delegate here (see `delegated`)."""
    return _delegate.get() is not None


# one training of `train_each`: the model (trained in place), the data, the hyperparameters and
# `train`'s other keywords (seeds, mask, start_step, ...)
Job = tuple[nn.Module, ImageData, TrainingHparams, dict]


def train_each(jobs: list[Job]) -> list["TrainResult"]:
    """`train(model, data, hp, **keywords)` for each job, one after the other; inside `delegated`,
    the delegate's `train_each`, which may train them at once (a data-parallel group split in parts)."""
    delegate = _delegate.get()
    if delegate is not None:
        return delegate.train_each(jobs)
    return [train(model, data, hp, **kw) for model, data, hp, kw in jobs]


class ResidentBatches:
    """The batches of steps [start_step, loop.stop) gathered from the loop's placed data: normalized
    (augmented) pixels and targets on the device, what `train` draws. `gen` is the augmentation stream
    (a checkpoint takes its state; `aug_state` sets it on a resumed run)."""

    def __init__(self, loop: "Loop", order_seed: int, aug_seed: int, start_step: int = 0,
                 aug_state: Optional[torch.Tensor] = None):
        self.loop, self.start = loop, start_step
        self.order, self.gen = loop.order(order_seed, start_step), loop.aug_generator(aug_seed)
        if aug_state is not None:
            self.gen.set_state(aug_state)

    def __iter__(self):
        for step in range(self.start, self.loop.stop):
            yield self.loop.batch(self.order.indices(step), self.gen)


class EpochEnd:
    """What a training does at each epoch's end besides taking its loss: the test metrics every
    `eval_every` epochs (and at the last), the history, a checkpoint when `checkpoint_every_s` have
    passed since the last (never at the last step), then the callback. `batches` is the run's batch
    stream (its `gen` goes into a checkpoint)."""

    def __init__(self, loop: "Loop", model: nn.Module, opt: torch.optim.Optimizer, batches, history: list[dict],
                 eval_data: Optional[ImageData], eval_every: int, callback: Optional[EpochCallback],
                 checkpoint: Optional[Callable[[dict], None]], checkpoint_every_s: float):
        self.loop, self.model, self.opt, self.batches, self.history = loop, model, opt, batches, history
        self.eval_data, self.eval_every, self.callback = eval_data, eval_every, callback
        self.checkpoint, self.checkpoint_every_s = checkpoint, checkpoint_every_s
        self.saved_at = time.monotonic()

    def __call__(self, step: int, metrics: dict, last_loss: float) -> None:
        loop, model, epoch = self.loop, self.model, metrics["epoch"]
        if self.eval_data is not None and self.eval_every and (round(epoch) % self.eval_every == 0
                                                               or step == loop.stop):
            ev = evaluate(model, self.eval_data, device=loop.device, batch_size=loop.hp.eval_batch_size)
            metrics.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
            model.train()
        self.history.append(metrics)
        due = time.monotonic() - self.saved_at >= self.checkpoint_every_s
        if self.checkpoint is not None and step < loop.stop and due:
            self.checkpoint(run_state(step, model, self.opt, self.batches.gen, self.history, last_loss))
            self.saved_at = time.monotonic()
        if self.callback is not None:
            self.callback(int(math.ceil(epoch)), metrics)


def run_state(step: int, model: nn.Module, opt: torch.optim.Optimizer, aug_gen: torch.Generator,
              history: list[dict], last_loss: float) -> dict:
    """A training's state part-way (the `checkpoint` payload `train` and
    `prunelab.parallel.train_data_parallel` write and resume from): CPU tensors and plain data."""
    return {"step": step, "model": to_cpu(model.state_dict()), "optimizer": to_cpu(opt.state_dict()),
            "aug_rng": aug_gen.get_state(), "history": list(history), "last_loss": last_loss}


def resumed(resume: Optional[dict]) -> tuple[list[dict], float]:
    """The history and last epoch's loss a training starts with: those of `resume`, or none."""
    if resume is None:
        return [], float("nan")
    return list(resume["history"]), float(resume["last_loss"])


def train(model: nn.Module, data: ImageData, hp: TrainingHparams, *, device="cpu", order_seed: int = 0,
          aug_seed: int = 0, mask: Optional[Mask] = None, start_step: int = 0, stop_step: Optional[int] = None,
          eval_data: Optional[ImageData] = None, eval_every: int = 0,
          callback: Optional[EpochCallback] = None, resume: Optional[dict] = None,
          checkpoint: Optional[Callable[[dict], None]] = None, checkpoint_every_s: float = 0.0) -> TrainResult:
    """Train `model` in place on `data`.

    Pruned weights (mask False) are zero before the first step and after every step. `start_step`
    resumes the schedule part-way (training from a rewind point continues its lr schedule);
    `stop_step` ends early (reaching a rewind point). `callback(epoch, metrics)` is called after every
    epoch with the mean training loss; with `eval_data` and `eval_every=k`, every k-th epoch also
    reports test loss and accuracy. A non-finite loss raises DivergenceError.

    Mid-run checkpoints: with `checkpoint`, at the end of an epoch at least `checkpoint_every_s`
    seconds after the last one (or the start), `checkpoint(payload)` gets the training state (weights,
    optimizer, step, augmentation generator, history: CPU tensors and plain data); the same call with
    `resume=payload` continues from it, and on the same device ends with the same weights as a run
    that was never interrupted (the data order of an epoch is a function of the step).
    """
    delegate = _delegate.get()
    if delegate is not None:
        return delegate.train(model, data, hp, device=device, order_seed=order_seed, aug_seed=aug_seed, mask=mask,
                        start_step=start_step, stop_step=stop_step, eval_data=eval_data, eval_every=eval_every,
                        callback=callback, resume=resume, checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s)
    loop = Loop.make(data, hp, device, stop_step)
    device = loop.device
    if resume is not None:
        model.load_state_dict(resume["model"])
        start_step = int(resume["step"])
    net = prepare(model, hp, device)
    remask = masker(mask, model)
    remask()
    opt = make_optimizer(model, hp, device)
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
    batches = ResidentBatches(loop, order_seed, aug_seed, start_step, resume["aug_rng"] if resume else None)
    meter = LossMeter(1, device)

    history, last_loss = resumed(resume)
    end = EpochEnd(loop, model, opt, batches, history, eval_data, eval_every, callback, checkpoint, checkpoint_every_s)
    model.train()
    step = start_step
    for xb, yb in batches:
        xb = loop.memory_format(xb)
        lr = loop.lr(step)
        with autocast(hp, device):
            loss = F.cross_entropy(net(xb), yb)
        optimizer_step(opt, loss, lr, remask)
        meter.add(loss)
        step += 1
        if loop.epoch_ends(step):
            last_loss, = meter.take()
            if not math.isfinite(last_loss):
                raise loop.divergence(last_loss, step, lr)
            end(step, loop.record(step, last_loss, lr), last_loss)
    return TrainResult(steps=step, epochs=step / loop.spe, train_loss=last_loss, history=history)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, *, device="cpu", batch_size: int = 1024) -> dict:
    """Mean cross-entropy loss and accuracy of `model` (eval mode) on `data`."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for i in range(0, len(data), batch_size):
        xb = data.normalize(data.pixels(data.x[i:i + batch_size].to(device)))
        yb = data.y[i:i + batch_size].to(device)
        out = model(xb).float()
        loss_sum += F.cross_entropy(out, yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(len(data), 1)
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}
