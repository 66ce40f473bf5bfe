"""Several copies of one network trained as one stacked network.

LMC trains two copies of a subnetwork, the 2D landscape four, each with its own data order and
augmentation. At small batch a single network leaves a GPU idle between kernel launches; stacking
the copies along the channel dimension runs all of them in the kernels of one.

Copy i occupies the channel block [i·C, (i+1)·C) of every layer:
  * Conv2d(cin, cout, groups=g) -> Conv2d(N·cin, N·cout, groups=N·g): copy i's filters only see copy
    i's input channels, so the first conv takes copy i's images in channels [i·C_in, (i+1)·C_in);
  * BatchNorm2d(C) -> BatchNorm2d(N·C) and GroupNorm(G, C) -> GroupNorm(N·G, N·C): statistics are per
    channel (per contiguous group), so they are exactly each copy's own;
  * Linear(in, out) -> StackedLinear: weight (N, out, in), one batched matmul;
  * ReLU, pooling, additions and flatten(1) act per channel and keep the copy-major layout, so the
    containers' forward code is reused unchanged.
The stacked output (B, N·K) is copy-major: `out.view(B, N, K)[:, i]` is copy i's logits.

`train_copies` trains N copies like N calls of `prunelab.train.train` with their own seeds: the same
batches, augmentation draws, lr schedule and masks, and a loss whose gradient in each copy's weights
is that copy's own. The copies agree with separate runs up to float rounding (grouped convolutions
and batched matmuls sum in another order), not bit for bit.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data.base import ImageData
from .errors import ConfigError
from .hparams import TrainingHparams
from .masks import Mask
from .train import Loop, LossMeter, TrainResult, autocast, make_optimizer, masker, optimizer_step, prepare

# leaves without state whose forward acts on each channel separately
CHANNELWISE = (nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Sequential)


class StackedLinear(nn.Module):
    """N independent Linear layers on copy-major input (B, N·in) -> (B, N·out)."""

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(n, out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xs = x.reshape(b, self.n, self.in_features).transpose(0, 1)  # (N, B, in)
        wt = self.weight.transpose(1, 2)
        y = torch.bmm(xs, wt) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), xs, wt)
        return y.transpose(0, 1).reshape(b, self.n * self.out_features)

    def extra_repr(self) -> str:
        return f"copies={self.n}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


def _stacked_leaf(mods: Sequence[nn.Module], name: str) -> Optional[nn.Module]:
    """An empty (uninitialized) stacked version of one leaf; None for a stateless channel-wise leaf."""
    m, n = mods[0], len(mods)
    floats = [t for t in m.state_dict().values() if t.is_floating_point()]
    kw = {"device": floats[0].device, "dtype": floats[0].dtype} if floats else {}
    skip = nn.utils.skip_init  # no random initialization: the global RNG stays untouched
    if type(m) is nn.Conv2d:
        return skip(nn.Conv2d, n * m.in_channels, n * m.out_channels, m.kernel_size, m.stride, m.padding,
                    m.dilation, n * m.groups, m.bias is not None, m.padding_mode, **kw)
    if type(m) is nn.BatchNorm2d:
        return skip(nn.BatchNorm2d, n * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **kw)
    if type(m) is nn.GroupNorm:
        return skip(nn.GroupNorm, n * m.num_groups, n * m.num_channels, m.eps, m.affine, **kw)
    if type(m) is nn.Linear:
        return StackedLinear(n, m.in_features, m.out_features, m.bias is not None, **kw)
    if isinstance(m, CHANNELWISE) and not m.state_dict():
        return None
    raise ConfigError("model", f"cannot stack layer {name!r} of type {type(m).__name__}",
                      "stack models built from Conv2d, BatchNorm2d, GroupNorm, Linear, ReLU and pooling, "
                      "or train the copies one after another (stacked=false)")


def _stack(tensors: Sequence[torch.Tensor], linear: bool) -> torch.Tensor:
    if tensors[0].ndim == 0:  # num_batches_tracked: one counter, the same for every copy
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ConfigError("models", "batch-norm layers have tracked different numbers of batches",
                              "stack copies with the same training history")
        return tensors[0].clone()
    return torch.stack(list(tensors)) if linear else torch.cat(list(tensors))


def _split(t: torch.Tensor, n: int, linear: bool) -> list[torch.Tensor]:
    if t.ndim == 0:
        return [t.clone() for _ in range(n)]
    return [p.clone() for p in (t.unbind(0) if linear else t.chunk(n, 0))]


def _owner(stacked: nn.Module, key: str) -> nn.Module:
    return stacked.get_submodule(key.rpartition(".")[0])


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One module computing all `models` (same architecture) at once, copy i in channel block i.

    Built from a deep copy of `models[0]` with every parametrized leaf replaced by its stacked version;
    tensor names are unchanged. Input: (B, N·C_in, H, W) with copy i's images in channels
    [i·C_in, (i+1)·C_in) (`stack_inputs`); output (B, N·K), copy-major (`split_outputs`).
    """
    n = len(models)
    if n < 1:
        raise ValueError("stack_models needs at least one model")
    def layout(m: nn.Module) -> tuple:
        return [type(x) for x in m.modules()], [(k, v.shape) for k, v in m.state_dict().items()]

    ref = layout(models[0])
    for i, m in enumerate(models[1:], 1):
        if layout(m) != ref:
            raise ConfigError("models", f"model {i} has another architecture than model 0",
                              "stack copies of one architecture")
    stacked = copy.deepcopy(models[0])
    for name, leaf in list(models[0].named_modules()):
        if next(leaf.children(), None) is not None:
            if leaf._parameters or any(b is not None for b in leaf._buffers.values()):
                raise ConfigError("model", f"module {name!r} ({type(leaf).__name__}) holds tensors of its own",
                                  "keep parameters in Conv2d/Linear/norm layers")
            continue
        sources = [m.get_submodule(name) for m in models]
        new = _stacked_leaf(sources, name or type(leaf).__name__)
        if new is None:
            continue
        if not name:  # the model is a single leaf
            stacked = new
        else:
            parent, _, attr = name.rpartition(".")
            setattr(stacked.get_submodule(parent), attr, new)
        linear = isinstance(new, StackedLinear)
        with torch.no_grad():
            for key, t in new.state_dict(keep_vars=True).items():
                t.copy_(_stack([s.state_dict()[key] for s in sources], linear))
        new.train(leaf.training)
    return stacked


def unstack_states(stacked: nn.Module, n: int) -> list[dict[str, torch.Tensor]]:
    """The N copies' state dicts (original names and shapes, fresh tensors) of a stacked module."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in stacked.state_dict().items():
        for i, part in enumerate(_split(t.detach(), n, isinstance(_owner(stacked, key), StackedLinear))):
            out[i][key] = part
    return out


def stack_mask(stacked: nn.Module, mask: Mask, n: int) -> Mask:
    """`mask` (for one copy) laid out like the stacked module's weights: every copy gets the same mask."""
    return Mask((k, _stack([v] * n, isinstance(_owner(stacked, k), StackedLinear))) for k, v in mask.items())


def stack_inputs(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-copy batches (B, C, H, W) -> the stacked input (B, N·C, H, W)."""
    return torch.cat(list(xs), 1)


def split_outputs(out: torch.Tensor, n: int) -> torch.Tensor:
    """The stacked output (B, N·K) -> (B, N, K)."""
    return out.reshape(out.shape[0], n, -1)


def copy_losses(logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each copy's mean cross-entropy, shape (N,), from logits (B, N, K) and per-copy targets (class
    ids (B,) or probabilities (B, K), e.g. CutMix's soft labels)."""
    k = logits.shape[-1]
    if all(t.ndim == 1 for t in targets):
        y = torch.stack(list(targets), 1)  # (B, N)
    else:
        y = torch.stack([t if t.ndim == 2 else F.one_hot(t, k).to(logits.dtype) for t in targets], 2)  # (B, K, N)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0)


def train_copies(model: nn.Module, data: ImageData, hp: TrainingHparams, *, device="cpu",
                 seeds: Sequence[tuple[int, int]], mask: Optional[Mask] = None, start_step: int = 0,
                 stop_step: Optional[int] = None) -> tuple[list[nn.Module], list[TrainResult]]:
    """Train one copy of `model` per (order_seed, aug_seed) in `seeds`, all as one stacked network.

    Copy i follows `train(copy.deepcopy(model), data, hp, order_seed=seeds[i][0],
    aug_seed=seeds[i][1], mask=mask, start_step=start_step, stop_step=stop_step)`: its own data
    order and augmentation generator, the same schedule, optimizer and masks. The loss is the sum of
    the copies' mean cross-entropies, so each copy's gradient is its own. Returns the trained copies
    (the architecture of `model`, on the device) and one TrainResult each; `model` is not changed.
    A non-finite loss raises DivergenceError naming the copy.
    """
    n = len(seeds)
    if n < 1:
        raise ConfigError("seeds", "need at least one (order_seed, aug_seed) pair", "e.g. [(0, 0), (1, 1)]")
    loop = Loop.make(data, hp, device, stop_step)
    device = loop.device
    stacked = stack_models([model] * n)
    net = prepare(stacked, hp, device)
    remask = masker(stack_mask(stacked, mask, n) if mask is not None else None, stacked)
    remask()
    opt = make_optimizer(stacked, hp, device)
    orders = [loop.order(o, start_step) for o, _ in seeds]
    gens = [loop.aug_generator(a) for _, a in seeds]
    meter = LossMeter(n, device)

    histories: list[list[dict]] = [[] for _ in range(n)]
    stacked.train()
    step = start_step
    losses = [float("nan")] * n
    while step < loop.stop:
        xs, ys = zip(*(loop.batch(order.indices(step), g) for order, g in zip(orders, gens)))
        x = loop.memory_format(stack_inputs(xs))
        lr = loop.lr(step)
        with autocast(hp, device):
            per_copy = copy_losses(split_outputs(net(x), n), ys)
            loss = per_copy.sum()
        optimizer_step(opt, loss, lr, remask)
        meter.add(per_copy)
        step += 1
        if loop.epoch_ends(step):
            losses = meter.take()
            bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
            if bad:
                i = bad[0]
                also = f" (also copies {', '.join(map(str, bad[1:]))})" if len(bad) > 1 else ""
                raise loop.divergence(losses[i], step, lr, who=f"copy {i} (order seed {seeds[i][0]}, "
                                      f"augmentation seed {seeds[i][1]}){also}: ")
            for h, v in zip(histories, losses):
                h.append(loop.record(step, v, lr))

    copies = []
    for state in unstack_states(stacked, n):
        m = copy.deepcopy(model).to(device)
        m.load_state_dict(state)
        m.train()
        copies.append(m)
    results = [TrainResult(steps=step, epochs=step / loop.spe, train_loss=v, history=h)
               for v, h in zip(losses, histories)]
    return copies, results
