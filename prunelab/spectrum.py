"""Curvature of the loss on the mask's subspace: top eigenvalues, trace and spectral density.

Every quantity is of the Hessian restricted to the unpruned weights, H_SS for the support S of the
mask: vectors are gathered to and scattered from the n = |S| unpruned coordinates around each
Hessian-vector product, so the zero rows and columns that the w ⊙ mask parametrization gives the
pruned coordinates are not part of the spectrum (n, not the layer size, is the dimension).

  * top eigenvalues: Ritz values of a Lanczos run with full reorthogonalization.
  * trace: Hutch++ (Meyer, Musco, Musco, Woodruff 2021), a low-rank sketch plus Hutchinson on the rest.
  * density: stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; as in PyHessian, Yao et al. 2020),
    Gaussian-broadened onto a grid.

The loss is the mean cross-entropy of the model (eval mode) either on one training batch (as
`prunelab.hessian`) or on the whole training set, the latter computed chunk by chunk so the memory
stays that of one chunk. Cost is counted in Hessian-vector products (HVPs): with the whole set one
HVP is a pass over the data (forward, backward and double backward per chunk).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data import DataSplit, ImageData
from .errors import ConfigError
from .hessian import HessianOperator, _batch
from .hparams import Hparams, hp, require
from .masks import Mask, prunable_names
from .train import resolve_device

# HessianOperator or DataHessianOperator: v ↦ H v for v of shape (P,) or (c, P), with .size and .w
Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SpectrumHparams(Hparams):
    k: int = hp(5, "number of top eigenvalues")
    lanczos_steps: int = hp(0, "Lanczos steps for the top eigenvalues (0: max(3k, 30), at most n)")
    trace_samples: int = hp(99, "HVPs Hutch++ spends on the trace (a third each: sketch, projection, rest)")
    density_vectors: int = hp(3, "stochastic Lanczos quadrature runs (random start vectors)")
    density_steps: int = hp(60, "Lanczos steps per quadrature run")
    density_sigma: float = hp(0.0, "Gaussian broadening of the density (0: 1% of the spectrum's width)")
    grid_points: int = hp(400, "points of the grid the density is evaluated on")
    data: Literal["batch", "full"] = hp("batch", "loss on one training batch, or on the whole training set")
    batch_size: int = hp(128, "examples in the one batch (data=batch) or per chunk (data=full)")
    batch_seed: int = hp(0, "seed choosing the batch (data=batch)")
    seed: int = hp(0, "seed of the random vectors")
    chunk: int = hp(16, "Hessian-vector products computed together")

    def _validate(self, p):
        require(self.k >= 1, p + "k", f"must be >= 1, got {self.k}", "e.g. 5")
        require(self.lanczos_steps == 0 or self.lanczos_steps >= self.k, p + "lanczos_steps",
                f"must be 0 (automatic) or >= k = {self.k}, got {self.lanczos_steps}", "use 0, or e.g. 3*k")
        require(self.trace_samples >= 3, p + "trace_samples", f"must be >= 3, got {self.trace_samples}",
                "e.g. 99")
        require(self.density_vectors >= 1, p + "density_vectors", f"must be >= 1, got {self.density_vectors}")
        require(self.density_steps >= 1, p + "density_steps", f"must be >= 1, got {self.density_steps}",
                "e.g. 60")
        require(self.density_sigma >= 0, p + "density_sigma", f"must be >= 0, got {self.density_sigma}",
                "use 0 for automatic")
        require(self.grid_points >= 2, p + "grid_points", f"must be >= 2, got {self.grid_points}", "e.g. 400")
        require(self.data in ("batch", "full"), p + "data", f"unknown value {self.data!r}",
                "use one of 'batch', 'full'")
        require(self.batch_size >= 1, p + "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.chunk >= 1, p + "chunk", f"must be >= 1, got {self.chunk}")


class DataHessianOperator:
    """v ↦ H v for the Hessian of the mean loss over a whole data set, summed chunk by chunk.

    H v = Σ_b (n_b / N) H_b v over chunks of `batch_size` examples, with H_b the Hessian of the mean
    loss `loss_fn(w, x_b, y_b)` on chunk b. Exact when the loss is a mean over independent examples
    (a model in eval mode). Each call rebuilds one chunk's graph at a time, so memory is that of one
    chunk; a call on (c, P) vectors shares each chunk's graph among its c rows. `prepare` turns a chunk
    of stored inputs into model inputs (e.g. normalization, device). `count` counts vectors, as
    HessianOperator does; `loss` is the mean loss at `w`.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, chunk: int = 16,
                 prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need as many labels as inputs, at least one: got {len(x)} and {len(y)}")
        self.w = w.detach().clone()
        self.loss_fn = loss_fn
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.chunk = chunk
        self.prepare = prepare if prepare is not None else (lambda xb: xb.to(self.w.device))
        self.count = 0
        with torch.no_grad():
            self.loss = sum(float(loss_fn(self.w, xb, yb)) * frac for xb, yb, frac in self._chunks())

    @property
    def size(self) -> int:
        return self.w.numel()

    @property
    def examples(self) -> int:
        return len(self.y)

    def _chunks(self):
        n = len(self.y)
        for i in range(0, n, self.batch_size):
            yb = self.y[i:i + self.batch_size]
            yield self.prepare(self.x[i:i + self.batch_size]), yb.to(self.w.device), len(yb) / n

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H v for v of shape (P,) or (c, P)."""
        v = v.to(self.w.device, self.w.dtype)
        out = torch.zeros_like(v)
        for xb, yb, frac in self._chunks():
            op = HessianOperator(lambda w: self.loss_fn(w, xb, yb), self.w, self.chunk)
            out += frac * op(v)
            del op  # this chunk's graph goes before the next one is built
        self.count += 1 if v.ndim == 1 else v.shape[0]
        return out


class _Restricted:
    """H_SS as an operator on float64 vectors of length n = |S| (scatter, HVP, gather)."""

    def __init__(self, op, support: Optional[torch.Tensor]):
        self.op = op
        device = op.w.device
        if support is None:
            self.index = None
            self.n = op.size
        else:
            support = support.reshape(-1)
            if support.numel() != op.size:
                raise ValueError(f"support has {support.numel()} entries, the operator {op.size}")
            self.index = (support.to(device) != 0).nonzero().flatten()
            self.n = self.index.numel()
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """H_SS x for x of shape (n,) or (c, n)."""
        if self.index is None:
            return self.op(x.to(self.op.w.dtype)).double()
        full = torch.zeros(*x.shape[:-1], self.op.size, dtype=self.op.w.dtype, device=self.device)
        full[..., self.index] = x.to(full.dtype)
        return self.op(full)[..., self.index].double()

    def rademacher(self, count: int, gen: torch.Generator) -> torch.Tensor:
        # drawn on the CPU so a seed gives the same vectors on every device
        z = torch.randint(0, 2, (count, self.n), generator=gen, dtype=torch.float64) * 2 - 1
        return z.to(self.device)


def _restrict(op, support) -> _Restricted:
    sub = _Restricted(op, support)
    if sub.n == 0:
        raise ValueError("the support is empty: no unpruned weights")
    return sub


def _lanczos(sub: _Restricted, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    steps = min(int(steps), sub.n)
    q = start.double() / start.norm()
    basis = torch.zeros(steps, sub.n, dtype=torch.float64, device=sub.device)
    alpha, beta = [], []
    scale = 0.0
    for j in range(steps):
        basis[j] = q
        r = sub(q)
        a = float(torch.dot(q, r))
        alpha.append(a)
        if j == steps - 1:
            break
        # in floating point the three-term recurrence loses orthogonality as Ritz values converge
        # (spurious copies of them); projecting against the whole basis, twice, keeps it orthonormal
        b_ = basis[:j + 1]
        r = r - b_.T @ (b_ @ r)
        r = r - b_.T @ (b_ @ r)
        b = float(r.norm())
        scale = max(scale, abs(a), b)
        if b <= 1e-10 * scale:
            break  # invariant subspace: T already holds the exact eigenvalues the start vector sees
        beta.append(b)
        q = r / b
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def lanczos(op: Operator, steps: int, support: Optional[torch.Tensor] = None,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos tridiagonalization of H restricted to `support`, with full reorthogonalization.

    Starts from a seeded Rademacher vector on the support (normalized); runs min(steps, n) HVPs, fewer
    on breakdown (an invariant subspace reached). Returns (alpha, beta): the diagonal (m,) and
    off-diagonal (m−1,) of the tridiagonal T, float64 on the CPU.
    """
    sub = _restrict(op, support)
    start = sub.rademacher(1, torch.Generator().manual_seed(int(seed)))[0]
    return _lanczos(sub, start, steps)


def top_eigenvalues(op: Operator, k: int, support: Optional[torch.Tensor] = None, steps: Optional[int] = None,
                    seed: int = 0) -> list[float]:
    """The k largest (algebraic) eigenvalues of H restricted to `support`: Ritz values of a Lanczos run.

    `steps` HVPs (default max(3k, 30), at most n). Largest first; fewer than k values when n < k or
    the run breaks down early (Lanczos sees each distinct eigenvalue once, so an exactly repeated
    eigenvalue is reported once).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sub = _restrict(op, support)
    steps = max(3 * k, 30) if steps is None else steps
    start = sub.rademacher(1, torch.Generator().manual_seed(int(seed)))[0]
    alpha, beta = _lanczos(sub, start, steps)
    ritz = torch.linalg.eigvalsh(_tridiagonal(alpha, beta))
    return ritz.flip(0)[:k].tolist()


def hutchpp_trace(op: Operator, samples: int, support: Optional[torch.Tensor] = None, seed: int = 0) -> float:
    """tr(H) restricted to `support` by Hutch++ (Meyer, Musco, Musco, Woodruff 2021), `samples` HVPs.

    A third of the HVPs sketch the range (Q = qr(H S)), a third give tr(QᵀHQ) exactly, and the rest
    run Hutchinson on (I − QQᵀ) H (I − QQᵀ). The error then scales with the Frobenius norm of H
    without its top ~samples/3 eigenvalues, not of H. With samples ≥ 2n the trace is exact.
    """
    if samples < 3:
        raise ValueError(f"Hutch++ needs at least 3 HVPs, got {samples}")
    sub = _restrict(op, support)
    gen = torch.Generator().manual_seed(int(seed))
    k = min((samples + 2) // 3, sub.n)
    s = sub.rademacher(k, gen)
    q, _ = torch.linalg.qr(sub(s).T)  # (n, k)
    trace = float((q.T * sub(q.T)).sum())
    rest = samples - 2 * k
    if k < sub.n and rest > 0:
        g = sub.rademacher(rest, gen)
        g = g - (g @ q) @ q.T
        trace += float((g * sub(g)).sum()) / rest
    return trace


def _broaden(nodes: torch.Tensor, weights: torch.Tensor, grid_points: int,
             sigma: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None or sigma <= 0:
        width = hi - lo
        scale = width if width > 0 else (max(abs(lo), abs(hi)) or 1.0)
        sigma = 0.01 * scale  # with 400 points, ~3.5 grid spacings: trapezoid integration stays exact
    # 6σ margins: the Gaussian tails beyond the grid hold < 1e-8 of the mass
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_points, dtype=torch.float64)
    z = (grid[:, None] - nodes[None, :]) / sigma
    density = (torch.exp(-0.5 * z ** 2) * weights[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return grid, density, float(sigma)


def slq_density(op: Operator, support: Optional[torch.Tensor] = None, vectors: int = 3, steps: int = 60,
                seed: int = 0, grid_points: int = 400, sigma: Optional[float] = None) -> dict:
    """Spectral density of H restricted to `support` by stochastic Lanczos quadrature (Ubaru, Chen,
    Saad 2017; as in PyHessian, Yao et al. 2020): vectors × min(steps, n) HVPs.

    Each run from a Rademacher vector gives nodes θ (eigenvalues of its T) and weights τ² (squared first
    components of T's eigenvectors, summing to 1); runs are averaged. The density is the quadrature
    broadened by Gaussians of width `sigma` (default 1% of the nodes' range) on `grid_points` points
    spanning the nodes ± 6σ; it integrates to 1 when σ spans a few grid spacings. Returns plain data:
    {"nodes", "weights", "grid", "density", "sigma", "mean"}, with mean = Σ weights·nodes, an unbiased
    estimate of tr(H_SS) / n (the mean of the vectors' zᵀHz / n).
    """
    if vectors < 1 or steps < 1 or grid_points < 2:
        raise ValueError(f"need vectors >= 1, steps >= 1, grid_points >= 2; got {vectors}, {steps}, {grid_points}")
    sub = _restrict(op, support)
    gen = torch.Generator().manual_seed(int(seed))
    starts = sub.rademacher(vectors, gen)
    nodes, weights = [], []
    for start in starts:
        alpha, beta = _lanczos(sub, start, steps)
        theta, u = torch.linalg.eigh(_tridiagonal(alpha, beta))
        nodes.append(theta)
        weights.append(u[0] ** 2 / vectors)
    nodes_t, weights_t = torch.cat(nodes), torch.cat(weights)
    grid, density, sigma = _broaden(nodes_t, weights_t, grid_points, sigma)
    return {"nodes": nodes_t.tolist(), "weights": weights_t.tolist(), "grid": grid.tolist(),
            "density": density.tolist(), "sigma": sigma, "mean": float((weights_t * nodes_t).sum())}


def _flat_problem(model: nn.Module, mask: Optional[Mask], device):
    """The prunable weights of `model` as one flat vector: (w0 ⊙ support, support, loss(w, x, y))."""
    params = dict(model.named_parameters())
    if mask is not None:
        mask.check_fits(model)
        names = list(mask)
    else:
        names = prunable_names(model)
    if not names:
        raise ConfigError("mask", "the model has no prunable weights", "use a model with conv or linear layers")
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    fixed.update({k: v for k, v in model.named_buffers()})
    dtype = params[names[0]].dtype
    if mask is not None:
        support = torch.cat([mask[n].reshape(-1) for n in names]).to(device=device, dtype=dtype)
    else:
        support = torch.ones(sum(sizes), device=device, dtype=dtype)
    w0 = torch.cat([params[n].detach().reshape(-1).to(dtype) for n in names]) * support

    def loss_fn(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w * support, sizes)  # w ⊙ mask, as masked training optimizes it
        state = dict(fixed)
        state.update({n: p.view(s) for n, p, s in zip(names, parts, shapes)})
        return F.cross_entropy(functional_call(model, state, (x.to(dtype),)), y)

    return w0, support, loss_fn, dtype


def spectrum_analysis(model: nn.Module, data: Union[ImageData, DataSplit], spec_hp: SpectrumHparams = SpectrumHparams(),
                      device="cpu", mask: Optional[Mask] = None) -> dict:
    """Top eigenvalues (Lanczos), trace (Hutch++) and spectral density (stochastic Lanczos quadrature)
    of the loss Hessian restricted to the unpruned weights of `mask` (every prunable weight without one).

    The loss is the mean cross-entropy (model in eval mode, weights w ⊙ mask) on one training batch
    (`data="batch"`) or on the whole training set in chunks (`data="full"`). Costs lanczos_steps +
    trace_samples + density_vectors × density_steps HVPs (fewer when n is small). Returns plain
    data: top_eigenvalues (largest first), trace, trace_per_weight (trace / n), density (see
    `slq_density`), unpruned (n), weights, data, examples, hvps (and hvps_by_part), loss, wall_s.
    """
    t0 = time.perf_counter()
    spec_hp.validate()
    device = resolve_device(device)
    model = model.to(device).eval()
    w0, support, loss_fn, dtype = _flat_problem(model, mask, device)
    n = int((support != 0).sum())
    if n == 0:
        raise ConfigError("mask", "no weights to measure (everything is pruned)", "use a less sparse mask")
    if spec_hp.data == "batch":
        x, y = _batch(data, spec_hp.batch_size, spec_hp.batch_seed, device)
        op = HessianOperator(lambda w: loss_fn(w, x, y), w0, spec_hp.chunk)
        examples, loss = int(x.shape[0]), float(op.loss.detach())
    else:
        train = data.train if isinstance(data, DataSplit) else data
        op = DataHessianOperator(loss_fn, w0, train.x, train.y, spec_hp.batch_size, spec_hp.chunk,
                                 prepare=lambda xb: train.normalize(train.pixels(xb.to(device))))
        examples, loss = len(train), op.loss
    parts = {}
    top = top_eigenvalues(op, spec_hp.k, support, spec_hp.lanczos_steps or None, spec_hp.seed)
    parts["top_eigenvalues"] = op.count
    trace = hutchpp_trace(op, spec_hp.trace_samples, support, spec_hp.seed)
    parts["trace"] = op.count - parts["top_eigenvalues"]
    density = slq_density(op, support, spec_hp.density_vectors, spec_hp.density_steps, spec_hp.seed,
                          spec_hp.grid_points, spec_hp.density_sigma or None)
    parts["density"] = op.count - parts["top_eigenvalues"] - parts["trace"]
    return {"top_eigenvalues": top, "trace": trace, "trace_per_weight": trace / n, "density": density,
            "unpruned": n, "weights": op.size, "data": spec_hp.data, "examples": examples,
            "hvps": op.count, "hvps_by_part": parts, "loss": loss, "wall_s": time.perf_counter() - t0}
