"""2D loss landscape in the plane of several trained copies (the paper's Figure 5).

Geometry. Let θ_1…θ_k (k ≥ 3) be the copies' parameters (all floating-point parameters, pruned
weights zero), m their mean and D the k×P matrix of differences θ_i − m. Everything is computed from
the k×k Gram matrix G = D·Dᵀ (float64), so no P-sized basis vector is ever stored:
  * `basis="svd"` (default): the best-fit plane through m — the top two principal directions of D.
    With k = 3 the differences span exactly a plane, so it passes through every copy.
  * `basis="gram_schmidt"`: u = d_1/|d_1|, v = the part of d_2 orthogonal to u (normalized). Also exact
    for k = 3; for k > 3 copies 3… may lie off the plane.
Each direction is a combination of the differences, so a plane point m + x·u + y·v is an affine
combination Σ w_i(x, y)·θ_i with Σ w_i = 1. Buffers (BN running statistics) are combined with the same
weights — the 2D analogue of interpolating them linearly (`bn_mode="interpolate"`, the authors' way;
running variances are clamped at 0 where extrapolation would make them negative) — or recomputed on
training batches at every point (`bn_mode="recompute"`).

Range. The grid covers the copies' coordinates plus `margin` × (the larger of the two coordinate
ranges) on every side, so the axes have the same scale. The loss is measured on the real training
set (optionally a fixed random subset of `eval_examples`). The copies' exact coordinates are
evaluated as extra points, so each copy's loss on the surface can be checked against the copy itself.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from .chain import train_subnetworks
from .data import DataSplit
from .errors import ConfigError
from .hparams import ChainHparams, Hparams, hp, require
from .masks import Mask
from .stability import (EvalSet, batchnorm_modules, bn_batches, check_compatible, check_mask, device_mask,
                        recompute_bn_stats)
from .seeds import derive_seed
from .train import resolve_device


@dataclass(frozen=True)
class LandscapeHparams(Hparams):
    grid: int = hp(100, "points per axis (the paper: 100 × 100 = 10,000)")
    margin: float = hp(0.25, "grid extends this fraction of the copies' coordinate range beyond them")
    seeds: tuple[int, ...] = hp((0, 1, 2, 3), "seeds of the copies' data order and augmentation (paper: 4)")
    basis: Literal["svd", "gram_schmidt"] = hp("svd", "plane: best fit (SVD) or Gram–Schmidt on the first two")
    bn_mode: Literal["interpolate", "recompute"] = hp(
        "interpolate", "batch-norm statistics: combined like the weights (authors) or recomputed per point")
    bn_batches: int = hp(20, "training batches used to recompute BN statistics (bn_mode=recompute)")
    bn_batch_size: int = hp(128, "batch size for recomputing BN statistics")
    eval_examples: Optional[int] = hp(None, "evaluate on a fixed random subset of the training set")
    eval_batch_size: int = hp(1024, "batch size for evaluation")
    stacked: bool = hp(False, "train the copies as one stacked model (faster at small batch on a GPU)",
                       hashed_at_default=False)
    directions: Literal["copies", "filter_normalized"] = hp(
        "copies", "the plane: of the trained copies (the paper's), or two random filter-normalized directions "
                  "around the first copy (Li et al. 2018), masked to the subnetwork", hashed_at_default=False)
    span: float = hp(1.0, "filter_normalized: the grid covers ±span along each direction", hashed_at_default=False)
    direction_seed: int = hp(0, "filter_normalized: seed of the random directions", hashed_at_default=False)

    def _validate(self, p):
        require(self.span > 0, p + "span", f"must be positive, got {self.span}", "e.g. 1.0")
        require(self.grid >= 2, p + "grid", f"must be >= 2, got {self.grid}", "the paper uses 100")
        require(self.margin >= 0, p + "margin", f"must be >= 0, got {self.margin}", "e.g. 0.25")
        require(len(self.seeds) >= (3 if self.directions == "copies" else 1), p + "seeds",
                f"need at least 3 copies to span a plane, got {len(self.seeds)}",
                "e.g. [0, 1, 2, 3], or directions: filter_normalized (one copy is enough)")
        require(self.bn_batches >= 1, p + "bn_batches", "must be >= 1")
        require(self.bn_batch_size >= 1, p + "bn_batch_size", "must be >= 1")
        require(self.eval_examples is None or self.eval_examples > 0, p + "eval_examples", "must be positive")
        require(self.eval_batch_size >= 1, p + "eval_batch_size", "must be >= 1")


@dataclass
class Plane:
    """A plane through the mean of k copies, as affine weights over the copies.

    `ax`, `ay` (k,) are the coefficients of the orthonormal directions u, v in terms of the differences
    θ_i − mean; `coords` (k, 2) the copies' coordinates, `residuals` (k,) their distances from the plane,
    `distances` (k, k) their pairwise Euclidean distances in parameter space (all float64).
    """

    ax: torch.Tensor
    ay: torch.Tensor
    coords: torch.Tensor
    residuals: torch.Tensor
    distances: torch.Tensor

    def weights(self, x: float, y: float) -> torch.Tensor:
        """Affine weights w (Σ w = 1) with Σ w_i θ_i = mean + x·u + y·v."""
        k = self.ax.numel()
        w = x * self.ax + y * self.ay
        return w - w.sum() / k + 1.0 / k


def _geometry_names(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def fit_plane(states: Sequence[dict], mask: Optional[Mask] = None, method: str = "svd",
              names: Optional[Sequence[str]] = None) -> Plane:
    """Fit the plane of k ≥ 3 state dicts (see the module docstring).

    `names` are the tensors that define the geometry (`loss_landscape` passes the model's parameters,
    leaving out BN buffers); default: every floating-point tensor. Pruned weights count as 0.
    """
    k = len(states)
    if k < 3:
        raise ConfigError("models", f"need at least 3 trained copies to span a plane, got {k}",
                          "train 3 or more copies (the paper uses 4 seeds)")
    if method not in ("svd", "gram_schmidt"):
        raise ConfigError("basis", f"unknown basis {method!r}", "use 'svd' or 'gram_schmidt'")
    check_compatible(states)
    check_mask(mask, states[0])
    names = list(names) if names is not None else _geometry_names(states[0])
    gram = torch.zeros(k, k, dtype=torch.float64)
    for n in names:
        stack = torch.stack([s[n].detach().reshape(-1).double().cpu() for s in states])
        if mask is not None and n in mask:
            stack = stack * mask[n].reshape(1, -1).double()
        d = stack - stack.mean(0, keepdim=True)
        gram += d @ d.T
    sq = gram.diagonal()
    dist = (sq.view(-1, 1) + sq.view(1, -1) - 2 * gram).clamp_min(0).sqrt()
    scale = float(sq.max()) if float(sq.max()) > 0 else 1.0
    degenerate = ConfigError("models", "the copies do not span a plane (they are identical or collinear)",
                             "train the copies with different seeds")
    if method == "svd":
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        l1, l2 = float(evals[-1]), float(evals[-2])
        if l2 <= 1e-12 * scale:
            raise degenerate
        ax, ay = evecs[:, -1] / l1 ** 0.5, evecs[:, -2] / l2 ** 0.5
    else:
        if float(gram[0, 0]) <= 1e-12 * scale:
            raise degenerate
        ax = torch.zeros(k, dtype=torch.float64)
        ax[0] = 1 / float(gram[0, 0]) ** 0.5
        c = torch.zeros(k, dtype=torch.float64)
        c[1] = 1.0
        c = c - (ax @ gram @ c) * ax
        nrm = float(c @ gram @ c)
        if nrm <= 1e-12 * scale:
            raise degenerate
        ay = c / nrm ** 0.5
    coords = torch.stack([gram @ ax, gram @ ay], 1)
    residuals = (sq - (coords ** 2).sum(1)).clamp_min(0).sqrt()
    return Plane(ax=ax, ay=ay, coords=coords, residuals=residuals, distances=dist)


@torch.no_grad()
def combine_into(target: dict, states: Sequence[dict], w: torch.Tensor,
                 masks: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write Σ w_i·states_i into `target`'s tensors in place (integer buffers: rounded; running
    variances clamped at 0; pruned weights zero)."""
    wl = [float(v) for v in w]
    for key, t in target.items():
        if t.is_floating_point():
            t.copy_(states[0][key]).mul_(wl[0])
            for wi, s in zip(wl[1:], states[1:]):
                t.add_(s[key], alpha=wi)
            if key.endswith("running_var"):
                t.clamp_min_(0)
        elif t.dtype == torch.bool:
            t.copy_(states[int(torch.tensor(wl).argmax())][key])
        else:
            acc = sum(wi * s[key].double() for wi, s in zip(wl, states))
            t.copy_(torch.round(acc).clamp_min(0).to(t.dtype))
    for n, m in (masks or {}).items():
        target[n].mul_(m)


def _grid(at, xs: Sequence[float], ys: Sequence[float]) -> tuple[list[list[float]], list[list[float]]]:
    """Loss and accuracy of `at(x, y)` over the grid, as [iy][ix] nested lists."""
    loss = [[0.0] * len(xs) for _ in ys]
    acc = [[0.0] * len(xs) for _ in ys]
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            r = at(x, y)
            loss[iy][ix], acc[iy][ix] = r["loss"], r["accuracy"]
    return loss, acc


def loss_landscape(models: Sequence[nn.Module], data: DataSplit, land_hp: LandscapeHparams = LandscapeHparams(),
                   device="cpu", mask: Optional[Mask] = None) -> dict:
    """Training loss (and accuracy) on a G×G grid in the plane of ≥ 3 trained copies.

    Returns plain data: `xs`, `ys` (axis values), `loss` and `accuracy` as G×G nested lists indexed
    [iy][ix], `copies` (per copy: `coords` [x, y], `residual` distance from the plane, `loss_on_plane`
    and `accuracy_on_plane` at its own coordinates, `loss` and `accuracy` of the copy itself),
    `distances` (pairwise, k×k), and the settings used.
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    land_hp.validate()
    if land_hp.directions == "filter_normalized":
        return _filter_normalized_landscape(models, data, land_hp, device, mask, t0)
    if len(models) < 3:
        raise ConfigError("models", f"need at least 3 trained copies to span a plane, got {len(models)}",
                          "train 3 or more copies (the paper uses 4 seeds)")
    states = [{k: v.detach().to(device) for k, v in m.state_dict().items()} for m in models]
    check_compatible(states)
    param_names = [n for n, _ in models[0].named_parameters()]
    plane = fit_plane(states, mask, land_hp.basis, names=param_names)

    work = copy.deepcopy(models[0]).to(device).eval()
    target = work.state_dict()
    masks = device_mask(mask, target)
    ev = EvalSet(data.train, device, land_hp.eval_batch_size, land_hp.eval_examples)
    recompute = land_hp.bn_mode == "recompute" and bool(batchnorm_modules(work))
    bn_data = bn_batches(data.train, device, land_hp.bn_batches, land_hp.bn_batch_size) if recompute else []

    def at(x: float, y: float) -> dict:
        combine_into(target, states, plane.weights(x, y), masks)
        if recompute:
            recompute_bn_stats(work, bn_data)
        return ev.evaluate(work)

    cx, cy = plane.coords[:, 0], plane.coords[:, 1]
    pad = land_hp.margin * max(float(cx.max() - cx.min()), float(cy.max() - cy.min()))
    g = land_hp.grid
    xs = torch.linspace(float(cx.min()) - pad, float(cx.max()) + pad, g, dtype=torch.float64).tolist()
    ys = torch.linspace(float(cy.min()) - pad, float(cy.max()) + pad, g, dtype=torch.float64).tolist()
    loss, acc = _grid(at, xs, ys)

    copies = []
    for i, m in enumerate(models):
        on_plane = at(float(cx[i]), float(cy[i]))
        own = ev.evaluate(m.to(device))
        copies.append({"coords": [float(cx[i]), float(cy[i])], "residual": float(plane.residuals[i]),
                       "loss_on_plane": on_plane["loss"], "accuracy_on_plane": on_plane["accuracy"],
                       "loss": own["loss"], "accuracy": own["accuracy"]})
    return {"xs": xs, "ys": ys, "loss": loss, "accuracy": acc, "copies": copies,
            "distances": plane.distances.tolist(), "basis": land_hp.basis, "bn_mode": land_hp.bn_mode,
            "bn_recomputed": recompute, "eval_examples": ev.n, "grid": g, "wall_s": time.perf_counter() - t0}


def filter_normalized_directions(model: nn.Module, mask: Optional[Mask], seed: int, count: int = 2
                                 ) -> list[dict[str, torch.Tensor]]:
    """`count` random Gaussian directions over `model`'s parameters (Li et al. 2018, "Visualizing the loss
    landscape of neural nets"): each filter (output unit of a weight with two or more dimensions) scaled to
    the norm of the model's own filter, biases and normalization parameters left out (zero), and pruned
    weights zero, so every point of the plane is the same subnetwork."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(count):
        d = {}
        for n, p in model.named_parameters():
            w = p.detach().cpu().double()
            if w.dim() < 2:
                d[n] = torch.zeros_like(w)
                continue
            r = torch.randn(w.shape, generator=g, dtype=torch.float64)
            if mask is not None and n in mask:
                r = r * mask[n].double()
            rn = r.flatten(1).norm(dim=1).clamp_min(1e-12)
            wn = w.flatten(1).norm(dim=1)
            d[n] = (r.flatten(1) * (wn / rn).unsqueeze(1)).view_as(w)
        out.append(d)
    return out


def _filter_normalized_landscape(models: Sequence[nn.Module], data: DataSplit, land_hp: LandscapeHparams,
                                 device, mask: Optional[Mask], t0: float) -> dict:
    """The grid code of `loss_landscape` on the plane θ* + x·d1 + y·d2 (θ* the first copy; BN buffers
    θ*'s, or recomputed per point). Other copies are placed by their least-squares coordinates on the
    directions, with their distance from the plane."""
    center = copy.deepcopy(models[0]).to(device).eval()
    base = {k: v.detach().clone() for k, v in center.state_dict().items()}
    d1, d2 = filter_normalized_directions(center, mask, land_hp.direction_seed)
    d1 = {k: v.to(device, base[k].dtype) for k, v in d1.items()}
    d2 = {k: v.to(device, base[k].dtype) for k, v in d2.items()}
    target = center.state_dict()
    masks = device_mask(mask, target)
    ev = EvalSet(data.train, device, land_hp.eval_batch_size, land_hp.eval_examples)
    recompute = land_hp.bn_mode == "recompute" and bool(batchnorm_modules(center))
    bn_data = bn_batches(data.train, device, land_hp.bn_batches, land_hp.bn_batch_size) if recompute else []

    @torch.no_grad()
    def at(x: float, y: float) -> dict:
        for k, t in target.items():
            t.copy_(base[k])
            if k in d1:
                t.add_(d1[k], alpha=x).add_(d2[k], alpha=y)
        for n, m in masks.items():
            target[n].mul_(m)
        if recompute:
            recompute_bn_stats(center, bn_data)
        return ev.evaluate(center)

    g = land_hp.grid
    axis = torch.linspace(-land_hp.span, land_hp.span, g, dtype=torch.float64).tolist()
    loss, acc = _grid(at, axis, axis)
    flat = lambda d: torch.cat([d[k].double().reshape(-1).cpu() for k in d1])  # noqa: E731
    basis = torch.stack([flat(d1), flat(d2)], 1)
    copies, states = [], [{k: v.detach().to(device) for k, v in m.state_dict().items()} for m in models]
    for m, st in zip(models, states):
        diff = flat({k: st[k] - base[k] for k in d1})
        coef = torch.linalg.lstsq(basis, diff.unsqueeze(1)).solution.flatten()
        on_plane = at(float(coef[0]), float(coef[1]))
        own = ev.evaluate(m.to(device))
        copies.append({"coords": [float(coef[0]), float(coef[1])], "residual": float((basis @ coef - diff).norm()),
                       "loss_on_plane": on_plane["loss"], "accuracy_on_plane": on_plane["accuracy"],
                       "loss": own["loss"], "accuracy": own["accuracy"]})
    k = len(states)
    dist = [[float(flat({n: states[i][n] - states[j][n] for n in d1}).norm()) for j in range(k)] for i in range(k)]
    return {"xs": axis, "ys": axis, "loss": loss, "accuracy": acc, "copies": copies, "distances": dist,
            "basis": "filter_normalized", "bn_mode": land_hp.bn_mode, "bn_recomputed": recompute,
            "eval_examples": ev.n, "grid": g, "wall_s": time.perf_counter() - t0}


def landscape(hp: ChainHparams, data: DataSplit, weights: dict[str, torch.Tensor], mask: Mask,
              land_hp: LandscapeHparams = LandscapeHparams(), device="cpu") -> dict:
    """Train one copy of `weights ⊙ mask` per seed in `land_hp.seeds` and map the loss in their plane.

    Copy i trains with `derive_seed(hp.seed, "landscape", seeds[i])` (data order and augmentation;
    `hp.seed` under either `seed_scope`, as for every training after pruning);
    returns `loss_landscape`'s data plus each copy's test metrics under `copies[i]["test_accuracy"]`.
    With `land_hp.stacked` the copies train as one stacked model (`prunelab.stacked`).
    """
    land_hp.validate()
    t0 = time.perf_counter()
    seeds = [derive_seed(hp.seed, "landscape", s) for s in land_hp.seeds]
    models, runs = train_subnetworks(hp, data, weights, mask, seeds, device=device, stacked=land_hp.stacked)
    metrics = [{"seed": int(s), "test_accuracy": m["test_accuracy"], "test_loss": m["test_loss"]}
               for s, m in zip(land_hp.seeds, runs)]
    train_s = time.perf_counter() - t0
    out = loss_landscape(models, data, land_hp, device, mask=mask)
    for c, m in zip(out["copies"], metrics):
        c.update(m)
    out.update(sparsity=mask.sparsity, train_s=train_s)
    return out
