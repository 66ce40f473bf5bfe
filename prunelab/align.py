"""Permutation alignment of two trained copies that carries their pruning mask, and REPAIR.

Weight matching: Ainsworth, Hayase, Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation
Symmetries". REPAIR: Jordan, Sedghi, Saukh, Entezari, Neyshabur 2023, "REPAIR: REnormalizing Permuted
Activations for Interpolation Repair".

A hidden channel can be renumbered without changing what a network computes, as long as every tensor
that produces or consumes it is renumbered the same way. A `PermutationSpec` lists these channel spaces
(*groups*) and, for each, the state-dict entries and axes it moves. Permuting a pruned network's mask
along the same axes keeps it the same sparse subnetwork (same per-layer densities, same function).

Permutation convention: `perms[g]` is a LongTensor with `aligned.index_select(axis, perms[g])`, i.e.
channel i of the aligned network is channel `perms[g][i]` of the original.

Where REPAIR corrects (`PermutationSpec.points`); every correction is a per-channel affine
y -> a·y + c with a > 0, fused into existing parameters so the result is the same architecture with
the same state-dict keys, and a zero weight stays zero (the mask still holds):
  * no normalization (MLPs, plain conv stacks): each hidden Conv2d/Linear output, before the
    activation, as in the paper; fused into that layer's weight and bias.
  * ConvNet-3 (GroupNorm with one group per channel, i.e. instance norm): each block's *norm output*,
    before the ReLU; fused into the norm's affine parameters. A per-channel affine before an instance
    norm is removed by the norm itself (it subtracts each example's channel mean and divides by its
    std), so correcting the conv output would change nothing. The norm already undoes the variance
    collapse per example; what is left is the shrinking of the interpolated affine scale where the
    endpoints' scales differ in sign or size, so the correction here is usually small.
  * ResNet with BatchNorm: every conv's output before its BN (stem conv, each block's conv1 and conv2,
    each shortcut conv); fused into that BN's affine parameters, so that in eval mode the BN sees the
    corrected input. The paper's own variant for BN networks is to reset the BN statistics
    (`stability.recompute_bn_stats`); a reset replaces this correction (train-mode BN normalizes its
    actual input), so use one or the other.

Statistics are per channel over the examples and positions of all given batches (population std), in
eval mode. Corrections are found in forward order, each measured with the earlier ones in place, so
every point of the final network has its target statistics on those batches.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping, Optional, Sequence, Union

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .masks import Mask, masked_state
from .models.convnet import ConvNet
from .models.resnet import BasicBlock, ResNet
from .data import DataSplit
from .stability import (LMCHparams, bn_batches, bn_curves, curve_barriers, eval_sets, interpolate_states,
                        lmc_alphas, measure_point)
from .train import resolve_device

# layers that act on each channel alone (or not at all): a permutation passes through them unchanged
_PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
                 nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class PermutedAxis:
    """One axis of one state-dict entry that a group permutes. `block` > 1: the axis holds `block`
    consecutive indices per channel (a flattened C×H×W input to a Linear layer: block = H·W)."""
    entry: str
    axis: int
    group: str
    block: int = 1


@dataclass(frozen=True)
class RepairPoint:
    """A place where REPAIR measures and corrects channel statistics: the output of `module`.

    `how="output"`: the correction is fused into `into`'s own weight and bias (`into == module`).
    `how="bn_input"`: `module` feeds the BatchNorm `into`; the correction is fused into the BN's affine
    parameters so that, in eval mode, it acts on the BN's input.
    """
    module: str
    group: str
    into: str
    how: Literal["output", "bn_input"]


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation symmetry of one architecture.

    `groups`: group name -> number of channels, in model order. `axes`: every permuted (entry, axis).
    `buffers`: permuted entries that are statistics (BN running mean/var), permuted but not matched on.
    `points`: where REPAIR corrects, in model order.
    """
    groups: dict[str, int]
    axes: tuple[PermutedAxis, ...]
    buffers: frozenset[str] = frozenset()
    points: tuple[RepairPoint, ...] = ()
    _by_entry: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        by_entry: dict[str, list[PermutedAxis]] = {}
        for ax in self.axes:
            by_entry.setdefault(ax.entry, []).append(ax)
        object.__setattr__(self, "_by_entry", by_entry)

    def entry_axes(self, entry: str) -> list[PermutedAxis]:
        return self._by_entry.get(entry, [])

    def group_axes(self, group: str) -> list[PermutedAxis]:
        return [ax for ax in self.axes if ax.group == group]

    @property
    def entries(self) -> list[str]:
        return list(self._by_entry)


class _Builder:
    def __init__(self):
        self.groups: dict[str, int] = {}
        self.axes: list[PermutedAxis] = []
        self.buffers: set[str] = set()
        self.points: list[RepairPoint] = []

    def group(self, name: str, size: int) -> str:
        self.groups[name] = size
        return name

    def add(self, entry: str, axis: int, group: str, block: int = 1) -> None:
        self.axes.append(PermutedAxis(entry, axis, group, block))

    def produce(self, prefix: str, module: nn.Module, group: str) -> None:
        """`module`'s output channels are `group`: its weight/bias (and BN statistics) along axis 0."""
        for pname in ("weight", "bias"):
            if getattr(module, pname, None) is not None:
                self.add(_key(prefix, pname), 0, group)
        for bname in ("running_mean", "running_var"):
            if getattr(module, bname, None) is not None:
                self.add(_key(prefix, bname), 0, group)
                self.buffers.add(_key(prefix, bname))

    def consume(self, prefix: str, module: nn.Module, group: str, block: int = 1) -> None:
        self.add(_key(prefix, "weight"), 1, group, block)

    def build(self) -> PermutationSpec:
        return PermutationSpec(dict(self.groups), tuple(self.axes), frozenset(self.buffers), tuple(self.points))


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unsupported(what: str, why: str) -> ValueError:
    return ValueError(f"permutation alignment does not support {what}: {why}; supported are prunelab's "
                      "ConvNet and ResNet (BasicBlock) and nn.Sequential stacks of Conv2d/Linear, "
                      "BatchNorm, per-channel GroupNorm, LayerNorm, pooling and elementwise activations")


# ---------------------------------------------------------------------------------------------
# Specs


def _chain_spec(layers: Sequence[tuple[str, nn.Module]], owner: str) -> PermutationSpec:
    """Spec of a feed-forward stack: each Conv2d/Linear output but the last is a group, consumed by the
    next Conv2d/Linear (in blocks of H·W when a conv map is flattened into a Linear)."""
    b = _Builder()
    weighted = [i for i, (_, m) in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = weighted[-1] if weighted else -1
    group: Optional[str] = None
    producer: Optional[tuple[str, nn.Module]] = None  # layer whose REPAIR point is not placed yet
    for i, (name, m) in enumerate(layers):
        if producer is not None:
            pname, pmod = producer
            if isinstance(m, _BATCH_NORMS):
                b.points.append(RepairPoint(pname, group, name, "bn_input"))
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                # a per-example norm would undo a correction placed before it
                b.points.append(RepairPoint(name, group, name, "output"))
            else:
                b.points.append(RepairPoint(pname, group, pname, "output"))
            producer = None
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise _unsupported(f"{owner} ({name}: grouped Conv2d)", "its channels cannot be permuted freely")
            if group is not None:
                cin = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                size = b.groups[group]
                if isinstance(m, nn.Conv2d) and cin != size or cin % size:
                    raise _unsupported(f"{owner} ({name})", f"takes {cin} inputs after {size} channels")
                b.consume(name, m, group, cin // size)
            group = None
            if i != last:
                group = b.group(name, m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
                b.produce(name, m, group)
                producer = (name, m)
        elif isinstance(m, (*_BATCH_NORMS, nn.GroupNorm, nn.LayerNorm)):
            if group is None:
                continue  # a norm of the input or of the output: nothing of it is permuted
            size = b.groups[group]
            if isinstance(m, nn.GroupNorm) and (m.num_channels != size or m.num_groups not in (1, size)):
                raise _unsupported(f"{owner} ({name}: GroupNorm with {m.num_groups} groups)",
                                   "a permutation would move channels between its groups")
            if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) != (size,):
                raise _unsupported(f"{owner} ({name}: LayerNorm over {tuple(m.normalized_shape)})",
                                   "only a LayerNorm over the features of a Linear layer is supported")
            b.produce(name, m, group)
        elif not isinstance(m, _PASS_THROUGH):
            raise _unsupported(f"{owner} ({name or 'layer'}: {type(m).__name__})", "unknown layer type")
    return b.build()


def _resnet_spec(model: ResNet) -> PermutationSpec:
    """One group per residual stream (a stream lasts while the shortcuts are identities) and one per
    block's inner channels."""
    b = _Builder()
    stream = b.group("residual.stem", model.conv1.out_channels)
    b.produce("conv1", model.conv1, stream)
    b.produce("bn1", model.bn1, stream)
    b.points.append(RepairPoint("conv1", stream, "bn1", "bn_input"))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for j, block in enumerate(getattr(model, stage)):
            p = f"{stage}.{j}"
            if not isinstance(block, BasicBlock):
                raise _unsupported(f"ResNet block {p} ({type(block).__name__})", "only BasicBlock is known")
            inner = b.group(f"{p}.conv1", block.conv1.out_channels)
            b.consume(f"{p}.conv1", block.conv1, stream)
            b.produce(f"{p}.conv1", block.conv1, inner)
            b.produce(f"{p}.bn1", block.bn1, inner)
            b.points.append(RepairPoint(f"{p}.conv1", inner, f"{p}.bn1", "bn_input"))
            out = stream
            if len(block.shortcut) > 0:
                conv, bn = block.shortcut[0], block.shortcut[1]
                out = b.group(f"residual.{p}", conv.out_channels)
                b.consume(f"{p}.shortcut.0", conv, stream)
                b.produce(f"{p}.shortcut.0", conv, out)
                b.produce(f"{p}.shortcut.1", bn, out)
            b.consume(f"{p}.conv2", block.conv2, inner)
            b.produce(f"{p}.conv2", block.conv2, out)
            b.produce(f"{p}.bn2", block.bn2, out)
            b.points.append(RepairPoint(f"{p}.conv2", out, f"{p}.bn2", "bn_input"))
            if out != stream:
                b.points.append(RepairPoint(f"{p}.shortcut.0", out, f"{p}.shortcut.1", "bn_input"))
            stream = out
    b.consume("classifier", model.classifier, stream)
    return b.build()


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        full = _key(prefix, name)
        out += _leaves(child, full) if isinstance(child, nn.Sequential) else [(full, child)]
    return out


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The permutation groups of `model` (prunelab's ConvNet or ResNet, or an nn.Sequential stack),
    read from its modules and checked against its state dict; ValueError naming an unsupported one."""
    if isinstance(model, ResNet):
        spec = _resnet_spec(model)
    elif isinstance(model, ConvNet):
        spec = _chain_spec(_leaves(model.features, "features") + [("classifier", model.classifier)], "ConvNet")
    elif isinstance(model, nn.Sequential):
        spec = _chain_spec(_leaves(model), "nn.Sequential")
    else:
        raise _unsupported(f"architecture {type(model).__name__}", "no permutation spec is known for it")
    state = model.state_dict()
    for ax in spec.axes:
        if ax.entry not in state or state[ax.entry].shape[ax.axis] != spec.groups[ax.group] * ax.block:
            raise _unsupported(f"{type(model).__name__} ({ax.entry})", "its shape does not match its layers")
    return spec


# ---------------------------------------------------------------------------------------------
# Applying and matching


def _take(t: torch.Tensor, axis: int, perm: torch.Tensor, block: int = 1) -> torch.Tensor:
    perm = perm.to(t.device)
    if block == 1:
        return t.index_select(axis, perm)
    shape = t.shape
    blocked = t.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1:])
    return blocked.index_select(axis, perm).reshape(shape)


def _check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    for g, n in spec.groups.items():
        if g not in perms:
            raise ValueError(f"no permutation given for group {g!r}")
        p = perms[g]
        if p.shape != (n,) or not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
            raise ValueError(f"perms[{g!r}] is not a permutation of {n} channels")


def _permute_entry(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], key: str, t: torch.Tensor,
                   skip: Optional[str] = None) -> torch.Tensor:
    for ax in spec.entry_axes(key):
        if ax.group != skip:
            t = _take(t, ax.axis, perms[ax.group], ax.block)
    return t


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                      mask: Optional[Mask] = None) -> tuple[dict[str, torch.Tensor], Optional[Mask]]:
    """Permute every entry of `state` (BN statistics included) and, when given, `mask` along the same
    axes; returns new (state, mask). The permuted network computes the same function, and
    `state' ⊙ mask' == permute(state ⊙ mask)` with every layer's density unchanged."""
    _check_perms(spec, perms)
    missing = [e for e in spec.entries if e not in state]
    if missing:
        raise ValueError(f"state has no entries {missing[:3]} of the permutation spec (another architecture?)")
    out = {k: _permute_entry(spec, perms, k, v.detach()).clone() for k, v in state.items()}
    new_mask = None
    if mask is not None:
        new_mask = type(mask)((k, _permute_entry(spec, perms, k, m).clone()) for k, m in mask.items())
    return out, new_mask


def identity_perms(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {g: torch.arange(n) for g, n in spec.groups.items()}


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations that align b to a (Git Re-Basin's weight matching, Ainsworth et al. 2023).

    Coordinate descent: groups in a seeded random order, each solved as a linear assignment maximizing
    Σ ⟨W_a, P·W_b⟩ over the parameters touching it (the other groups' current permutations applied),
    until a whole pass improves no group or `max_iter` passes. BN statistics are not matched on. The
    weights are used as given: pass masked weights (w ⊙ mask) to match the subnetworks.
    """
    perms = identity_perms(spec)
    matched = {g: [ax for ax in spec.group_axes(g) if ax.entry not in spec.buffers] for g in spec.groups}
    a64 = {e: state_a[e].detach().double() for e in spec.entries if e not in spec.buffers}
    b64 = {e: state_b[e].detach().double().to(a64[e].device) for e in a64}
    gen = torch.Generator().manual_seed(int(seed))
    names = list(spec.groups)
    for _ in range(max_iter):
        improved = False
        for gi in torch.randperm(len(names), generator=gen).tolist():
            g, n = names[gi], spec.groups[names[gi]]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for ax in matched[g]:
                wa = a64[ax.entry].movedim(ax.axis, 0).reshape(n, -1)
                wb = _permute_entry(spec, perms, ax.entry, b64[ax.entry], skip=g).movedim(ax.axis, 0).reshape(n, -1)
                cost += (wa @ wb.T).cpu()
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(n)
            old_score, new_score = cost[rows, perms[g]].sum(), cost[rows, new].sum()
            # a strict gain (beyond rounding) is required, so equal-score ties cannot cycle forever
            if new_score > old_score + 1e-12 * max(1.0, float(old_score.abs())):
                perms[g] = new
                improved = True
        if not improved:
            break
    return perms


def mask_union(mask_a: Mask, mask_b: Mask) -> Mask:
    """Weights alive in either mask: the support of a network interpolated between the two."""
    return type(mask_a)((k, mask_a[k] | mask_b[k].to(mask_a[k].device)) for k in mask_a)


def aligned_pair(model_a: nn.Module, model_b: nn.Module, mask: Optional[Mask]
                 ) -> tuple[dict[str, torch.Tensor], Optional[Mask], dict[str, torch.Tensor]]:
    """Align b to a by weight matching on the masked weights; returns (b's permuted state, b's permuted
    mask, perms). `mask` is the mask both copies were trained with (None: dense).

    After alignment b is pruned by the permuted mask, not by `mask`: interpolate the pair with no mask
    or with `mask_union(mask, mask_b_aligned)`, never with `mask` alone (it would cut b's weights).
    """
    spec = permutation_spec(model_a)
    sa = {k: v.detach() for k, v in model_a.state_dict().items()}
    sb = {k: v.detach() for k, v in model_b.state_dict().items()}
    if mask is not None:
        sa, sb_masked = masked_state(sa, mask), masked_state(sb, mask)
    else:
        sb_masked = sb
    perms = weight_matching(spec, sa, sb_masked)
    state_b, mask_b = apply_permutation(spec, perms, sb, mask)
    return state_b, mask_b, perms


# ---------------------------------------------------------------------------------------------
# REPAIR

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


class _Stop(Exception):
    pass


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


@contextlib.contextmanager
def _hooked(model: nn.Module, points: Sequence[RepairPoint], corrections: Optional[Stats] = None,
            record: Optional[dict] = None, stop_at: Optional[str] = None) -> Iterator[None]:
    """Forward hooks at the points: apply `corrections` to the outputs, accumulate float64 sums of
    the (corrected) outputs into `record`, and stop the forward pass after `stop_at`."""
    corrections = corrections or {}
    modules = dict(model.named_modules())

    def make(name):
        def hook(_module, _inputs, out):
            if name in corrections:
                scale, shift = corrections[name]
                out = out * _per_channel(scale, out) + _per_channel(shift, out)
            if record is not None:
                x = out.detach().double().transpose(1, -1).reshape(-1, out.shape[1])
                acc = record.setdefault(name, [0, 0.0, 0.0])
                acc[0] += x.shape[0]
                acc[1] = acc[1] + x.sum(0)
                acc[2] = acc[2] + (x * x).sum(0)
            if name == stop_at:
                raise _Stop
            return out
        return hook

    handles = []
    try:
        for p in points:
            if p.module not in modules:
                raise ValueError(f"the model has no module {p.module!r} (spec made for another architecture?)")
            handles.append(modules[p.module].register_forward_hook(make(p.module)))
        yield
    finally:
        for h in handles:
            h.remove()


def _inputs(batches: Sequence) -> list[torch.Tensor]:
    xs = [x[0] if isinstance(x, (tuple, list)) else x for x in batches]
    if not xs:
        raise ValueError("REPAIR needs at least one batch of inputs")
    return xs


def _spec(spec: Union[PermutationSpec, nn.Module, None], model: nn.Module) -> PermutationSpec:
    if isinstance(spec, PermutationSpec):
        return spec
    return permutation_spec(spec if spec is not None else model)


@torch.no_grad()
def _measure(model: nn.Module, xs: Sequence[torch.Tensor], points: Sequence[RepairPoint],
             corrections: Optional[Stats] = None, stop_at: Optional[str] = None) -> Stats:
    record: dict = {}
    was_training = model.training
    model.eval()
    try:
        with _hooked(model, points, corrections, record, stop_at):
            for x in xs:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        model.train(was_training)
    out = {}
    for name, (n, s1, s2) in record.items():
        mean = s1 / n
        out[name] = (mean.cpu(), (s2 / n - mean * mean).clamp_min(0).sqrt().cpu())
    return out


def channel_stats(model: nn.Module, batches: Sequence, spec: Union[PermutationSpec, nn.Module, None] = None,
                  corrections: Optional[Stats] = None) -> Stats:
    """Per-channel (mean, std) at every REPAIR point of `model` in eval mode over `batches` (tensors
    or (x, y) pairs): float64 on the CPU, keyed by the point's module name. With `corrections`
    (name -> (scale, shift)), they are applied at the points first, as in `corrections_applied`."""
    spec = _spec(spec, model)
    return _measure(model, _inputs(batches), spec.points, corrections)


@contextlib.contextmanager
def corrections_applied(model: nn.Module, spec: Union[PermutationSpec, nn.Module, None],
                        corrections: Stats) -> Iterator[nn.Module]:
    """Run `model` with the per-channel corrections applied at the REPAIR points (forward hooks),
    without changing its parameters."""
    with _hooked(model, _spec(spec, model).points, corrections):
        yield model


def repair_corrections(model_a: nn.Module, model_b: nn.Module, alpha: float, data_batches: Sequence,
                       spec: Union[PermutationSpec, nn.Module, None] = None) -> tuple[nn.Module, Stats]:
    """The interpolated network (1−α)·θ_a + α·θ_b, uncorrected, and the per-point (scale, shift) that
    REPAIR (Jordan et al. 2023) applies to it: after them, each channel's mean and std at each point equal
    (1−α)·a's + α·b's. The endpoints must already be aligned."""
    spec = _spec(spec, model_a)
    xs = _inputs(data_batches)
    stats_a = _measure(model_a, xs, spec.points)
    stats_b = _measure(model_b, xs, spec.points)
    missing = [p.module for p in spec.points if p.module not in stats_a]
    if missing:
        raise ValueError(f"REPAIR points {missing[:3]} were not reached by the forward pass")
    net = copy.deepcopy(model_a)
    sa = {k: v.detach() for k, v in model_a.state_dict().items()}
    sb = {k: v.detach() for k, v in model_b.state_dict().items()}
    net.load_state_dict(interpolate_states(sa, sb, alpha))

    # forward order, so that each point is measured with every correction upstream of it in place
    corrections: Stats = {}
    for p in spec.points:
        mean, std = _measure(net, xs, spec.points, corrections, stop_at=p.module)[p.module]
        (ma, sda), (mb, sdb) = stats_a[p.module], stats_b[p.module]
        target_mean, target_std = (1 - alpha) * ma + alpha * mb, (1 - alpha) * sda + alpha * sdb
        # a constant channel (e.g. a fully pruned filter) cannot be given a spread: only shift it
        dead = std <= 1e-12 * target_std.clamp_min(1.0)
        scale = torch.where(dead, torch.ones_like(std), target_std / torch.where(dead, torch.ones_like(std), std))
        corrections[p.module] = (scale, target_mean - scale * mean)
    return net, corrections


@torch.no_grad()
def fuse_corrections(model: nn.Module, spec: Union[PermutationSpec, nn.Module, None], corrections: Stats) -> nn.Module:
    """Fold the per-channel corrections into `model`'s parameters, in place (exact in eval mode)."""
    spec = _spec(spec, model)
    modules = dict(model.named_modules())
    for p in spec.points:
        if p.module not in corrections:
            continue
        scale, shift = corrections[p.module]
        m = modules[p.into]
        if getattr(m, "weight", None) is None or getattr(m, "bias", None) is None:
            raise ValueError(f"cannot fuse the REPAIR correction at {p.module!r}: {p.into!r} has no "
                             "weight and bias to absorb it")
        w, bias = m.weight, m.bias
        a = scale.to(device=w.device, dtype=torch.float64)
        c = shift.to(device=w.device, dtype=torch.float64)
        if p.how == "output":
            new_w = w.double() * a.view(-1, *([1] * (w.dim() - 1)))
            new_b = a * bias.double() + c
        else:
            # BN_eval(a·x + c) = (a·γ)(x − μ)/σ + β + γ·(c + (a − 1)·μ)/σ
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"cannot fuse the REPAIR correction into {p.into!r}: it keeps no running statistics")
            mu = m.running_mean.double()
            sigma = (m.running_var.double() + m.eps).sqrt()
            new_w = a * w.double()
            new_b = bias.double() + w.double() * (c + (a - 1) * mu) / sigma
        w.copy_(new_w.to(w.dtype))
        bias.copy_(new_b.to(bias.dtype))
    return model


def repair(model_a: nn.Module, model_b: nn.Module, alpha: float, data_batches: Sequence,
           spec: Union[PermutationSpec, nn.Module, None] = None) -> nn.Module:
    """The interpolated network θ = (1−α)·θ_a + α·θ_b with REPAIR's correction (Jordan et al. 2023)
    fused into its parameters: at every point of `spec` (default: `model_a`'s), each channel's mean and
    std over `data_batches` (input tensors or (x, y) pairs) equal (1−α)·a's + α·b's in eval mode.

    The endpoints must already be aligned (`aligned_pair`). A new module of `model_a`'s architecture;
    evaluate it in eval mode, and do not recompute its BN statistics afterwards (that replaces the fix).
    """
    spec = _spec(spec, model_a)
    net, corrections = repair_corrections(model_a, model_b, alpha, data_batches, spec)
    return fuse_corrections(net, spec, corrections)


def aligned_curves(model_a: nn.Module, model_b: nn.Module, data: DataSplit, lmc_hp: LMCHparams, device,
                   mask: Optional[Mask]) -> dict:
    """The LMC pair (a, b) measured again after aligning b to a (`aligned_pair`): `aligned` holds the
    curve in the primary BN mode and `by_bn_mode` (as `stability.bn_curves`), `aligned_repair` the
    curve of REPAIR's corrected networks at every α (statistics from `lmc_hp.bn_batches` fixed training
    batches; no BN re-estimation, which would replace the correction). The aligned pair is
    interpolated without a mask: each copy keeps its own (b's permuted) surviving weights."""
    t0 = time.perf_counter()
    device = resolve_device(device)
    state_b, mask_b, perms = aligned_pair(model_a, model_b, mask)
    b = copy.deepcopy(model_b)
    b.load_state_dict(state_b)
    a = model_a.to(device).eval()
    b = b.to(device).eval()
    aligned = bn_curves(a, b, data, lmc_hp, device, mask=None)
    spec = permutation_spec(a)
    batches = bn_batches(data.train, device, lmc_hp.bn_batches, lmc_hp.bn_batch_size)
    evals = eval_sets(data, lmc_hp, device)
    alphas = lmc_alphas(lmc_hp.num_points)
    curves: dict[str, list[float]] = {}
    for alpha in alphas:
        measure_point(repair(a, b, alpha, batches, spec).to(device).eval(), evals, curves)
    mid, mx = curve_barriers(alphas, curves, evals)
    keys = ["alphas"] + [k for k in aligned if k.endswith(("_loss", "_accuracy"))] + ["barrier_mid", "barrier_max",
                                                                                     "by_bn_mode"]
    moved = {g: int((p != torch.arange(p.numel(), device=p.device)).sum()) for g, p in perms.items()}
    return {"aligned": {k: aligned[k] for k in keys},
            "aligned_repair": {"alphas": alphas, **curves, "barrier_mid": mid, "barrier_max": mx},
            "alignment": {"channels_moved": moved, "wall_s": time.perf_counter() - t0}}
