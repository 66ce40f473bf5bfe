"""The training engine: SGD/Adam over a device-resident tensor data set, masks enforced every step.

Data order and augmentation have their own seeds (the model's initialization is seeded where it is
built), so two copies that differ only in data order are one argument apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data.augment import random_crop_flip
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


def make_augment(kind: str, data: ImageData) -> Optional[Augment]:
    """The augmentation named by TrainingHparams.augment, for this data set."""
    if kind == "none":
        return None
    if kind in ("standard", "standard_cutmix"):
        pad, flip, k = data.crop_pad, data.flip, data.num_classes
        if kind == "standard_cutmix":
            from .data.dsa import apply_cutmix

            def standard_cutmix(x, y, gen):
                return apply_cutmix(random_crop_flip(x, pad, flip, gen), y, k, gen)

            return standard_cutmix

        def standard(x, y, gen):
            return random_crop_flip(x, pad, flip, gen), y

        return standard
    if kind in ("dsa", "dsa_cutmix"):
        from .data.dsa import make_dsa_augment

        return make_dsa_augment(cutmix=kind == "dsa_cutmix", num_classes=data.num_classes)
    raise ConfigError("training.augment", f"unknown augmentation {kind!r}",
                      "use standard, standard_cutmix, none, dsa or dsa_cutmix")


def place(data: ImageData, device: torch.device) -> ImageData:
    """Move the set onto the device if it fits comfortably; otherwise keep it in (pinned) host memory
    and let the loop stream uint8 batches."""
    if device.type != "cuda" or data.x.device == device:
        return data.to(device) if device.type != "cuda" else data
    free, _ = torch.cuda.mem_get_info(device)
    if data.nbytes <= RESIDENT_FRACTION * free:
        return data.to(device)
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


def _autocast(hp: TrainingHparams, device: torch.device):
    enabled = hp.precision == "bf16" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _prepare(model: nn.Module, hp: TrainingHparams, device: torch.device):
    model.to(device)
    if hp.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if hp.compile else model


def train(model: nn.Module, data: ImageData, hp: TrainingHparams, *, device="cpu", order_seed: int = 0,
          aug_seed: int = 0, mask: Optional[Mask] = None, start_step: int = 0, stop_step: Optional[int] = None,
          eval_data: Optional[ImageData] = None, eval_every: int = 0,
          callback: Optional[EpochCallback] = None) -> TrainResult:
    """Train `model` in place on `data`.

    Pruned weights (mask False) are zero before the first step and after every step. `start_step`
    resumes the schedule part-way (training from a rewind point continues its lr schedule);
    `stop_step` ends early (reaching a rewind point). `callback(epoch, metrics)` is called after every
    epoch with the mean training loss; with `eval_data` and `eval_every=k`, every k-th epoch also
    reports test loss and accuracy. A non-finite loss raises DivergenceError.
    """
    device = resolve_device(device)
    data = place(data, device)
    n = len(data)
    total = total_steps(hp, n)
    stop = total if stop_step is None else min(stop_step, total)
    spe = steps_per_epoch(n, hp.batch_size)
    net = _prepare(model, hp, device)
    pairs = mask.device_tensors(model) if mask is not None else []
    mask_params, mask_values = [p for p, _ in pairs], [m for _, m in pairs]
    if pairs:
        with torch.no_grad():
            torch._foreach_mul_(mask_params, mask_values)
    opt = make_optimizer(model, hp, device)
    factor = lr_factor(hp, n)
    augment = make_augment(hp.augment, data)
    order_gen = torch.Generator().manual_seed(order_seed)
    aug_gen = torch.Generator(device=device).manual_seed(aug_seed)
    # skip the permutations of the epochs before start_step, so a resumed run sees the same order
    for _ in range(start_step // spe):
        torch.randperm(n, generator=order_gen)
    channels_last = hp.channels_last and device.type == "cuda"

    history: list[dict] = []
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    perm = None
    model.train()
    step = start_step
    last_loss = float("nan")
    while step < stop:
        pos = step % spe
        if perm is None or pos == 0:
            perm = torch.randperm(n, generator=order_gen)
            if data.x.device == device:
                perm = perm.to(device)
        idx = perm[pos * hp.batch_size:(pos + 1) * hp.batch_size]
        xb = data.x[idx].to(device, non_blocking=True)
        yb = data.y[idx].to(device, non_blocking=True)
        xb = data.pixels(xb)
        if augment is not None:
            xb, yb = augment(xb, yb, aug_gen)
        xb = data.normalize(xb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        lr = hp.lr * factor(step)
        for g in opt.param_groups:
            g["lr"] = lr
        with _autocast(hp, device):
            loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if pairs:
            with torch.no_grad():
                torch._foreach_mul_(mask_params, mask_values)
        loss_sum += loss.detach().float()
        loss_count += 1
        step += 1
        if step % spe == 0 or step == stop:
            last_loss = float(loss_sum) / loss_count  # one host sync per epoch
            if not math.isfinite(last_loss):
                raise DivergenceError(f"training loss became {last_loss} at step {step} (epoch "
                                      f"{step / spe:.2f}, lr {lr:g}); lower the learning rate")
            epoch = step / spe
            metrics = {"epoch": epoch, "step": step, "train_loss": last_loss, "lr": lr}
            if eval_data is not None and eval_every and (round(epoch) % eval_every == 0 or step == stop):
                ev = evaluate(model, eval_data, device=device, batch_size=hp.eval_batch_size)
                metrics.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
                model.train()
            history.append(metrics)
            if callback is not None:
                callback(int(math.ceil(epoch)), metrics)
            loss_sum.zero_()
            loss_count = 0
    return TrainResult(steps=step, epochs=step / spe, train_loss=last_loss, history=history)


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
