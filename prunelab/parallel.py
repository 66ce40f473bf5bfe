"""Data-parallel training of one network, and of a whole chain, by the processes of a torch.distributed
group.

A chain: rank 0 runs the chain runner (`prunelab.runner.run_chain`) inside `Leader`, which makes
every `prunelab.train.train` call of the chain (rewinding, rounds, evaluations) a call of
`train_data_parallel` on every rank, and each `prunelab.train.train_each` (the copies of an LMC pair or
a landscape) one on each part of the ranks, the parts at once; the other ranks run `follow`, which
takes part in each training the leader starts. Everything else (the store, measurements along a
line, logging) is rank 0's alone.
`run_workers` starts such a group of processes on one machine; Ray Train's TorchTrainer starts one
across a cluster (`sweeps.trainable`).

One training:

`train_data_parallel` runs the schedule of `prunelab.train.train` at global batch `hp.batch_size`
with `world_size` processes (gloo on CPU, nccl on GPU). Every rank draws the same global batch from
the seeded `DataOrder` and the same augmentation of the whole batch (one generator stream), so the
run does not depend on the worker count; it then takes its contiguous slice. A rank's loss is its
slice's summed cross-entropy divided by the global batch's size, and the ranks' gradients are summed
(one all_reduce before each optimizer step): the gradient of the global batch's mean loss, with each
rank weighted by its slice (an epoch's last, partial batch splits unevenly). All ranks start from
rank 0's weights and apply the same reduced gradient, optimizer step and mask, so they stay identical;
this is checked at the end. Compared with one process the weights differ only by float rounding (the
batch's sums are split and reduced in another order).

Batch norm normalizes by the statistics of the batch it sees. On CUDA its layers are swapped for
`torch.nn.SyncBatchNorm` while training (statistics of the global batch); on the CPU, where
SyncBatchNorm does not run, each rank normalizes by its slice's statistics, so only networks without
batch norm (ConvNet-3 uses instance norm) then match one worker, and the running statistics are
averaged over the ranks at the end.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from .data.base import ImageData
from .data.stream import StreamingBatches, resident_fits
from .checkpoint import to_cpu
from .cost import pruning_set_size
from .data import dataset_sizes
from .errors import ConfigError, DivergenceError
from .hparams import ChainHparams, TrainingHparams
from .masks import Mask
from .train import (EpochCallback, EpochEnd, Job, Loop, LossMeter, ResidentBatches, TrainResult, autocast,
                    delegated, make_optimizer, masker, optimizer_step, prepare, resolve_device, resumed)


# How long a rank waits in a collective: followers wait while rank 0 works alone (distilling a set,
# measuring along a line, waiting for a chain another process computes), far past torch's defaults
GROUP_TIMEOUT_S = 24 * 3600


def check_world_size(hp: TrainingHparams, world_size: int) -> None:
    """Raise ConfigError unless the global batch splits evenly over `world_size` workers."""
    if world_size < 1:
        raise ConfigError("world_size", f"must be positive, got {world_size}")
    if hp.batch_size % world_size:
        lower = hp.batch_size // world_size * world_size
        near = " or ".join(str(b) for b in (lower, lower + world_size) if b > 0)
        raise ConfigError("training.batch_size", f"{hp.batch_size} does not split evenly over {world_size} workers",
                          f"use a multiple of {world_size} (e.g. {near}), or a worker count that divides it")


def check_chain_workers(hp: ChainHparams, world_size: int, workers_field: str = "workers") -> None:
    """Raise ConfigError unless a chain of `hp` can use `world_size` data-parallel workers: every
    training of the chain has a global batch that splits evenly over them and at least one example
    a worker each step (a distilled set of 10 images cannot feed 16). `workers_field` is what the
    caller calls the worker count (named in the error)."""
    for name, training, size in (("training", hp.training, dataset_sizes(hp.dataset)[0]),
                                 ("pruning_training", hp.pruning_training, pruning_set_size(hp))):
        try:
            check_world_size(training, world_size)
        except ConfigError as e:
            raise ConfigError(f"{name}.batch_size", e.problem, f"{e.fix}, or change {workers_field}") from None
        step = min(training.batch_size, size)
        if step < world_size:
            raise ConfigError(workers_field, f"{world_size} workers but a step of the chain's {name} has {step} "
                              "examples: some workers would have none",
                              f"use at most {step} workers (one suits small distilled sets)")


def _check_group(rank: int, world_size: int, group=None) -> None:
    if not dist.is_initialized():
        raise RuntimeError("train_data_parallel needs an initialized torch.distributed process group "
                           "(prunelab.parallel.run_workers, or Ray Train's TorchTrainer, sets one up)")
    if (dist.get_rank(group), dist.get_world_size(group)) != (rank, world_size):
        raise ValueError(f"rank {rank} of {world_size} given, but the process group says rank "
                         f"{dist.get_rank(group)} of {dist.get_world_size(group)}")


def _all_reduce_(tensors: list[torch.Tensor], group=None) -> None:
    """Sum same-dtype tensors over the ranks (of `group`) in place, in one all_reduce."""
    if tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        for t, s in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(s.view(t.shape))


def _sum_grads_hook(params: list[nn.Parameter], group=None):
    """An optimizer pre-step hook summing the gradients over the ranks in one all_reduce. Every rank
    runs the same graph (an empty slice included), so every rank has gradients for the same params."""
    def hook(opt, args, kwargs):
        _all_reduce_([p.grad for p in params if p.grad is not None], group)

    return hook


@contextmanager
def _sync_batchnorm(model: nn.Module, on: bool, group=None):
    """Batch-norm layers swapped for SyncBatchNorm while the block runs, then put back. The swapped-in
    layers share the originals' parameters and buffers, so the originals keep what was learned."""
    originals = {name: m for name, m in model.named_modules()
                 if on and name and isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def put(name: str, m: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m)

    for name, m in originals.items():
        put(name, nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group=group))
    try:
        yield
    finally:
        for name, m in originals.items():
            put(name, m)


def _check_identical(model: nn.Module, group=None) -> None:
    """Raise unless every rank holds the same floating-point state (one all_reduce of per-tensor sums)."""
    sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point()])
    both = torch.cat([sums, -sums])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:len(sums)], -both[len(sums):]):
        raise RuntimeError("the ranks ended training with different weights: give every rank the same model, "
                           "mask, data and hyperparameters")


def train_data_parallel(model: nn.Module, data: ImageData, hp: TrainingHparams, *, rank: int, world_size: int,
                        device="cpu", order_seed: int = 0, aug_seed: int = 0, mask: Optional[Mask] = None,
                        start_step: int = 0, stop_step: Optional[int] = None,
                        eval_data: Optional[ImageData] = None, eval_every: int = 0,
                        callback: Optional[EpochCallback] = None, resume: Optional[dict] = None,
                        checkpoint: Optional[Callable[[dict], None]] = None, checkpoint_every_s: float = 0.0,
                        sync_bn: Optional[bool] = None, stream: Optional[bool] = None,
                        num_workers: int = 0, group=None) -> TrainResult:
    """Train `model` in place like `train(model, data, hp, ...)`, as rank `rank` of `world_size`.

    Call it on every rank of an initialized process group (the default one, or `group`) with the same arguments (except
    `rank`, `device` (this rank's GPU), and what only rank 0 needs: `callback`, `checkpoint`,
    `eval_data`); every rank returns with the same weights. `hp.batch_size` is the global batch and
    must divide by `world_size` (ConfigError before the process group is touched). The callback gets
    the global mean training loss after every epoch (and, with `eval_data` and `eval_every`, rank 0's
    test metrics). `resume` / `checkpoint` / `checkpoint_every_s` are `train`'s mid-run checkpoints
    with the same payload (either function resumes the other's); the time to checkpoint is rank 0's
    to judge, and every rank must be given the same `resume`. `sync_bn` (default: on CUDA) swaps
    batch norm for SyncBatchNorm while training; it needs CUDA. `stream` (default: when the set does
    not fit, `resident_fits`) feeds batches from host memory through `StreamingBatches` with
    `num_workers` loader processes; the batches are the same either way. `group` (a subgroup of the
    default group; `rank` and `world_size` then within it) trains on part of the ranks.
    """
    check_world_size(hp, world_size)
    device = resolve_device(device)
    sync_bn = device.type == "cuda" if sync_bn is None else sync_bn
    if sync_bn and device.type != "cuda":
        raise ConfigError("sync_bn", "SyncBatchNorm runs on CUDA only",
                          "use sync_bn=False on the CPU (each rank then normalizes by its own slice)")
    _check_group(rank, world_size, group)
    src = dist.get_global_rank(group, 0) if group is not None else 0  # the group's first rank
    stream = not resident_fits(data, device) if stream is None else stream
    # a streamed set stays where it is (placing it on the CPU copies nothing); batches move per step
    loop = Loop.make(data, hp, "cpu" if stream else device, stop_step)
    loop = replace(loop, device=device)
    if resume is not None:
        model.load_state_dict(resume["model"])
        start_step = int(resume["step"])
    model.to(device)  # before the swap: moving buffers later would leave the original layers' behind
    with _sync_batchnorm(model, sync_bn, group):
        net = prepare(model, hp, device)
        for t in model.state_dict().values():
            dist.broadcast(t, src=src, group=group)
        remask = masker(mask, model)
        remask()
        opt = make_optimizer(model, hp, device)
        if resume is not None:
            opt.load_state_dict(resume["optimizer"])
        opt.register_step_pre_hook(_sum_grads_hook([p for p in model.parameters() if p.requires_grad], group))
        aug_state = resume["aug_rng"] if resume is not None else None
        if stream:
            batches = StreamingBatches(loop.data, hp, order_seed, aug_seed, start_step, stop_step=loop.stop,
                                       device=device, num_workers=num_workers, aug_state=aug_state)
        else:
            batches = ResidentBatches(loop, order_seed, aug_seed, start_step, aug_state)
        meter = LossMeter(1, device)

        history, last_loss = resumed(resume)
        end = EpochEnd(loop, model, opt, batches, history, eval_data, eval_every, callback, checkpoint,
                       checkpoint_every_s)
        model.train()
        step = start_step
        for xb, yb in batches:
            lo, hi = rank * len(yb) // world_size, (rank + 1) * len(yb) // world_size
            lr = loop.lr(step)
            with autocast(hp, device):
                # an empty slice (a last batch smaller than the world) still runs: collectives inside
                # the forward (SyncBatchNorm) need every rank, and its gradients are zeros
                loss = F.cross_entropy(net(loop.memory_format(xb[lo:hi])), yb[lo:hi], reduction="sum") / len(yb)
            optimizer_step(opt, loss, lr, remask)
            meter.add(loss)
            step += 1
            if loop.epoch_ends(step):
                dist.all_reduce(meter.sum, group=group)
                last_loss, = meter.take()
                if not math.isfinite(last_loss):  # every rank sees the same loss, and raises
                    raise loop.divergence(last_loss, step, lr)
                failure = None
                try:  # what only rank 0 is given to do: its failure must end every rank's training
                    # (per-rank batch-norm statistics, on the CPU without SyncBatchNorm, checkpoint as rank 0's)
                    end(step, loop.record(step, last_loss, lr), last_loss)
                except Exception as e:  # noqa: BLE001 - re-raised below, once every rank knows
                    failure = e
                _leave_together(failure, device, group)
    if not sync_bn and world_size > 1:  # per-rank batch-norm statistics: the ranks' mean
        stats = [b for b in model.buffers() if b.is_floating_point()]
        _all_reduce_(stats, group)
        for b in stats:
            b.div_(world_size)
    _check_identical(model, group)
    return TrainResult(steps=step, epochs=step / loop.spe, train_loss=last_loss, history=history)


class LeaderFailed(RuntimeError):
    """Rank 0 failed in its own part of a training (a callback, a checkpoint, an evaluation): every
    other rank left that training with this, rank 0 with its own exception."""


_TOGETHER = "_prunelab_left_together"  # set on an exception every rank of the group left a training by


def _left_together(e: BaseException) -> bool:
    return isinstance(e, DivergenceError) or getattr(e, _TOGETHER, False)


def _leave_together(failure: Optional[Exception], device: torch.device, group=None) -> None:
    """At an epoch's end: whether rank 0's part failed, on every rank (one all_reduce); raise if so, so
    that no rank is left waiting in the next step's collectives."""
    flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
    dist.all_reduce(flag, group=group)
    if flag.item():
        failure = failure if failure is not None else LeaderFailed("rank 0 failed in its part of the training")
        setattr(failure, _TOGETHER, True)
        raise failure


# ------------------------------------------------------------------------------------------------
# A whole chain data-parallel: rank 0 (the leader) runs the chain runner as one process would, and
# each `train` call it makes is broadcast to the other ranks (the followers), which take their part.

_TRAIN, _TRAIN_EACH, _STOP = "train", "train_each", "stop"
# train()'s arguments a follower needs too (callbacks, checkpoints and evaluation stay with the leader)
_SHARED = ("order_seed", "aug_seed", "mask", "start_step", "stop_step", "resume")


def _shared(kw: dict) -> dict:
    """The keywords of a training that every rank needs (those given)."""
    return {k: kw[k] for k in _SHARED if k in kw}


def _object_device(device: torch.device) -> Optional[torch.device]:
    """Where torch.distributed's object collectives stage their bytes: the rank's GPU under NCCL."""
    return device if device.type == "cuda" else None


def _broadcast(message: Optional[dict], device: torch.device) -> dict:
    """Rank 0's `message` on every rank (tensors on the CPU; torch.save's pickling, so masks and
    modules travel as they are)."""
    box = [None]
    if message is not None:
        buf = io.BytesIO()
        torch.save(message, buf)
        box = [buf.getvalue()]
    dist.broadcast_object_list(box, src=0, device=_object_device(device))
    return torch.load(io.BytesIO(box[0]), map_location="cpu", weights_only=False)


class Leader:
    """Rank 0 of a data-parallel chain: inside `with Leader(...)`, every `prunelab.train.train` call
    (a round, the rewinding, an evaluation's training) runs data-parallel over the `world_size` ranks,
    whose other ranks run `follow`, and `prunelab.train.train_each` (an LMC pair's copies) on parts of
    them at once (see `train_each`). The model, hyperparameters, seeds, mask and
    resume state of each call are sent to the followers; a training set is sent by name when it is one
    of `datasets` (each rank loads its own, e.g. the real training set), else whole (a distilled set).
    Everything else (the store, evaluations' measurements, logging) is the leader's alone. `call(op,
    payload)` runs a follower handler on every follower (e.g. a collective report) between trainings.
    A failure in rank 0's own part of a training (its callback, checkpoint or evaluation; a lost lease)
    ends that training on every rank at the epoch's end, so the group stays in step whatever the runner
    does with the error. Leaving the block stops the followers, unless rank 0 left a training on an
    error the others did not see (inside the computation itself): they are then inside a collective,
    and the launcher ends them, as it does any failed group."""

    def __init__(self, world_size: int, device, datasets: Optional[dict[str, ImageData]] = None, *,
                 sync_bn: Optional[bool] = None, stream: Optional[bool] = None, num_workers: int = 0,
                 split_copies: bool = True):
        self.world_size, self.device = world_size, resolve_device(device)
        self.split_copies = split_copies
        self.datasets = datasets or {}
        self.options = {"sync_bn": sync_bn, "stream": stream, "num_workers": num_workers}
        self._training = False
        self._scope = None
        self.trained_in_parts = 0  # train_each calls the group split for

    def __enter__(self) -> "Leader":
        _check_group(0, self.world_size)
        self._scope = delegated(self)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._scope.__exit__(*exc)
        if self._training:  # the others are inside a training this process left: the launcher ends them
            return
        try:
            self._send({"op": _STOP})
        except Exception:  # noqa: BLE001 - the error the block raised, if any, is the one to see
            if exc[0] is None:
                raise

    def _send(self, message: dict) -> None:
        if self._training:
            raise RuntimeError("the data-parallel group is out of step: rank 0 left a training on an error the "
                               "other ranks did not see; start the group again (the chain goes on from the store)")
        if self.world_size > 1:
            _broadcast(message, self.device)

    def call(self, op: str, payload: Any = None) -> None:
        """Run follower handler `op` with `payload` on every follower (see `follow`)."""
        self._send({"op": op, "payload": payload})

    def train(self, model: nn.Module, data: ImageData, hp: TrainingHparams, *, device=None, **kw) -> TrainResult:
        """`prunelab.train.train` data-parallel (the delegate `train` calls inside the block). The
        leader's device is the one given at construction."""
        self._send({"op": _TRAIN, **self._job(model, data, hp, kw)})
        with self._in_training():
            return train_data_parallel(model, data, hp, rank=0, world_size=self.world_size, device=self.device,
                                       **kw, **self.options)

    @contextmanager
    def _in_training(self):
        """While the block runs, the followers are inside a training with this process."""
        self._training = True
        try:
            yield
        except BaseException as e:
            # every rank left together (a divergence, a failure of rank 0's callback or checkpoint): they
            # are listening again; else they are inside a collective this process has left, for good
            self._training = not _left_together(e)
            raise
        self._training = False

    def train_each(self, jobs: list[Job]) -> list[TrainResult]:
        """`prunelab.train.train_each` (the delegate inside the block): with `split_copies` and k > 1,
        the largest number of parts that divides both the ranks and the jobs, the group splits into k
        parts of world_size/k ranks; part i trains jobs i, i+k, ... data-parallel at the same global
        batch (k times the batch a rank holds), all parts at once (an LMC pair on two workers: one copy
        each), and the trained weights come back to rank 0's models. Else, or when a job asks for
        what only rank 0 does (a callback, checkpoints, evaluation), the jobs train one after the other
        on every rank."""
        k = _part_count(len(jobs), self.world_size)
        own = any(set(kw) - set(_SHARED) - {"device"} for *_, kw in jobs)
        if not self.split_copies or k < 2 or own:
            return [self.train(model, data, hp, **kw) for model, data, hp, kw in jobs]
        self._send({"op": _TRAIN_EACH, "jobs": [self._job(model, data, hp, kw) for model, data, hp, kw in jobs]})
        self.trained_in_parts += 1
        with self._in_training():
            done = _train_parts(0, self.world_size, self.device, [(m, d, hp, _shared(kw))
                                                                  for m, d, hp, kw in jobs], self.options)
        for (model, *_), (state, _) in zip(jobs, done):
            if state is not None:  # trained by another part: its weights into rank 0's model
                model.load_state_dict(state)
        return [res for _, res in done]

    def _job(self, model: nn.Module, data: ImageData, hp: TrainingHparams, kw: dict) -> dict:
        """What a follower needs of one training: the set by name when it has its own copy."""
        name = next((n for n, d in self.datasets.items() if d is data), None)
        return {"model": model, "data": name if name is not None else data, "hp": hp,
                **_shared(kw)}


def _part_count(jobs: int, world_size: int) -> int:
    """How many parts `train_each` splits the ranks into: the most that divide both them and the jobs."""
    return max(d for d in range(1, min(jobs, world_size) + 1) if world_size % d == 0 and jobs % d == 0)


_PARTS: dict[tuple[int, int, int], list] = {}  # (default group, world size, parts) -> the subgroups


def _parts(world_size: int, k: int) -> list:
    """The k subgroups of consecutive ranks, made by every rank in the same order (torch.distributed's
    rule), once per default process group."""
    key = (id(dist.group.WORLD), world_size, k)
    if key not in _PARTS:
        size = world_size // k
        timeout = timedelta(seconds=GROUP_TIMEOUT_S)
        _PARTS[key] = [dist.new_group(list(range(i * size, (i + 1) * size)), timeout=timeout) for i in range(k)]
    return _PARTS[key]


def _train_parts(rank: int, world_size: int, device: torch.device, jobs: list[Job], options: dict
                 ) -> list[tuple[Optional[dict], TrainResult]]:
    """This rank's part of `Leader.train_each`: the jobs of its part trained data-parallel within the
    part, then every job's (weights, result) from its part's first rank on every rank (weights None
    where this rank trained the job itself). A divergence in any part ends it on every rank."""
    k = _part_count(len(jobs), world_size)
    size = world_size // k
    part, group = rank // size, _parts(world_size, k)[rank // size]
    mine, diverged = {}, None
    for j in range(part, len(jobs), k):
        model, data, hp, kw = jobs[j]
        try:
            mine[j] = train_data_parallel(model, data, hp, rank=rank % size, world_size=size, device=device,
                                          group=group, **kw, **options)
        except DivergenceError as e:
            diverged = str(e)
            break
    said = [None] * world_size
    dist.all_gather_object(said, diverged)
    if any(said):
        raise DivergenceError(next(m for m in said if m))
    out = []
    for j, (model, *_) in enumerate(jobs):
        src = (j % k) * size
        box = [(to_cpu(model.state_dict()), mine[j]) if rank == src else None]
        dist.broadcast_object_list(box, src=src, device=_object_device(device))
        out.append((None if j in mine else box[0][0], box[0][1]))
    return out


def follow(rank: int, world_size: int, device, datasets: Optional[dict[str, ImageData]] = None, *,
           handlers: Optional[dict[str, Callable[[Any], None]]] = None, sync_bn: Optional[bool] = None,
           stream: Optional[bool] = None, num_workers: int = 0) -> None:
    """Rank `rank`'s part of a data-parallel chain whose rank 0 runs inside `Leader`: take part in
    each training the leader starts, run `handlers[op](payload)` for each `Leader.call`, return
    when the leader leaves its block. `datasets` are this rank's sets of the names the leader uses."""
    device, datasets, handlers = resolve_device(device), datasets or {}, handlers or {}
    while True:
        message = _broadcast(None, device)
        op = message.pop("op")
        if op == _STOP:
            return
        if op == _TRAIN_EACH:
            jobs = [(job.pop("model"), _named(job.pop("data"), datasets), job.pop("hp"), job)
                    for job in message["jobs"]]
            try:
                _train_parts(rank, world_size, device, jobs, {"sync_bn": sync_bn, "stream": stream,
                                                              "num_workers": num_workers})
            except DivergenceError:
                pass  # every part saw it, the leader too: it decides what follows
            continue
        if op != _TRAIN:
            if op not in handlers:
                raise RuntimeError(f"the leader called {op!r}, which this follower has no handler for")
            handlers[op](message["payload"])
            continue
        data = _named(message.pop("data"), datasets)
        try:
            train_data_parallel(message.pop("model"), data, message.pop("hp"), rank=rank, world_size=world_size,
                                device=device, sync_bn=sync_bn, stream=stream, num_workers=num_workers, **message)
        except Exception as e:  # noqa: BLE001
            if not _left_together(e):
                raise
            # the leader left this training at the same step (a divergence, or its own part failed): it
            # decides what follows


def lead_or_follow(rank: int, world_size: int, device, datasets: Optional[dict[str, ImageData]] = None, *,
                   handlers: Optional[dict[str, Callable[[Any], None]]] = None, split_copies: bool = True,
                   **options) -> Optional[Leader]:
    """Rank `rank`'s way into a data-parallel chain: on rank 0, the `Leader` to run the chain inside;
    on the others, `follow` until the leader is done, then None. `options`: sync_bn, stream, num_workers."""
    if rank:
        follow(rank, world_size, device, datasets, handlers=handlers, **options)
        return None
    return Leader(world_size, device, datasets, split_copies=split_copies, **options)


def _named(data, datasets: dict[str, ImageData]) -> ImageData:
    """A set the leader sent by name (this rank's own copy), or whole."""
    return datasets[data] if isinstance(data, str) else data


def _worker(rank: int, world_size: int, init_file: str, result_file: str, fn: Callable, args: tuple,
            backend: str = "gloo") -> None:
    # the workers share the cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if backend == "nccl":  # rank r on GPU r
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_file)
        dist.barrier()  # no rank closes its connections while another is still using them
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world_size: int, *args, backend: str = "gloo") -> Any:
    """Run `fn(rank, world_size, *args)` in `world_size` new processes joined in a process group of
    `backend` (gloo; nccl puts rank r on GPU r) with a file rendezvous in a temporary folder; returns
    rank 0's result. `fn` and `args` must be
    picklable by reference (a module-level function); the result goes through `torch.save`. A
    worker's exception ends all of them and is raised here (torch.multiprocessing.ProcessRaisedException).
    A run whose worker was ended by a signal (gloo has been seen to abort a process at exit, rarely) is
    run once more: the work is deterministic, so the second run gives the same result."""
    for attempt in range(2):
        with tempfile.TemporaryDirectory(prefix="prunelab-workers-") as tmp:
            init_file, result_file = str(Path(tmp) / "rendezvous"), str(Path(tmp) / "result.pt")
            try:
                mp.spawn(_worker, args=(world_size, init_file, result_file, fn, args, backend), nprocs=world_size,
                         join=True)
            except mp.ProcessExitedException:
                if attempt:
                    raise
                continue
            return torch.load(result_file, weights_only=False)
