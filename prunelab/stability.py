"""Instability analysis (Frankle et al. 2020; the paper's Figures 3, 4 and 6).

Two copies of one subnetwork (same weights, same mask) are trained on the real data with different
data orders and augmentation; their weights are interpolated, θ(α) = (1−α)·θ_A + α·θ_B, and the loss
and accuracy are measured along the line on the training and the test set. A bump in the loss (a
*barrier*) means SGD noise sent the copies to different minima.

Barriers, per split and for loss and error (1 − accuracy):
  * `barrier_mid` (the paper, Fig. 6): value at α=0.5 minus the mean of the two endpoint values.
    α=0.5 is always evaluated: with an even `num_points` it is added to the grid as an extra point.
    It can be negative (the paper reports negative barriers on ImageNet-10).
  * `barrier_max` (Frankle et al. 2020): max over the evaluated α of
    value(α) − ((1−α)·value(0) + α·value(1)); zero at the endpoints, so never negative.

Batch norm: `bn_mode="interpolate"` (default) interpolates running mean/var linearly like every other
tensor — what the authors' code did, so it reproduces their curves. `"recompute"` resets the running
statistics at every α and re-estimates them on a fixed set of `bn_batches` training batches (the same
batches at every α, no augmentation), which measures the interpolated network as it would really run.
Models without batch norm (ConvNet-3 uses instance norm) give identical results in both modes.
The two can differ tenfold on the same pair (interpolated statistics inflate the barrier), so
`instability` measures the pair in both modes (`both_bn_modes`, on by default): `bn_mode` is the
primary one (the plain metric names), and `by_bn_mode` holds each mode's curve and barriers.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .chain import load_subnetwork, rewind_start_step, train_subnetwork, train_subnetworks
from .data import DataSplit, ImageData
from .errors import ConfigError
from .hparams import ChainHparams, Hparams, hp, require
from .masks import Mask
from .metrics import SPLITS, barriers, other_bn_mode
from .seeds import derive_seed
from .models import build_model
from .train import resolve_device, steps_per_epoch, total_steps, train



@dataclass(frozen=True)
class LMCHparams(Hparams):
    num_points: int = hp(11, "number of evenly spaced α in [0, 1] (11: α = 0, 0.1, …, 1)")
    seeds: tuple[int, ...] = hp((0, 1), "seeds of the two copies' data order and augmentation")
    bn_mode: Literal["interpolate", "recompute"] = hp(
        "interpolate", "batch-norm statistics: interpolate linearly (authors' code) or recompute per α")
    both_bn_modes: bool = hp(True, "also measure the other BN mode on the same trained pair (models with BN)",
                             hashed_at_default=False)
    bn_batches: int = hp(20, "training batches used to recompute BN statistics (bn_mode=recompute)")
    bn_batch_size: int = hp(128, "batch size for recomputing BN statistics")
    splits: tuple[str, ...] = hp(SPLITS, "splits evaluated along the line (paper: train; authors' code: test)")
    eval_examples: Optional[int] = hp(None, "evaluate on a fixed random subset of this many examples per split")
    eval_batch_size: int = hp(1024, "batch size for evaluation")
    previous_round: bool = hp(False, "also the barrier between this round's solution and the previous round's "
                                     "(copy A against the previous round's subnetwork trained with A's data order)",
                              hashed_at_default=False)
    spawn_epochs: tuple[int, ...] = hp((), "also pairs spawned after k epochs of training both copies share, "
                                            "for each k (Frankle et al. 2020's instability analysis: the barrier "
                                            "against the spawn point)", hashed_at_default=False)
    align: bool = hp(False, "also the barriers after permutation alignment (weight matching; the mask permuted "
                            "along, so the aligned network is the same subnetwork) and after alignment + REPAIR "
                            "(prunelab.align)", hashed_at_default=False)
    stacked: bool = hp(False, "train the copies as one stacked model (faster at small batch on a GPU)",
                       hashed_at_default=False)

    def _validate(self, p):
        require(self.num_points >= 2, p + "num_points", f"must be >= 2, got {self.num_points}",
                "use 11 for α = 0, 0.1, …, 1")
        require(len(self.seeds) == 2, p + "seeds", f"need exactly two seeds, got {list(self.seeds)}",
                "e.g. [0, 1]")
        require(self.bn_batches >= 1, p + "bn_batches", f"must be >= 1, got {self.bn_batches}")
        require(self.bn_batch_size >= 1, p + "bn_batch_size", f"must be >= 1, got {self.bn_batch_size}")
        require(len(self.splits) >= 1 and all(s in SPLITS for s in self.splits), p + "splits",
                f"must be a non-empty subset of {list(SPLITS)}, got {list(self.splits)}", "e.g. [train, test]")
        require(len(set(self.splits)) == len(self.splits), p + "splits", "contains duplicates")
        require(self.eval_examples is None or self.eval_examples > 0, p + "eval_examples",
                f"must be positive, got {self.eval_examples}")
        require(self.eval_batch_size >= 1, p + "eval_batch_size", "must be >= 1")
        require(all(k >= 1 for k in self.spawn_epochs) and len(set(self.spawn_epochs)) == len(self.spawn_epochs),
                p + "spawn_epochs", f"must be distinct epochs >= 1, got {list(self.spawn_epochs)}",
                "e.g. [1, 2, 5] (k = 0 is the pair itself)")


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by landscape.py): batched evaluation, BN statistics, state checks.


class EvalSet:
    """A fixed evaluation set, normalized once and held on the device as batches.

    `max_examples` keeps a seeded random subset (so a capped set is not biased by storage order).
    Precomputing the normalized batches pays off when one set is evaluated many times (11 α, a grid).
    """

    def __init__(self, data: ImageData, device, batch_size: int = 1024, max_examples: Optional[int] = None,
                 seed: int = 0):
        device = resolve_device(device)
        if max_examples is not None and max_examples < len(data):
            g = torch.Generator().manual_seed(seed)
            data = data.subset(torch.randperm(len(data), generator=g)[:max_examples].sort().values)
        self.n = len(data)
        self.batches = []
        for i in range(0, self.n, batch_size):
            x = data.normalize(data.pixels(data.x[i:i + batch_size].to(device)))
            self.batches.append((x, data.y[i:i + batch_size].to(device)))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """Mean cross-entropy and accuracy of `model` in eval mode."""
        model.eval()
        loss = torch.zeros((), dtype=torch.float64, device=self.batches[0][0].device if self.batches else "cpu")
        correct = torch.zeros((), dtype=torch.int64, device=loss.device)
        for x, y in self.batches:
            out = model(x).float()
            loss += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
        n = max(self.n, 1)
        return {"loss": float(loss) / n, "accuracy": float(correct) / n}


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_batches(data: ImageData, device, num_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Fixed, normalized, unaugmented training batches for recomputing BN statistics."""
    device = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    need = num_batches * batch_size
    reps = math.ceil(need / max(len(data), 1))
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(reps)])[:need]
    out = []
    for i in range(0, need, batch_size):
        idx = order[i:i + batch_size]
        out.append(data.normalize(data.pixels(data.x[idx].to(device))))
    return out


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Sequence[torch.Tensor]) -> bool:
    """Reset every BN layer's running statistics and re-estimate them as an exact average over
    `batches` (train-mode forward passes, momentum=None). Returns False if the model has no BN."""
    bns = batchnorm_modules(model)
    if not bns:
        return False
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the result does not depend on batch order
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return True


def check_compatible(states: Sequence[dict], names: Sequence[str] = ()) -> None:
    """Raise ConfigError unless all state dicts have the same keys, shapes and dtypes."""
    ref = states[0]
    label = list(names) or [f"model {i}" for i in range(len(states))]
    for s, nm in zip(states[1:], label[1:]):
        if list(s) != list(ref):
            extra = sorted(set(s) ^ set(ref))[:3]
            raise ConfigError("models", f"{nm} and {label[0]} have different tensors (e.g. {extra})",
                              "compare copies of the same architecture")
        for k in ref:
            if s[k].shape != ref[k].shape or s[k].dtype != ref[k].dtype:
                raise ConfigError("models", f"{nm}: {k!r} has shape {tuple(s[k].shape)} / {s[k].dtype}, "
                                  f"{label[0]} has {tuple(ref[k].shape)} / {ref[k].dtype}",
                                  "compare copies of the same architecture and data shape")


def check_mask(mask: Optional[Mask], state: dict) -> None:
    if mask is None:
        return
    for n, m in mask.items():
        if n not in state:
            raise ConfigError("mask", f"mask entry {n!r} is not a tensor of the model",
                              "use the mask the copies were trained with")
        if tuple(m.shape) != tuple(state[n].shape):
            raise ConfigError("mask", f"mask entry {n!r} has shape {tuple(m.shape)}, the model's tensor "
                              f"has {tuple(state[n].shape)}", "use the mask the copies were trained with")


def device_mask(mask: Optional[Mask], state: dict) -> dict[str, torch.Tensor]:
    """Mask entries in the dtype and device of the state's tensors."""
    if mask is None:
        return {}
    return {n: m.to(device=state[n].device, dtype=state[n].dtype) for n, m in mask.items()}


@torch.no_grad()
def _interp_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    if a.is_floating_point() or a.is_complex():
        # lerp switches formula at 0.5, so α=0 gives a and α=1 gives b bit for bit
        torch.lerp(a, b, alpha, out=out)
    elif a.dtype == torch.bool:
        out.copy_(a if alpha < 0.5 else b)
    else:
        # integer buffers (num_batches_tracked): the interpolated count, rounded
        out.copy_(torch.round(torch.lerp(a.double(), b.double(), alpha)).to(a.dtype))


def interpolate_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float,
                       mask: Optional[Mask] = None) -> dict[str, torch.Tensor]:
    """(1−α)·a + α·b for every tensor of two state dicts (exact at α=0 and α=1).

    Integer buffers are interpolated and rounded, bool buffers taken from the nearer endpoint. With
    `mask`, pruned weights are set to exactly zero (they are zero in both endpoints anyway, but this
    keeps the guarantee for extrapolated α and for endpoints that were not masked).
    """
    check_compatible([a, b], ["a", "b"])
    check_mask(mask, a)
    out = {}
    for k in a:
        t = torch.empty_like(a[k])
        _interp_into(t, a[k], b[k].to(a[k].device), float(alpha))
        out[k] = t
    for n, m in device_mask(mask, out).items():
        out[n].mul_(m)
    return out


def lmc_alphas(num_points: int) -> list[float]:
    """The evaluated α: `num_points` evenly spaced in [0, 1], plus 0.5 if not already among them."""
    alphas = [i / (num_points - 1) for i in range(num_points)]
    if 0.5 not in alphas:
        alphas = sorted(alphas + [0.5])
    return alphas


# ---------------------------------------------------------------------------------------------


def eval_sets(data: DataSplit, lmc_hp: LMCHparams, device) -> dict[str, EvalSet]:
    """The splits a line is measured on (`lmc_hp.splits`), each a fixed `EvalSet`."""
    sets = {"train": data.train, "test": data.test}
    return {s: EvalSet(sets[s], device, lmc_hp.eval_batch_size, lmc_hp.eval_examples, seed=i)
            for i, s in enumerate(SPLITS) if s in lmc_hp.splits}


def measure_point(model: nn.Module, evals: dict[str, EvalSet], curves: dict[str, list[float]]) -> None:
    """Append `model`'s loss and accuracy on each split to `curves` (`<split>_loss`, `<split>_accuracy`)."""
    for s, ev in evals.items():
        r = ev.evaluate(model)
        curves.setdefault(f"{s}_loss", []).append(r["loss"])
        curves.setdefault(f"{s}_accuracy", []).append(r["accuracy"])


def curve_barriers(alphas: Sequence[float], curves: dict[str, list[float]], splits) -> tuple[dict, dict]:
    """(barrier_mid, barrier_max) of a line's curves: `<split>_loss` and `<split>_error` for each split."""
    mid, mx = {}, {}
    for s in splits:
        for name, vals in (("loss", curves[f"{s}_loss"]), ("error", [1 - a for a in curves[f"{s}_accuracy"]])):
            b = barriers(alphas, vals)
            mid[f"{s}_{name}"], mx[f"{s}_{name}"] = b["mid"], b["max"]
    return mid, mx


def lmc_curve(model_a: nn.Module, model_b: nn.Module, data: DataSplit, lmc_hp: LMCHparams = LMCHparams(),
              device="cpu", mask: Optional[Mask] = None) -> dict:
    """Loss and accuracy along the line between two trained models, and the barriers.

    One working model is reused: at every α its tensors are overwritten in place (no copies of the
    network per α), and each split is evaluated from pre-normalized device batches. Returns plain
    data: `alphas`; `<split>_loss` / `<split>_accuracy` lists; `barrier_mid` and `barrier_max`, each a
    dict with keys `<split>_loss` and `<split>_error`; plus the settings used and `wall_s`.
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    lmc_hp.validate()
    sa = {k: v.detach().to(device) for k, v in model_a.state_dict().items()}
    sb = {k: v.detach().to(device) for k, v in model_b.state_dict().items()}
    check_compatible([sa, sb], ["model_a", "model_b"])
    check_mask(mask, sa)
    work = copy.deepcopy(model_a).to(device).eval()
    target = work.state_dict()  # aliases the working model's tensors: writes go straight into it
    masks = device_mask(mask, target)

    evals = eval_sets(data, lmc_hp, device)
    recompute = lmc_hp.bn_mode == "recompute" and bool(batchnorm_modules(work))
    bn_data = bn_batches(data.train, device, lmc_hp.bn_batches, lmc_hp.bn_batch_size) if recompute else []

    alphas = lmc_alphas(lmc_hp.num_points)
    curves: dict[str, list[float]] = {f"{s}_{m}": [] for s in evals for m in ("loss", "accuracy")}
    for alpha in alphas:
        with torch.no_grad():
            for k, t in target.items():
                _interp_into(t, sa[k], sb[k], alpha)
            for n, m in masks.items():
                target[n].mul_(m)
        if recompute:
            recompute_bn_stats(work, bn_data)
        measure_point(work, evals, curves)
    mid, mx = curve_barriers(alphas, curves, evals)
    return {"alphas": alphas, **curves, "barrier_mid": mid, "barrier_max": mx,
            "bn_mode": lmc_hp.bn_mode, "bn_recomputed": recompute,
            "eval_examples": {s: ev.n for s, ev in evals.items()}, "wall_s": time.perf_counter() - t0}


def _lmc_seed(hp: ChainHparams, seed: int) -> int:
    # the copies are trainings after pruning: they follow `hp.seed` under either `seed_scope`
    return derive_seed(hp.seed, "lmc", seed)


def train_pair(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], mask: Mask,
               seeds: Sequence[int] = (0, 1), device="cpu", start_step: Optional[int] = None,
               stacked: bool = False) -> tuple[tuple[nn.Module, nn.Module], list[dict]]:
    """Train two copies of `weights ⊙ mask` on the real training set; returns ((A, B), [metrics_A, metrics_B]).

    The copies share weights and mask and differ only in data order and augmentation: copy i uses
    `derive_seed(hp.seed, "lmc", seeds[i])`, so equal seeds give bitwise-identical copies on CPU.
    `start_step` defaults to the chain's convention: with `hp.pruning.rewind_epoch = k > 0`, `weights`
    is the rewind point and training continues the schedule from epoch k. `stacked` trains both
    copies as one stacked model (`prunelab.stacked`; equal up to float rounding).
    """
    if len(seeds) != 2:
        raise ConfigError("seeds", f"need exactly two seeds, got {list(seeds)}", "e.g. (0, 1)")
    models, runs = train_subnetworks(hp, data, weights, mask, [_lmc_seed(hp, s) for s in seeds], device=device,
                                     stacked=stacked, start_step=start_step)
    metrics = [{**{k: v for k, v in m.items() if k != "curve"}, "seed": int(s)} for s, m in zip(seeds, runs)]
    return (models[0], models[1]), metrics


def bn_curves(model_a: nn.Module, model_b: nn.Module, data: DataSplit, lmc_hp: LMCHparams = LMCHparams(),
              device="cpu", mask: Optional[Mask] = None) -> dict:
    """`lmc_curve` of one pair in the primary BN mode and, with `both_bn_modes`, in the other one.

    Returns the primary curve's data plus `by_bn_mode`: mode -> {curves, barrier_mid, barrier_max,
    bn_recomputed}. A model without batch norm is measured once; both modes then hold that curve
    (they are the same measurement)."""
    primary = lmc_curve(model_a, model_b, data, lmc_hp, device, mask=mask)
    keys = [k for k in primary if k.endswith(("_loss", "_accuracy"))] + ["barrier_mid", "barrier_max",
                                                                       "bn_recomputed"]
    by_mode = {lmc_hp.bn_mode: {k: primary[k] for k in keys}}
    if lmc_hp.both_bn_modes:
        other = other_bn_mode(lmc_hp.bn_mode)
        has_bn = bool(batchnorm_modules(model_a))
        second = lmc_curve(model_a, model_b, data, lmc_hp.replace(bn_mode=other), device, mask=mask) \
            if has_bn else primary
        by_mode[other] = {k: second[k] for k in keys}
        primary["wall_s"] += second["wall_s"] if has_bn else 0.0
    primary["by_bn_mode"] = by_mode
    return primary


def instability(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], mask: Mask,
                lmc_hp: LMCHparams = LMCHparams(), device="cpu", keep_models: bool = False,
                start_step: Optional[int] = None) -> dict:
    """Train a pair (`train_pair` with `lmc_hp.seeds`) and measure its LMC curve (`bn_curves`).

    Returns the curve's plain data (with `by_bn_mode`) plus `copies` (each copy's seed, test
    accuracy/loss, final training loss), `copy_test_accuracy` (their mean), `sparsity`, and
    `train_s` (training time); with `keep_models`, also `models` (the trained pair).
    """
    lmc_hp.validate()
    t0 = time.perf_counter()
    (a, b), metrics = train_pair(hp, data, weights, mask, lmc_hp.seeds, device, start_step=start_step,
                                 stacked=lmc_hp.stacked)
    train_s = time.perf_counter() - t0
    curve = bn_curves(a, b, data, lmc_hp, device, mask=mask)
    curve.update(copies=metrics, copy_test_accuracy=sum(m["test_accuracy"] for m in metrics) / 2,
                 sparsity=mask.sparsity, train_s=train_s)
    if keep_models:
        curve["models"] = (a, b)
    return curve


def spawned_instability(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], mask: Mask,
                        k: int, lmc_hp: LMCHparams = LMCHparams(), device="cpu") -> dict:
    """The pair spawned after `k` epochs of training `weights ⊙ mask` that both copies share (Frankle et
    al. 2020): the shared run follows the chain's schedule (from its rewind point) with its own seed,
    then the copies finish the schedule from there as `instability` trains them. Returns `instability`'s
    data (curves and barriers in both BN modes) plus `spawn_epoch`."""
    spe = steps_per_epoch(len(data.train), hp.training.batch_size)
    start = rewind_start_step(hp, len(data.train), hp.training.batch_size)
    model = load_subnetwork(build_model(hp.model, data.train.shape, data.train.num_classes, seed=0), weights, mask)
    stop = min(start + k * spe, total_steps(hp.training, len(data.train)))
    train(model, data.train, hp.training, device=device, mask=mask, order_seed=derive_seed(hp.seed, "spawn", "order"),
          aug_seed=derive_seed(hp.seed, "spawn", "augment"), start_step=start, stop_step=stop)
    shared = {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
    res = instability(hp, data, shared, mask, lmc_hp.replace(spawn_epochs=(), align=False), device, start_step=stop)
    res["spawn_epoch"] = k
    return res


def previous_round_curves(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], model_a: nn.Module,
                          previous_mask: Mask, lmc_hp: LMCHparams = LMCHparams(), device="cpu") -> dict:
    """The line from copy A of a round's subnetwork (`model_a`, trained with `lmc_hp.seeds[0]`) to the
    previous round's subnetwork `weights ⊙ previous_mask` trained with the same data order: curves and
    barriers in both BN modes (`bn_curves`), interpolated without a mask (each end keeps its own)."""
    model_p, metrics = train_subnetwork(hp, data, weights, previous_mask, device=device,
                                        seed=_lmc_seed(hp, lmc_hp.seeds[0]))
    curve = bn_curves(model_a, model_p, data, lmc_hp, device, mask=None)
    curve.update(previous_test_accuracy=metrics["test_accuracy"], previous_sparsity=previous_mask.sparsity)
    return curve


def flat_barriers(result: dict, prefix: str = "lmc_") -> dict[str, float]:
    """The barriers of an `lmc_curve`/`instability` result as flat metric names
    (e.g. `lmc_train_loss_barrier_mid`), ready for a metrics logger."""
    out = {}
    for kind in ("mid", "max"):
        for k, v in result[f"barrier_{kind}"].items():
            out[f"{prefix}{k}_barrier_{kind}"] = v
    return out
