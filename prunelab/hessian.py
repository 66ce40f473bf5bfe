"""Diagonal of the loss Hessian and its top eigenvalue (the paper's Sec. 4.2 table).

The loss is the mean cross-entropy of the model (eval mode) on one fixed training batch, as a function
of the weights of the prunable layers (conv and linear `weight`s; biases and norm parameters held
fixed). A pruned network is parametrized as w ⊙ mask, as masked training optimizes it, so the Hessian
is exactly zero on pruned coordinates.

All curvature comes from Hessian-vector products (double backward through one retained graph,
batched over vectors with `is_grads_batched`, which on CPU beat forward-over-reverse `torch.func`):
  * `exact`: H_ii from one-hot HVPs, one per unpruned weight — O(P) backward passes, fine for small models.
  * `hutchinson`: E[z ⊙ Hz] over Rademacher z (supported on the unpruned weights), `samples` draws.
  * top eigenvalue: power iteration on HVPs restricted to the unpruned weights (shifted by the
    dominant eigenvalue when negative curvature dominates, so the result is the largest eigenvalue).

Statistics (min, max, mean, std, mean |h|) are over the *unpruned* weights by default — unlike the
authors, whose numbers include every weight of the layers; `include_pruned=True` reproduces theirs
(pruned entries count as 0, as under their weight ⊙ mask parametrization).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data import DataSplit, ImageData
from .errors import ConfigError
from .hparams import Hparams, hp, require
from .masks import Mask, prunable_names
from .train import resolve_device


@dataclass(frozen=True)
class HessianHparams(Hparams):
    method: Literal["auto", "exact", "hutchinson"] = hp(
        "auto", "diagonal: exact (one HVP per weight), hutchinson, or auto by weight count")
    exact_max_weights: int = hp(50_000, "auto uses exact up to this many (unpruned) weights")
    samples: int = hp(200, "Hutchinson samples (Rademacher vectors)")
    batch_size: int = hp(128, "examples in the one training batch the loss is measured on")
    batch_seed: int = hp(0, "seed choosing the batch")
    seed: int = hp(0, "seed of the Hutchinson vectors and the power-iteration start")
    power_iters: int = hp(100, "max power-iteration steps for the top eigenvalue (0: skip)")
    power_tol: float = hp(1e-4, "stop when the eigenvalue estimate changes by less than this, relatively")
    include_pruned: bool = hp(False, "statistics over all weights of the layers (authors) instead of unpruned")
    chunk: int = hp(16, "Hessian-vector products computed together")

    def _validate(self, p):
        require(self.exact_max_weights >= 0, p + "exact_max_weights", "must be >= 0")
        require(self.samples >= 1, p + "samples", f"must be >= 1, got {self.samples}", "e.g. 200")
        require(self.batch_size >= 1, p + "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.power_iters >= 0, p + "power_iters", f"must be >= 0, got {self.power_iters}")
        require(self.power_tol > 0, p + "power_tol", f"must be positive, got {self.power_tol}")
        require(self.chunk >= 1, p + "chunk", f"must be >= 1, got {self.chunk}")


class HessianOperator:
    """v ↦ H v for the Hessian of `loss_fn` at the flat vector `w` (one graph, reused for every product)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, chunk: int = 16):
        self.w = w.detach().clone().requires_grad_(True)
        self.chunk = chunk
        self.count = 0
        with torch.enable_grad():
            self.loss = loss_fn(self.w)
            (self.grad,) = torch.autograd.grad(self.loss, self.w, create_graph=True)
        self._batched = True

    @property
    def size(self) -> int:
        return self.w.numel()

    def _hv(self, v: torch.Tensor, batched: bool) -> torch.Tensor:
        if not self.grad.requires_grad:  # loss linear in w
            return torch.zeros_like(v)
        (out,) = torch.autograd.grad(self.grad, self.w, v, retain_graph=True, is_grads_batched=batched,
                                     allow_unused=True)
        return torch.zeros_like(v) if out is None else out

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H v for v of shape (P,) or (c, P) (rows computed `chunk` at a time)."""
        v = v.to(self.w.device, self.w.dtype)
        if v.ndim == 1:
            self.count += 1
            return self._hv(v, False).detach()
        outs = []
        for i in range(0, v.shape[0], self.chunk):
            part = v[i:i + self.chunk]
            self.count += part.shape[0]
            if self._batched and part.shape[0] > 1:
                try:
                    outs.append(self._hv(part, True).detach())
                    continue
                except RuntimeError:
                    self._batched = False  # an op without a batching rule: one vector at a time
            outs.append(torch.stack([self._hv(r, False).detach() for r in part]))
        return torch.cat(outs) if outs else v.new_zeros(v.shape)


def diagonal_exact(op: HessianOperator, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H_ii for the coordinates `index` (default all), from one-hot HVPs."""
    index = torch.arange(op.size, device=op.w.device) if index is None else index.to(op.w.device)
    out = torch.empty(index.numel(), dtype=op.w.dtype, device=op.w.device)
    step = op.chunk * 8
    for i in range(0, index.numel(), step):
        idx = index[i:i + step]
        rows = torch.arange(idx.numel(), device=op.w.device)
        e = torch.zeros(idx.numel(), op.size, dtype=op.w.dtype, device=op.w.device)
        e[rows, idx] = 1.0
        out[i:i + step] = op(e)[rows, idx]
    return out


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def diagonal_hutchinson(op: HessianOperator, samples: int, seed: int = 0,
                        support: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hutchinson estimate of diag(H): mean of z ⊙ Hz over `samples` Rademacher z (zero off `support`).

    Unbiased; the error of entry i shrinks as sqrt(Σ_{j≠i} H_ij² / samples) (off-diagonal mass inside
    the support)."""
    g = _generator(seed)
    acc = torch.zeros(op.size, dtype=torch.float64, device=op.w.device)
    sup = None if support is None else support.to(op.w.device, op.w.dtype)
    step = op.chunk * 8
    for i in range(0, samples, step):
        c = min(step, samples - i)
        z = (torch.randint(0, 2, (c, op.size), generator=g) * 2 - 1).to(op.w.device, op.w.dtype)
        if sup is not None:
            z = z * sup
        acc += (z * op(z)).double().sum(0)
    return (acc / samples).to(op.w.dtype)


def _power(op: HessianOperator, iters: int, tol: float, seed: int, sup: Optional[torch.Tensor],
           shift: float = 0.0) -> tuple[float, int, bool]:
    """Power iteration on (H − shift·I) restricted to `sup`: (dominant eigenvalue, steps, converged)."""
    v = torch.randn(op.size, generator=_generator(seed), dtype=torch.float64).to(op.w.device, op.w.dtype)
    if sup is not None:
        v = v * sup
    nrm = float(v.norm())
    if nrm == 0.0:
        return 0.0, 0, True
    v = v / nrm
    lam, prev = 0.0, None
    for it in range(1, iters + 1):
        hv = op(v)
        if shift:
            hv = hv - shift * v
        if sup is not None:
            hv = hv * sup
        lam = float(torch.dot(v.double(), hv.double()))
        n = float(hv.norm())
        if n == 0.0:
            return 0.0, it, True
        if prev is not None and abs(lam - prev) <= tol * max(abs(lam), 1e-30):
            return lam, it, True
        prev = lam
        v = hv / n
    return lam, iters, False


def top_eigenvalue(op: HessianOperator, iters: int = 100, tol: float = 1e-4, seed: int = 0,
                   support: Optional[torch.Tensor] = None) -> dict:
    """Largest (algebraic) eigenvalue of H restricted to `support`, by power iteration on HVPs.

    Power iteration finds the eigenvalue of largest magnitude (`dominant`); if that is negative
    (negative curvature dominates, e.g. at initialization) a second run on H − dominant·I finds the
    top one. Returns {eigenvalue, dominant, iterations, converged}; a run converges when its estimate
    (Rayleigh quotient) changes by ≤ tol·|λ| between steps.
    """
    sup = None if support is None else support.to(op.w.device, op.w.dtype)
    if iters == 0:
        return {"eigenvalue": None, "dominant": None, "iterations": 0, "converged": False}
    dom, it, conv = _power(op, iters, tol, seed, sup)
    top = dom
    if dom < 0:
        shifted, it2, conv2 = _power(op, iters, tol, seed + 1, sup, shift=dom)
        top, it, conv = shifted + dom, it + it2, conv and conv2
    return {"eigenvalue": top, "dominant": dom, "iterations": it, "converged": conv}


def diagonal_stats(values: torch.Tensor) -> dict:
    """min, max, mean, std (population), mean |h| and count of a set of diagonal entries."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        raise ConfigError("mask", "no weights to measure (everything is pruned)", "use a less sparse mask")
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "std": float(v.std(correction=0)), "mean_abs": float(v.abs().mean()), "count": v.numel()}


def _batch(data: Union[ImageData, DataSplit], size: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    train = data.train if isinstance(data, DataSplit) else data
    n = min(size, len(train))
    idx = torch.randperm(len(train), generator=_generator(seed))[:n].sort().values
    x = train.normalize(train.pixels(train.x[idx].to(device)))
    return x, train.y[idx].to(device)


def hessian_analysis(model: nn.Module, data: Union[ImageData, DataSplit], hess_hp: HessianHparams = HessianHparams(),
                     device="cpu", mask: Optional[Mask] = None, return_diagonal: bool = False) -> dict:
    """Hessian diagonal statistics and top eigenvalue of `model`'s loss on one training batch.

    Weights measured: the entries of `mask` (or every prunable weight of the model without a mask).
    Statistics are over the unpruned weights unless `hess_hp.include_pruned` (see the module docstring).
    Returns plain data: `method`, `stats`, `top_eigenvalue` (float; None with power_iters=0),
    `power_iteration` ({dominant, iterations, converged}), `loss`, counts, `hvps`, `wall_s`, and with
    `return_diagonal` the measured diagonal as a list (in the mask's / model's order of the weights).
    """
    t0 = time.perf_counter()
    hess_hp.validate()
    device = resolve_device(device)
    model = model.to(device).eval()
    params = dict(model.named_parameters())
    if mask is not None:
        mask.check_fits(model)
        names = list(mask)
    else:
        names = prunable_names(model)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    fixed.update({k: v for k, v in model.named_buffers()})
    dtype = params[names[0]].dtype if names else torch.float32
    if mask is not None:
        support = torch.cat([mask[n].reshape(-1) for n in names]).to(device=device, dtype=dtype)
    else:
        support = torch.ones(sum(sizes), device=device, dtype=dtype)
    w0 = torch.cat([params[n].detach().reshape(-1).to(dtype) for n in names]) * support
    x, y = _batch(data, hess_hp.batch_size, hess_hp.batch_seed, device)

    def loss_fn(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w * support, sizes)  # w ⊙ mask: pruned coordinates have zero curvature
        state = dict(fixed)
        state.update({n: p.view(s) for n, p, s in zip(names, parts, shapes)})
        return F.cross_entropy(functional_call(model, state, (x,)), y)

    op = HessianOperator(loss_fn, w0, hess_hp.chunk)
    unpruned = support.bool()
    n_unpruned = int(unpruned.sum())
    method = hess_hp.method
    if method == "auto":
        method = "exact" if n_unpruned <= hess_hp.exact_max_weights else "hutchinson"
    if method == "exact":
        diag = torch.zeros(op.size, device=device)
        idx = unpruned.nonzero().flatten()
        diag[idx] = diagonal_exact(op, idx)
    else:
        diag = diagonal_hutchinson(op, hess_hp.samples, hess_hp.seed, support)
    measured = diag if hess_hp.include_pruned else diag[unpruned]
    eig = top_eigenvalue(op, hess_hp.power_iters, hess_hp.power_tol, hess_hp.seed, support)
    out = {"method": method, "stats": diagonal_stats(measured), "top_eigenvalue": eig["eigenvalue"],
           "power_iteration": {k: eig[k] for k in ("dominant", "iterations", "converged")},
           "loss": float(op.loss.detach()), "weights": op.size, "unpruned": n_unpruned,
           "include_pruned": hess_hp.include_pruned, "batch_size": int(x.shape[0]),
           "samples": hess_hp.samples if method == "hutchinson" else None, "hvps": op.count,
           "wall_s": time.perf_counter() - t0}
    if return_diagonal:
        out["diagonal"] = measured.tolist()
    return out
