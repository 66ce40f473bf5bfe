"""What a chain will cost, from its config alone (no data loaded, nothing trained): optimizer steps
and floating-point operations of every phase, and a rough time on a CPU or a GPU.

A sweep uses it to start its longest chains first, so that the last chain to finish is not a long
one that happened to start late, and to show the plan. Operations are counted with PyTorch's
`FlopCounterMode` on a meta-device model (convolutions and matrix products; a backward pass is
counted as twice the forward). Time is `steps × step overhead + flops / throughput`: small-batch
training (a distilled set of 10–500 images) is bound by the per-step overhead, real-data training
by the arithmetic. The two constants per device are rough (measured once on a 2-core CPU, taken
from an H100's throughput for the GPU), and on a GPU a training phase in fp32 is costed at a rough
fraction of the bf16 rate: the estimate orders chains and sizes a plan, it does not promise a wall time.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .chain import rewind_start_step
from .data import dataset_shape, dataset_sizes
from .hparams import ChainHparams, ModelHparams, TrainingHparams
from .masks import density_after, prunable_names
from .metrics import other_bn_mode
from .models import build_model
from .stability import lmc_alphas
from .synthetic import DEFAULT_BUDGETS, distiller_settings, effective_settings, formation_factor
from .train import total_steps

# (seconds per optimizer step, sustained FLOP/s): one CPU thread (scaled by the threads a chain
# gets) and one GPU in bf16. CPU: the demo's pruning rounds on digits (ResNet-10 width 16: 14.6 ms a
# step at batch 64; ConvNet-3: 3.2 ms) on one thread, which these constants give within 15%. GPU: an
# H100's bf16 training throughput, ConvNet-3 at 65k images/s (2e13 FLOP/s) and ResNet-18 at 40k
# (1.3e14), and ~4 ms a step for ConvNet-3 at batch 64 (15.9k images/s); not measured by prunelab.
DEVICE_SPEED = {"cpu": (3e-3, 3e10), "gpu": (3e-3, 5e13)}
# How much slower a GPU does fp32 arithmetic than bf16: rough, not measured. Peak dense throughput
# of an H100 SXM is 989 TFLOP/s in bf16 against 67 in fp32 without tensor cores (~1/15) and 495 in
# TF32. The sustained bf16 rate above is ~5% of that peak (small models, bound by memory traffic and
# kernel launches as much as by arithmetic), so the sustained gap is smaller than the peak one:
# fp32 is taken as 1/4 of the bf16 rate. PyTorch runs fp32 convolutions in TF32 by default
# (torch.backends.cudnn.allow_tf32), which narrows the gap further; matrix products stay in fp32.
# Evaluation, BN re-estimation, Hessian products and distillation run in fp32 whatever the
# training precision; only training under bf16 autocast gets the bf16 rate. A CPU ignores precision.
GPU_FP32_SLOWDOWN = 4.0


@dataclass
class Cost:
    """Optimizer steps (and other small-batch passes) and floating-point operations, of which
    `bf16_flops` run under bf16 autocast (the rest in fp32). Of these, `shared_flops` and
    `shared_bf16_flops` are training, which a data-parallel chain splits over its workers."""

    steps: float = 0.0
    flops: float = 0.0
    bf16_flops: float = 0.0
    shared_flops: float = 0.0
    shared_bf16_flops: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __mul__(self, k: float) -> "Cost":
        return Cost(*(a * k for a in astuple(self)))

    __rmul__ = __mul__

    def seconds(self, device: str = "cpu", threads: float = 1.0, workers: int = 1) -> float:
        """A rough time on `device` ("cpu" with `threads` threads, or "gpu": fp32 at a fraction of
        the bf16 rate). With `workers` data-parallel workers (each one such device), each takes its
        share of the training arithmetic; every worker still takes every step, and what is not
        training (evaluation, measurements along a line) stays with one worker. Communication is not
        counted: `benchmarks/data_parallel.py` measures the efficiency on a real machine."""
        saved = 1.0 - 1.0 / max(1, workers)
        flops, bf16 = self.flops - saved * self.shared_flops, self.bf16_flops - saved * self.shared_bf16_flops
        if device != "gpu":
            step_s, rate = DEVICE_SPEED["cpu"]
            return self.steps * step_s + flops / (rate * max(1.0, threads))
        step_s, rate = DEVICE_SPEED["gpu"]
        return self.steps * step_s + bf16 / rate + (flops - bf16) * GPU_FP32_SLOWDOWN / rate


@lru_cache(maxsize=64)
def _model_facts(name: str, width, depth, shape: tuple, num_classes: int) -> tuple[float, int, int, bool]:
    """(forward FLOPs per image, prunable weights, of which in the classifier, has batch norm)."""
    with torch.device("meta"):
        model = build_model(ModelHparams(name=name, width=width, depth=depth), shape, num_classes, seed=0)
        x = torch.empty((2,) + tuple(shape))
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    params = dict(model.named_parameters())
    weights = sum(params[n].numel() for n in prunable_names(model, True))
    kept = sum(params[n].numel() for n in prunable_names(model, False))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return counter.get_total_flops() / 2, weights, weights - kept, has_bn


def _facts(model: ModelHparams, dataset) -> tuple[float, int, int, bool]:
    shape, k = dataset_shape(dataset)
    return _model_facts(model.name, model.width, model.depth, shape, k)


def forward_flops(model: ModelHparams, dataset) -> float:
    """Floating-point operations of one forward pass of one image (`dataset`: DatasetHparams)."""
    return _facts(model, dataset)[0]


def unpruned_weights(hp: ChainHparams, rounds: int) -> int:
    """Prunable weights left after `rounds` rounds of `hp`'s pruning."""
    _, weights, classifier, _ = _facts(hp.model, hp.dataset)
    total = weights if hp.pruning.prune_classifier else weights - classifier
    return round(total * density_after(rounds, hp.pruning.fraction))


def training_cost(hp: TrainingHparams, n: int, flops: float, start_step: int = 0) -> Cost:
    """`hp`'s training over a set of `n` images with a model of `flops` per forward pass, in its precision."""
    steps = max(0, total_steps(hp, n) - start_step)
    total = steps * min(hp.batch_size, n) * 3 * flops
    bf16 = total if hp.precision == "bf16" else 0.0
    return Cost(steps, total, bf16, total, bf16)


def forward_cost(n: int, flops: float, batch_size: int) -> Cost:
    """Evaluating `n` images in batches of `batch_size`."""
    return Cost(math.ceil(n / batch_size), n * flops)


def init_source_cost(hp: ChainHparams, flops: float) -> Cost:
    """One round of a chain that finds its masks at initialization (`pruning.method`): snip scores
    with one forward and backward pass over `score_examples` images, grasp with two and a double
    backward, synflow with one pass of a single image per iteration, the others with none; then the
    scored images once through the masked network."""
    p = hp.pruning
    n = p.score_examples
    passes = {"snip": 3 * n, "grasp": 9 * n, "synflow": 3 * p.synflow_iterations}.get(p.method, 0)
    return Cost(1 + (p.synflow_iterations if p.method == "synflow" else 0), (passes + n) * flops)


def _source(hp: ChainHparams) -> str:
    """What the pruning data is: real, idc_file, or the synthetic source (idc, dm, random_subset, herding)."""
    pd = hp.pruning_data
    return pd.method if pd.kind == "distilled" else pd.kind


def pruning_set_size(hp: ChainHparams) -> int:
    """Images a chain trains on to find its mask (a synthetic set as its decoded images)."""
    pd, source = hp.pruning_data, _source(hp)
    n_train, _ = dataset_sizes(hp.dataset)
    if source == "real":
        return n_train
    _, k = dataset_shape(hp.dataset)
    f = formation_factor(hp.dataset.name, pd.factor) if source in ("idc", "idc_file") else 1
    return (pd.ipc or 10) * k * f * f  # an IDC file's ipc may be left to the file: 10 assumed


def synthetic_cost(hp: ChainHparams) -> Cost:
    """Building the chain's synthetic set with prunelab's own distiller (0 when it reads a file or
    trains on real data; a set several chains share is counted for each). The distiller's settings
    are pruning_data's where set (net_width, inner_loop, batch_real, lr_img), else its defaults."""
    pd, source = hp.pruning_data, _source(hp)
    if source not in ("dm", "idc", "herding"):
        return Cost()
    _, k = dataset_shape(hp.dataset)
    n_train, _ = dataset_sizes(hp.dataset)
    if source == "herding":
        return forward_cost(n_train, forward_flops(ModelHparams(name="convnet3"), hp.dataset), 1024)
    # ConfigError here, at planning, for a setting the method lacks (dm + inner_loop)
    kw = effective_settings(source, **distiller_settings(pd))
    f = forward_flops(ModelHparams(name="convnet3", width=kw["net_width"]), hp.dataset)
    budget = pd.budget or DEFAULT_BUDGETS[source]
    if source == "dm":
        # per class: embeddings of a real batch and of the class's synthetic images, backward to the images
        return Cost(budget * k, budget * k * (kw["batch_real"] + 2 * pd.ipc) * 3 * f)
    syn = pruning_set_size(hp) // k  # decoded synthetic images per class
    match = Cost(kw["inner_loop"] * k, kw["inner_loop"] * k * (kw["batch_real"] + syn) * 6 * f)  # grad of grads
    net = Cost((kw["inner_loop"] - 1) * kw["net_steps"], (kw["inner_loop"] - 1) * kw["net_steps"] * kw["batch_real"] * 3 * f)
    return budget * (match + net)


def evaluation_cost(hp: ChainHparams, ev, at_round: int = 0) -> Cost:
    """Evaluating round `at_round` as `ev` (EvalHparams) asks: the subnetworks trained on real data and
    what is measured on them."""
    n_train, n_test = dataset_sizes(hp.dataset)
    f, _, _, has_bn = _facts(hp.model, hp.dataset)
    one = training_cost(hp.training, n_train, f, rewind_start_step(hp, n_train, hp.training.batch_size))
    one = one + forward_cost(n_test, f, hp.training.eval_batch_size)

    def point(n_eval: int, lh) -> Cost:  # one point of a curve or grid: its evaluation, BN statistics
        bn = forward_cost(lh.bn_batches * lh.bn_batch_size, f, lh.bn_batch_size)
        return forward_cost(n_eval, f, lh.eval_batch_size) + (bn if has_bn and lh.bn_mode == "recompute" else Cost())

    cost = Cost()
    if ev.lmc:
        lh = ev.lmc_hparams
        per_split = {"train": n_train, "test": n_test}
        n_eval = sum(min(per_split[s], lh.eval_examples or per_split[s]) for s in lh.splits)
        curve = len(lmc_alphas(lh.num_points)) * point(n_eval, lh)
        if lh.both_bn_modes and has_bn:  # the same pair measured in the other BN mode
            curve = curve + len(lmc_alphas(lh.num_points)) * point(n_eval, lh.replace(bn_mode=other_bn_mode(lh.bn_mode)))
        plain = curve
        if lh.align:  # the aligned pair's curves, and REPAIR's: endpoint and corrected statistics at every α
            fix = forward_cost(lh.bn_batches * lh.bn_batch_size, f, lh.bn_batch_size)
            curve = curve * 2 + len(lmc_alphas(lh.num_points)) * (point(n_eval, lh.replace(bn_mode="interpolate")) + fix * 3)
        pairs = len(lh.seeds) * one + curve
        left = max(1, hp.training.epochs - hp.pruning.rewind_epoch)  # the epochs `one` stands for
        for k in lh.spawn_epochs:  # a shared run to epoch k, then a pair that finishes the schedule, and its curve
            pairs = pairs + (1 - k / left) * len(lh.seeds) * one + (k / left) * one + plain
        cost = cost + (1 + len(ev.controls)) * pairs  # the pair and each control's
        first = hp.start_round if hp.start_from is not None else 0
        if lh.previous_round and at_round > first:  # the previous round's subnetwork trained, and its line
            cost = cost + one + plain
    if ev.landscape:
        lh = ev.landscape_hparams
        n_eval = min(n_train, lh.eval_examples or n_train)
        cost = cost + len(lh.seeds) * one + lh.grid ** 2 * point(n_eval, lh)
    if ev.hessian or ev.spectrum is not None or not ev.lmc:
        cost = cost + one
    if ev.spectrum is not None:
        sh = ev.spectrum
        # Hessian-vector products (about 4 forward passes each) on one batch, or on the whole training
        # set: Lanczos for the top eigenvalues, Hutch++ for the trace, SLQ for the density
        hvps = (sh.lanczos_steps or max(3 * sh.k, 30)) + sh.trace_samples + sh.density_vectors * sh.density_steps
        examples = n_train if sh.data == "full" else min(sh.batch_size, n_train)
        cost = cost + Cost(hvps * math.ceil(examples / sh.batch_size), hvps * examples * 4 * f)
    if ev.hessian:
        hh = ev.hessian_hparams
        # Hessian-vector products on one batch, each about 4 forward passes: an exact diagonal takes
        # one per unpruned weight (`chunk` at a time), Hutchinson `samples`; then the power iteration
        n = unpruned_weights(hp, at_round)
        exact = hh.method == "exact" or (hh.method == "auto" and n <= hh.exact_max_weights)
        diag = Cost(math.ceil(n / hh.chunk), n * hh.batch_size * 4 * f) if exact else \
            Cost(math.ceil(hh.samples / hh.chunk), hh.samples * hh.batch_size * 4 * f)
        cost = cost + diag + Cost(hh.power_iters, hh.power_iters * hh.batch_size * 4 * f)
    return cost


def chain_cost(hp: ChainHparams, ev, rounds, reached: Optional[int] = None, evaluated=()) -> dict[str, Cost]:
    """What is left of a chain run to `hp.pruning.rounds` and evaluated at `rounds` with `ev`
    (EvalHparams): {"synthetic", "pruning", "evaluation", "total"}. From scratch by default; with
    `reached` (the round of a stored state) and `evaluated` (rounds already evaluated), only the rest
    (a stored state means the synthetic set and the rewind point exist already)."""
    n_train, _ = dataset_sizes(hp.dataset)
    n_prune = pruning_set_size(hp)
    f = forward_flops(hp.model, hp.dataset)
    tr = hp.pruning_training
    # only real-data pruning training continues from the rewind point (as Chain.step)
    start = rewind_start_step(hp, n_train, tr.batch_size) if hp.pruning_data.kind == "real" else 0
    per_round = training_cost(tr, n_prune, f, start) + forward_cost(n_prune, f, tr.eval_batch_size)
    if hp.pruning.method != "magnitude":  # a mask at initialization: a few passes, no training
        per_round = init_source_cost(hp, f)
    first = hp.start_round if hp.start_from is not None else 0
    pruning = max(0, hp.pruning.rounds - max(first, reached or 0)) * per_round
    if hp.pruning.rewind_epoch and reached is None:
        pruning = pruning + training_cost(hp.training.replace(epochs=hp.pruning.rewind_epoch, steps=None), n_train, f)
    evaluation = Cost()
    for r in set(rounds) - set(evaluated):
        evaluation = evaluation + evaluation_cost(hp, ev, r)
    synthetic = synthetic_cost(hp) if reached is None else Cost()
    out = {"synthetic": synthetic, "pruning": pruning, "evaluation": evaluation}
    out["total"] = out["synthetic"] + out["pruning"] + out["evaluation"]
    return out
