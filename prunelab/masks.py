"""Pruning masks: which weights of a model survive.

A Mask maps the name of every prunable weight (the `weight` of each Conv2d and Linear layer; biases
and normalization parameters are never pruned) to a bool tensor of the same shape.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import OrderedDict
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .errors import ConfigError, CorruptFileError, first_line
from .files import atomic_write, frame, unframe

MASK_MAGIC = b"PRUNELAB-MASK-1\n"


def prunable_names(model: nn.Module, prune_classifier: bool = True) -> list[str]:
    """Names (as in `named_parameters`) of the weights magnitude pruning acts on, in model order."""
    names = []
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last_linear = linears[-1] if linears else None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if not prune_classifier and name == last_linear:
                continue
            names.append(f"{name}.weight" if name else "weight")
    return names


class Mask(OrderedDict):
    """name -> bool tensor. True = the weight survives."""

    @classmethod
    def ones_like(cls, model: nn.Module, prune_classifier: bool = True) -> "Mask":
        params = dict(model.named_parameters())
        return cls((n, torch.ones_like(params[n], dtype=torch.bool, device="cpu"))
                   for n in prunable_names(model, prune_classifier))

    # ---- counts ---------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(v.numel() for v in self.values())

    @property
    def remaining(self) -> int:
        return int(sum(int(v.sum()) for v in self.values()))

    @property
    def density(self) -> float:
        return self.remaining / max(self.total, 1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def report(self) -> dict:
        """Per-layer and total sparsity (fraction of weights pruned)."""
        layers = {n: 1.0 - float(v.float().mean()) for n, v in self.items()}
        return {"total": self.sparsity, "remaining": self.remaining, "weights": self.total, "layers": layers}

    # ---- applying ----------------------------------------------------------------------------
    def check_fits(self, model: nn.Module) -> None:
        """Raise a clear error unless every mask entry matches a parameter of the same shape."""
        params = dict(model.named_parameters())
        for n, v in self.items():
            if n not in params:
                raise ConfigError("mask", f"mask entry {n!r} is not a parameter of this model",
                                  "use a mask made for the same architecture (model.name, width)")
            if tuple(params[n].shape) != tuple(v.shape):
                raise ConfigError("mask", f"mask entry {n!r} has shape {tuple(v.shape)}, the model's "
                                  f"weight has {tuple(params[n].shape)}",
                                  "use a mask made for the same architecture and data shape")

    def device_tensors(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, mask in the parameter's dtype and device) pairs, for fast re-application."""
        self.check_fits(model)
        params = dict(model.named_parameters())
        return [(params[n], v.to(device=params[n].device, dtype=params[n].dtype)) for n, v in self.items()]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of `model` in place."""
        pairs = self.device_tensors(model)
        if pairs:
            torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])
        return model

    # ---- persistence -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """A checksummed torch file: a damaged copy fails to load instead of giving another mask."""
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in self.items()}, buf)
        return frame(MASK_MAGIC, buf.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "mask") -> "Mask":
        """Read `to_bytes` output (or a plain torch file of name -> bool tensor); CorruptFileError
        naming `source` if it is damaged."""
        payload = unframe(MASK_MAGIC, data, source) if data.startswith(MASK_MAGIC) else data
        try:
            d = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
            raise CorruptFileError(f"{source}: cannot be read as a mask ({type(e).__name__}: {first_line(e, 200)})") from None
        if not isinstance(d, dict) or not all(isinstance(v, torch.Tensor) for v in d.values()):
            raise CorruptFileError(f"{source}: does not hold a mask (name -> tensor)")
        return cls((k, v.bool()) for k, v in d.items())

    def save(self, path: Union[str, Path]) -> None:
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Mask":
        return cls.from_bytes(Path(path).read_bytes(), source=str(path))

    def hash(self, length: int = 16) -> str:
        """Stable content hash: names, shapes and bits, independent of device and file format."""
        h = hashlib.sha256()
        for n in sorted(self):
            v = self[n].detach().cpu().contiguous()
            h.update(n.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.to(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:length]

    def equal(self, other: "Mask") -> bool:
        return list(self) == list(other) and all(torch.equal(self[n].cpu(), other[n].cpu()) for n in self)


def magnitude_prune(mask: Mask, weights: dict[str, torch.Tensor], fraction: float | None = None, *,
                    target_remaining: int | None = None, scope: str = "global") -> Mask:
    """Prune the smallest-magnitude surviving weights; return a new mask.

    Exactly one of `fraction` (of the currently remaining weights, rounded to the nearest weight) or
    `target_remaining` (weights left after pruning) is given. `scope="global"` ranks all layers
    together (one threshold); `"layerwise"` prunes the same fraction in every layer. Ties are broken
    by position, so the result is deterministic.
    """
    if (fraction is None) == (target_remaining is None):
        raise ValueError("give exactly one of fraction and target_remaining")
    if fraction is not None and not (0.0 <= fraction <= 1.0):
        raise ConfigError("pruning.fraction", f"must be in [0, 1], got {fraction}",
                          "use e.g. 0.2 to prune 20% of the remaining weights")
    missing = [n for n in mask if n not in weights]
    if missing:
        raise ConfigError("mask", f"no weights given for mask entries {missing[:3]}",
                          "pass the model's state dict for the same architecture")
    remaining = mask.remaining
    if target_remaining is None:
        target_remaining = remaining - int(round(fraction * remaining))
    if not (0 <= target_remaining <= remaining):
        raise ConfigError("pruning", f"cannot keep {target_remaining} of {remaining} remaining weights")

    if scope == "layerwise":
        keep_frac = target_remaining / max(remaining, 1)
        out = Mask()
        for n, m in mask.items():
            sub = Mask({n: m})
            out[n] = magnitude_prune(sub, weights, target_remaining=int(round(m.sum().item() * keep_frac)))[n]
        return out
    if scope != "global":
        raise ConfigError("pruning.scope", f"unknown scope {scope!r}", "use 'global' or 'layerwise'")

    names = list(mask)
    scores = torch.cat([torch.where(mask[n].flatten(), weights[n].detach().abs().flatten().float().cpu(),
                                    torch.tensor(float("inf"))) for n in names])
    n_prune = remaining - target_remaining
    flat_keep = torch.cat([mask[n].flatten() for n in names]).clone()
    if n_prune > 0:
        # stable sort: equal magnitudes are pruned in position order, so the mask is reproducible
        order = torch.sort(scores, stable=True).indices[:n_prune]
        flat_keep[order] = False
    out, i = Mask(), 0
    for n in names:
        k = mask[n].numel()
        out[n] = flat_keep[i:i + k].view_as(mask[n]).clone()
        i += k
    return out


def shuffle_layerwise(mask: Mask, seed: int) -> Mask:
    """A random mask with exactly `mask`'s count of surviving weights in every layer, at positions drawn
    uniformly (seeded): the control that keeps the per-layer density and forgets which weights."""
    g = torch.Generator().manual_seed(int(seed))
    out = Mask()
    for n, m in mask.items():
        keep = torch.zeros(m.numel(), dtype=torch.bool)
        keep[torch.randperm(m.numel(), generator=g)[:int(m.sum())]] = True
        out[n] = keep.view_as(m)
    return out


def density_after(rounds: int, fraction: float) -> float:
    """Fraction of weights left after `rounds` rounds of pruning `fraction` of the remaining."""
    return (1.0 - fraction) ** rounds


def rounds_for_sparsity(sparsity: float, fraction: float) -> int:
    """The round whose sparsity is nearest `sparsity` (0.6 -> 4, 0.87 -> 9 at 20% per round)."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError("sparsity", f"must be in [0, 1), got {sparsity}", "e.g. 0.6 or 0.87")
    # nearest round: the paper's "87%" is round 9 (86.6%), its "60%" round 4 (59.0%)
    return max(0, round(math.log(1.0 - sparsity) / math.log(1.0 - fraction)))


def masked_state(state: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """A copy of a state dict with pruned weights set to zero."""
    out = {k: v.clone() for k, v in state.items()}
    for n, m in mask.items():
        out[n] = out[n] * m.to(device=out[n].device, dtype=out[n].dtype)
    return out

