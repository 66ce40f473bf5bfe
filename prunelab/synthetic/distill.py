"""Built-in synthetic sets: IDC-style gradient matching, distribution matching, and two coresets.

Every builder is `(real, ipc, seed, budget, device) -> ImageData` with float pixels, class-major
(ipc images of class 0, then class 1, ...), `real`'s normalization, and `meta` describing it. IDC's
result is *encoded*: meta['factor'] = f > 1 means each image still packs f x f images, decoded by
`prunelab.synthetic.idc.decode_set` (the store keeps sets encoded, as IDC saves them).

Learned sets start from random real images of each class (IDC's and DM's initialization) and are
deterministic on CPU for a fixed seed: networks, batches and augmentations all draw from seeded
generators.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..checkpoint import to_cpu
from ..data import ImageData
from ..data.dsa import dsa, dsa_siamese
from ..errors import ConfigError
from ..models import default_convnet_depth
from ..models.convnet import ConvNet
from ..seeds import derive_seed
from .idc import decode_zoom, formation_factor

Log = Optional[Callable[[str], None]]

# Outer iterations when `budget` is None. IDC runs 2,000 on CIFAR (hours on a GPU); these sizes fit
# 8x8 digits on a CPU core in seconds and still beat a random subset clearly.
DEFAULT_BUDGETS = {"idc": 30, "dm": 200}


def _pixels(real: ImageData) -> torch.Tensor:
    return real.pixels(real.x)


def _class_index(real: ImageData) -> list[torch.Tensor]:
    return [torch.nonzero(real.y.cpu() == c).flatten() for c in range(real.num_classes)]


def check_ipc(real: ImageData, ipc: int, factor: int = 1) -> None:
    """Every class must have the ipc * factor^2 real images a set is initialized from."""
    if ipc < 1:
        raise ConfigError("pruning_data.ipc", f"must be a positive integer, got {ipc}", "e.g. 10")
    need = ipc * factor * factor
    have = int(real.counts().min())
    if need > have:
        raise ConfigError("pruning_data.ipc", f"{ipc} images per class (x {factor * factor} formations) need "
                          f"{need} real images per class, the smallest class of {real.name} has {have}",
                          f"use ipc <= {have // (factor * factor)}")


def _net(real: ImageData, width: int, seed: int, device) -> ConvNet:
    c, h, _ = real.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ConvNet(c, h, real.num_classes, width=width, depth=default_convnet_depth(h))
    return net.to(device)


def _out(real: ImageData, x: torch.Tensor, y: torch.Tensor, method: str, ipc: int, **meta) -> ImageData:
    return real.with_images(x.detach().cpu().float().contiguous(), y.cpu().long(),
                            name=f"{real.name}-{method}-ipc{ipc}", meta={"method": method, "ipc": ipc, **meta})


def init_from_real(real: ImageData, ipc: int, gen: torch.Generator, factor: int = 1):
    """ipc images per class, each tiling factor x factor random real images of that class.

    factor 1 is plain random real images (DM, IDC 'random'); factor > 1 is IDC's 'mix' init: each
    real image is resized (nearest, as IDC) into one tile, the first H % factor rows/columns of tiles
    one pixel larger.
    """
    x = _pixels(real)
    _, c, h, w = x.shape
    xs, ys = [], []
    for k, idx in enumerate(_class_index(real)):
        pick = idx[torch.randperm(len(idx), generator=gen)[:ipc * factor * factor]]
        imgs = x[pick]
        if factor > 1:
            out = torch.empty(ipc, c, h, w)
            s, rem = h // factor, h % factor
            t, top = 0, 0
            for i in range(factor):
                hr = s + 1 if i < rem else s
                left = 0
                for j in range(factor):
                    wr = s + 1 if j < rem else s
                    out[:, :, top:top + hr, left:left + wr] = F.interpolate(imgs[t * ipc:(t + 1) * ipc], size=(hr, wr))
                    left += wr
                    t += 1
                top += hr
            imgs = out
        xs.append(imgs)
        ys.append(torch.full((ipc,), k, dtype=torch.long))
    return torch.cat(xs).float(), torch.cat(ys)


# ---------------------------------------------------------------------------------------------
# coresets


def random_subset(real: ImageData, ipc: int, seed: int, budget: Optional[int] = None, device="cpu",
                  log: Log = None) -> ImageData:
    """`ipc` random real images per class (seeded); `budget` is unused."""
    check_ipc(real, ipc)
    x, y = init_from_real(real, ipc, torch.Generator().manual_seed(derive_seed(seed, "random_subset")))
    return _out(real, x, y, "random_subset", ipc, factor=1)


@torch.no_grad()
def herding(real: ImageData, ipc: int, seed: int, budget: Optional[int] = None, device="cpu",
            log: Log = None, width: int = 128) -> ImageData:
    """Herding coreset (Welling 2009) per class in the feature space of a randomly initialized
    ConvNet-3 (seeded by `seed`, flattened features before the classifier).

    A random ConvNet's features keep image structure (DM matches in the same space) without a
    training run, and the seed then selects a different but equally principled coreset. Greedily
    adds the image that brings the running mean of selected features closest to the class mean.
    """
    check_ipc(real, ipc)
    device = torch.device(device)
    net = _net(real, width, derive_seed(seed, "herding", "net"), device).eval()
    x = _pixels(real)
    xs, ys = [], []
    for k, idx in enumerate(_class_index(real)):
        imgs = x[idx].to(device)
        feat = torch.cat([net.features(real.normalize(imgs[i:i + 512])).flatten(1)
                          for i in range(0, len(imgs), 512)]).double()
        mu = feat.mean(0)
        chosen: list[int] = []
        total = torch.zeros_like(mu)
        for t in range(ipc):
            dist = ((mu - (total + feat) / (t + 1)) ** 2).sum(1)
            if chosen:
                dist[chosen] = math.inf
            i = int(dist.argmin())
            chosen.append(i)
            total += feat[i]
        xs.append(imgs[chosen].cpu())
        ys.append(torch.full((ipc,), k, dtype=torch.long))
    return _out(real, torch.cat(xs), torch.cat(ys), "herding", ipc, factor=1, feature_space="random convnet3")


Checkpoint = Callable[[dict], None]


class Progress:
    """A distillation's state between outer iterations, for checkpoints: the images, their
    optimizer, both random generators and the next iteration. `checkpoint(payload)` is called at the
    end of an iteration at least `every_s` seconds after the last call (not after the last
    iteration); `resume(payload)` restores such a payload and returns the iteration to continue at,
    so a resumed distillation ends with the same images as one never interrupted (same device)."""

    def __init__(self, syn: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator,
                 aug_gen: torch.Generator, checkpoint: Optional[Checkpoint], every_s: float):
        self.syn, self.opt, self.gen, self.aug_gen = syn, opt, gen, aug_gen
        self.checkpoint, self.every_s = checkpoint, every_s
        self.saved_at = time.monotonic()

    def resume(self, payload: Optional[dict]) -> int:
        if payload is None:
            return 0
        with torch.no_grad():
            self.syn.copy_(payload["syn"])
        self.opt.load_state_dict(payload["opt"])
        self.gen.set_state(payload["gen"])
        self.aug_gen.set_state(payload["aug_gen"])
        return int(payload["next"])

    def done(self, it: int, budget: int) -> None:
        if self.checkpoint is None or it + 1 >= budget or time.monotonic() - self.saved_at < self.every_s:
            return
        self.checkpoint({"next": it + 1, "syn": to_cpu(self.syn), "opt": to_cpu(self.opt.state_dict()),
                         "gen": self.gen.get_state(), "aug_gen": self.aug_gen.get_state()})
        self.saved_at = time.monotonic()


# ---------------------------------------------------------------------------------------------
# IDC: gradient matching with multi-formation


def _grad_match_loss(net: ConvNet, xr, yr, xs, ys) -> torch.Tensor:
    """IDC's 'grad_mse': squared distance of the weight gradients (biases and norms skipped)."""
    params = [p for p in net.parameters() if p.ndim > 1]
    g_real = torch.autograd.grad(F.cross_entropy(net(xr), yr), params)
    g_syn = torch.autograd.grad(F.cross_entropy(net(xs), ys), params, create_graph=True)
    return sum(((a.detach() - b) ** 2).sum() for a, b in zip(g_real, g_syn))


def distill_idc(real: ImageData, ipc: int, seed: int, budget: Optional[int] = None, device="cpu",
                log: Log = None, *, factor: Optional[int] = None, inner_loop: int = 5, batch_real: int = 32,
                lr_img: float = 0.001, mom_img: float = 0.5, net_width: int = 32, net_steps: int = 4,
                net_lr: float = 0.01, resume: Optional[dict] = None, checkpoint: Optional[Checkpoint] = None,
                checkpoint_every_s: float = 0.0) -> ImageData:
    """IDC (Kim et al. 2022) at small scale; `budget` = outer iterations (default 30).

    Every outer iteration re-initializes the network and clamps the images to [0, 1]; then
    `inner_loop` times: for each class, a real batch of that class and the class's decoded synthetic
    images (ipc * f^2) get the same DSA transformation, the squared distance between their weight
    gradients is minimized by one SGD step on the stored images; after each inner step but the
    last, the network trains `net_steps` mini-batches on augmented real data (IDC's `n_data`).
    Returns the *encoded* set (meta['factor'] = f). Defaults are tuned for 8x8 digits on a CPU
    (ConvNet-3 width 32; IDC's CIFAR run: width 128, lr_img 0.005, 100 inner steps, 2,000 iterations,
    as `recipes.idc_settings` gives them); lr_img is small because the squared-gradient loss of tiny
    images has large pixel gradients. `checkpoint`/`resume`: as `Progress`.
    """
    f = formation_factor(real.name, factor)
    if f < 1:
        raise ConfigError("pruning_data.factor", f"must be >= 1, got {f}", "use 1, 2 or 3")
    check_ipc(real, ipc, f)
    budget = budget or DEFAULT_BUDGETS["idc"]
    device = torch.device(device)
    gen = torch.Generator().manual_seed(derive_seed(seed, "idc", "data"))
    aug_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "idc", "augment"))
    x0, y0 = init_from_real(real, ipc, gen, f)
    syn = x0.to(device).requires_grad_(True)
    y_syn = y0.to(device)
    opt_img = torch.optim.SGD([syn], lr=lr_img, momentum=mom_img)
    x_real, y_real = _pixels(real).to(device), real.y.to(device)
    by_class = [i.to(device) for i in _class_index(real)]
    k = real.num_classes
    progress = Progress(syn, opt_img, gen, aug_gen, checkpoint, checkpoint_every_s)
    for it in range(progress.resume(resume), budget):
        net = _net(real, net_width, derive_seed(seed, "idc", "net", it), device).train()
        opt_net = torch.optim.SGD(net.parameters(), lr=net_lr, momentum=0.9, weight_decay=5e-4)
        with torch.no_grad():
            syn.clamp_(0, 1)
        loss_sum = 0.0
        for ot in range(inner_loop):
            for c in range(k):
                idx = by_class[c]
                idx = idx[torch.randperm(len(idx), generator=gen)[:batch_real].to(device)]
                xs, ys = decode_zoom(syn[c * ipc:(c + 1) * ipc], y_syn[c * ipc:(c + 1) * ipc], f)
                # DSA on normalized images, as IDC
                xr_a, xs_a = dsa_siamese(real.normalize(x_real[idx]), real.normalize(xs), aug_gen)
                loss = _grad_match_loss(net, xr_a, y_real[idx], xs_a, ys)
                opt_img.zero_grad(set_to_none=True)
                loss.backward()
                opt_img.step()
                loss_sum += float(loss.detach())
            if ot < inner_loop - 1:
                for _ in range(net_steps):
                    idx = torch.randint(0, len(x_real), (batch_real,), generator=gen).to(device)
                    out = net(dsa(real.normalize(x_real[idx]), aug_gen))
                    opt_net.zero_grad(set_to_none=True)
                    F.cross_entropy(out, y_real[idx]).backward()
                    opt_net.step()
        if log and (it % max(1, budget // 10) == 0 or it == budget - 1):
            log(f"idc iteration {it + 1}/{budget}: matching loss {loss_sum / (inner_loop * k):.4f}")
        progress.done(it, budget)
    with torch.no_grad():
        syn.clamp_(0, 1)
    return _out(real, syn, y_syn, "idc", ipc, factor=f, budget=budget)


# ---------------------------------------------------------------------------------------------
# DM: distribution matching


def distill_dm(real: ImageData, ipc: int, seed: int, budget: Optional[int] = None, device="cpu",
               log: Log = None, *, batch_real: int = 64, lr_img: float = 0.5, mom_img: float = 0.5,
               net_width: int = 32, resume: Optional[dict] = None, checkpoint: Optional[Checkpoint] = None,
               checkpoint_every_s: float = 0.0) -> ImageData:
    """Distribution matching (Zhao & Bilen 2023); `budget` = iterations (default 200).

    Each iteration draws a fresh randomly initialized ConvNet-3 and, for every class, moves the
    synthetic images so the mean embedding (features before the classifier) of their DSA views
    matches that of a real batch under the same DSA transformation. `checkpoint`/`resume`: as `Progress`.
    """
    check_ipc(real, ipc)
    budget = budget or DEFAULT_BUDGETS["dm"]
    device = torch.device(device)
    gen = torch.Generator().manual_seed(derive_seed(seed, "dm", "data"))
    aug_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "dm", "augment"))
    x0, y0 = init_from_real(real, ipc, gen)
    syn = x0.to(device).requires_grad_(True)
    opt_img = torch.optim.SGD([syn], lr=lr_img, momentum=mom_img)
    x_real = _pixels(real).to(device)
    by_class = [i.to(device) for i in _class_index(real)]
    progress = Progress(syn, opt_img, gen, aug_gen, checkpoint, checkpoint_every_s)
    for it in range(progress.resume(resume), budget):
        net = _net(real, net_width, derive_seed(seed, "dm", "net", it), device).train()
        for p in net.parameters():
            p.requires_grad_(False)
        loss = torch.zeros((), device=device)
        for c, idx in enumerate(by_class):
            idx = idx[torch.randperm(len(idx), generator=gen)[:batch_real].to(device)]
            xr_a, xs_a = dsa_siamese(real.normalize(x_real[idx]), real.normalize(syn[c * ipc:(c + 1) * ipc]), aug_gen)
            er = net.features(xr_a).flatten(1).mean(0)
            es = net.features(xs_a).flatten(1).mean(0)
            loss = loss + ((er - es) ** 2).sum()
        opt_img.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()
        if log and (it % max(1, budget // 10) == 0 or it == budget - 1):
            log(f"dm iteration {it + 1}/{budget}: matching loss {float(loss.detach()) / len(by_class):.4f}")
        progress.done(it, budget)
    return _out(real, syn, y0, "dm", ipc, factor=1, budget=budget)


DISTILLERS = {"idc": distill_idc, "dm": distill_dm}
CORESETS = {"random_subset": random_subset, "herding": herding}

# PruningDataHparams fields passed to a distiller as keyword arguments when set (None: its default)
DISTILLER_SETTINGS = ("net_width", "inner_loop", "batch_real", "lr_img")
# taken from the functions themselves, not DISTILLERS, which tests and callers may wrap
# (the run controls resume/checkpoint are not settings)
RUN_CONTROLS = ("resume", "checkpoint", "checkpoint_every_s")
_DEFAULTS = {m: {k: v for k, v in fn.__kwdefaults__.items() if k not in RUN_CONTROLS} for m, fn in DISTILLERS.items()}
_ACCEPTS = {m: frozenset(d) for m, d in _DEFAULTS.items()}


def distiller_kwargs(method: str, **settings) -> dict:
    """The `settings` (DISTILLER_SETTINGS) that are set, as keyword arguments of `method`'s
    distiller; ConfigError for a setting that distiller does not have (DM has no inner loop)."""
    unknown = sorted(set(settings) - set(DISTILLER_SETTINGS))
    if unknown:
        raise TypeError(f"not a distiller setting: {', '.join(unknown)}")
    kw = {k: v for k, v in settings.items() if v is not None}
    for k in kw:
        if k not in _ACCEPTS[method]:
            others = [m for m, accepts in _ACCEPTS.items() if k in accepts]
            why = " (distribution matching has no inner loop: it matches once per iteration)" \
                if (method, k) == ("dm", "inner_loop") else ""
            fix = f"remove pruning_data.{k}" + (f" (it is for method: {', '.join(others)})" if others else "")
            raise ConfigError(f"pruning_data.{k}", f"method {method!r} has no {k} setting{why}", fix)
    return kw


def effective_settings(method: str, **settings) -> dict:
    """Every keyword setting `method`'s distiller runs with: its defaults, overridden by the
    `settings` that are set (checked as `distiller_kwargs` checks them)."""
    return {**_DEFAULTS[method], **distiller_kwargs(method, **settings)}
