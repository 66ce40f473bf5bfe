"""What is measured at a chain's evaluation rounds: real-data accuracy of the subnetwork, and (as a
figure needs) its linear mode connectivity, 2D loss landscape and Hessian.

`evaluate_round` returns plain data: flat `metrics` (names in `prunelab.metrics` and docs/results.md)
plus the arrays (curves, grids) a sweep stores as artifacts.

Controls (`controls`): the same LMC measurement (same data orders, both BN modes) on a random mask
with the round mask's per-layer counts (`shuffled`) and on the round's mask over a fresh random
initialization (`reinit`), so a figure can tell whether stability comes from per-layer density,
from which weights are kept, or from the pairing of mask and initialization.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Optional

from .chain import train_subnetwork
from .data import DataSplit
from .hessian import HessianHparams, hessian_analysis
from .hparams import ChainHparams, Hparams, hp, require
from .landscape import LandscapeHparams, landscape
from .masks import Mask, rounds_for_sparsity, shuffle_layerwise
from .align import aligned_curves
from .metrics import (CONTROLS, FLAVOURS, KINDS, SPECTRUM_TOP, SPECTRUM_TRACE, SPECTRUM_TRACE_PER_WEIGHT, accuracy_name,
                      barrier_name, spawn_name, with_control)
from .models import build_model
from .seeds import derive_seed, mask_seed
from .spectrum import SpectrumHparams, spectrum_analysis
from .stability import LMCHparams, instability, previous_round_curves, spawned_instability


@dataclass(frozen=True)
class EvalHparams(Hparams):
    sparsities: tuple[float, ...] = hp((), "evaluate at the rounds nearest these sparsities (e.g. 0.6, 0.87)")
    rounds: tuple[int, ...] = hp((), "evaluate at these rounds (added to those from sparsities)")
    every_round: bool = hp(False, "evaluate at every round from 0 to the last")
    lmc: bool = hp(True, "train two copies and measure linear mode connectivity")
    lmc_hparams: LMCHparams = hp(LMCHparams(), "interpolation settings")
    controls: tuple[str, ...] = hp((), "LMC controls of each evaluated mask: shuffled (random mask, same "
                                       "per-layer counts), reinit (same mask, fresh initialization)",
                                   hashed_at_default=False)
    landscape: bool = hp(False, "train several copies and map the 2D loss landscape")
    landscape_hparams: LandscapeHparams = hp(LandscapeHparams(), "landscape settings")
    hessian: bool = hp(False, "Hessian diagonal statistics of a trained copy")
    hessian_hparams: HessianHparams = hp(HessianHparams(), "Hessian settings")
    spectrum: Optional[SpectrumHparams] = hp(
        None, "curvature on the mask's subspace of a trained copy: top-k Hessian eigenvalues (Lanczos), trace "
              "(Hutch++), eigenvalue density (stochastic Lanczos quadrature); its settings, {} for the defaults",
        hashed_at_default=False)
    masks_every_round: bool = hp(False, "log every round's mask to MLflow (mask anatomy across rounds), not only "
                                        "the evaluated rounds'; nothing is measured differently",
                                 hashed_at_default=False)

    def _validate(self, p):
        for i, s in enumerate(self.sparsities):
            require(0.0 <= s < 1.0, f"{p}sparsities[{i}]", f"must be in [0, 1), got {s}",
                    "give sparsities as fractions, e.g. 0.6 or 0.87")
        for i, r in enumerate(self.rounds):
            require(r >= 0, f"{p}rounds[{i}]", f"must be >= 0, got {r}")
        for i, c in enumerate(self.controls):
            require(c in CONTROLS, f"{p}controls[{i}]", f"unknown control {c!r}", "use " + " and/or ".join(CONTROLS))
        require(len(set(self.controls)) == len(self.controls), p + "controls", "contains duplicates")
        require(self.lmc or not self.controls, p + "controls", "controls are LMC measurements",
                "set evaluation.lmc: true, or drop the controls")

    def resolve_rounds(self, chain: ChainHparams, path: str = "evaluation") -> list[int]:
        """The evaluation rounds for this chain, checked against its number of rounds.

        A chain started from another chain's mask (`start_from`, e.g. IMP from a synthetic
        subnetwork) has no masks before `start_round`: those rounds belong to the start chain and
        are left out (its first round is its starting subnetwork)."""
        late = [k for k in self.lmc_hparams.spawn_epochs if k >= chain.training.epochs - chain.pruning.rewind_epoch]
        require(not self.lmc or not late, path + ".lmc_hparams.spawn_epochs",
                f"spawn epochs {late} leave the copies no training ({chain.training.epochs} epochs, "
                f"from epoch {chain.pruning.rewind_epoch})", "spawn earlier, or train longer")
        f = chain.pruning.fraction
        if chain.pruning.rounds == 0:
            return [0]  # a dense chain (e.g. Figure 5's dense network): its only subnetwork
        first = chain.start_round if chain.start_from is not None else 0
        if self.every_round:
            return list(range(first, chain.pruning.rounds + 1))
        rounds = set(self.rounds) | {rounds_for_sparsity(s, f) for s in self.sparsities}
        rounds = {r for r in rounds if r >= first}
        too_far = sorted(r for r in rounds if r > chain.pruning.rounds)
        require(not too_far, path, f"needs rounds {too_far} but the chain stops at round {chain.pruning.rounds} "
                f"(sparsity {1 - (1 - f) ** chain.pruning.rounds:.1%})",
                f"raise pruning.rounds to at least {max(too_far) if too_far else 0} or lower the sparsities")
        return sorted(rounds)


def evaluate_round(hp: ChainHparams, ev: EvalHparams, data: DataSplit, weights: dict, mask: Mask,
                   round: int, device="cpu", previous_mask: Optional[Mask] = None) -> dict:
    """Train the subnetwork `weights ⊙ mask` on real data and measure what `ev` asks for.

    Returns {"metrics": flat floats, "lmc": curve data or None, "landscape": grid data or None,
    "hessian": stats or None, "wall_s": seconds}.
    """
    t0 = time.perf_counter()
    metrics: dict[str, float] = {"eval_sparsity": mask.sparsity}
    out = {"round": round, "lmc": None, "landscape": None, "hessian": None, "spectrum": None}
    trained = None
    if ev.lmc:
        res = _instability(hp, data, weights, mask, ev.lmc_hparams, device, previous_mask)
        copies = res["copies"]
        metrics.update(test_loss=sum(c["test_loss"] for c in copies) / len(copies),
                       train_loss=sum(c["train_loss"] for c in copies) / len(copies))
        metrics.update(lmc_metrics(res))
        out["lmc"] = {k: v for k, v in res.items() if k not in ("models",)}
        controls = {}
        for name in ev.controls:
            w, m = control_subnetwork(hp, data, weights, mask, name)
            c = _instability(hp, data, w, m, ev.lmc_hparams, device)  # a control has no previous round
            metrics.update(lmc_metrics(c, control=name))
            controls[name] = {k: v for k, v in c.items() if k not in ("models",)}
        if controls:
            out["lmc"]["controls"] = controls
    if ev.landscape:
        out["landscape"] = landscape(hp, data, weights, mask, ev.landscape_hparams, device)
    if ev.hessian or ev.spectrum is not None or not ev.lmc:
        model, m = train_subnetwork(hp, data, weights, mask, device=device,
                                    seed=derive_seed(hp.seed, "evaluate"))
        if not ev.lmc:
            metrics.update(test_accuracy=m["test_accuracy"], test_loss=m["test_loss"], train_loss=m["train_loss"])
        trained = model
    if ev.hessian:
        h = hessian_analysis(trained, data, ev.hessian_hparams, device, mask=mask)
        out["hessian"] = h
        names = {"mean_abs": "abs_mean"}  # docs/results.md names
        for k, v in h["stats"].items():
            metrics[f"hessian_{names.get(k, k)}"] = v
        if h.get("top_eigenvalue") is not None:
            metrics["hessian_top_eigenvalue"] = h["top_eigenvalue"]
    if ev.spectrum is not None:
        sp = spectrum_analysis(trained, data, ev.spectrum, device, mask=mask)
        out["spectrum"] = sp
        metrics.update(spectrum_metrics(sp))
    out["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out["wall_s"] = time.perf_counter() - t0
    return out


def _instability(hp: ChainHparams, data: DataSplit, weights: dict, mask: Mask, lmc_hp, device,
                 previous_mask: Optional[Mask] = None) -> dict:
    """`stability.instability`; with `lmc_hp.align` the same pair after alignment (`align.aligned_curves`),
    with `lmc_hp.previous_round` copy A against the previous round's solution, with `spawn_epochs` the
    pairs spawned later."""
    previous = lmc_hp.previous_round and previous_mask is not None
    res = instability(hp, data, weights, mask, lmc_hp, device, keep_models=lmc_hp.align or previous)
    models = res.pop("models", None)
    if lmc_hp.align:
        res.update(aligned_curves(*models, data, lmc_hp, device, mask))
    if previous:
        res["previous_round"] = previous_round_curves(hp, data, weights, models[0], previous_mask, lmc_hp, device)
    if lmc_hp.spawn_epochs:
        res["spawn"] = {str(k): spawned_instability(hp, data, weights, mask, k, lmc_hp, device)
                        for k in sorted(lmc_hp.spawn_epochs)}
    return res


def spectrum_metrics(res: dict) -> dict[str, float]:
    """The flat metrics of a `spectrum_analysis` result (names in `prunelab.metrics`)."""
    out = {SPECTRUM_TRACE: res["trace"], SPECTRUM_TRACE_PER_WEIGHT: res["trace_per_weight"]}
    if res["top_eigenvalues"]:
        out[SPECTRUM_TOP] = res["top_eigenvalues"][0]
    return out


def lmc_metrics(res: dict, control: str | None = None) -> dict[str, float]:
    """The flat metrics of an `instability` result: mean test accuracy of the copies, and every
    barrier in the primary BN mode (plain names) and in each recorded mode (`_bn_<mode>`)."""
    out = {accuracy_name(control): res["copy_test_accuracy"]}
    for kind in KINDS:
        for k, v in res[f"barrier_{kind}"].items():
            out[with_control(f"barrier_{kind}_{k}", control)] = v
    for mode, r in res.get("by_bn_mode", {}).items():
        for kind in KINDS:
            for k, v in r[f"barrier_{kind}"].items():
                split, measure = k.split("_")
                out[barrier_name(kind, split, measure, mode, control)] = v
    for k, r in res.get("spawn", {}).items():  # control_<name>_spawn<k>_barrier_..., as the other flavours
        out.update({with_control(spawn_name(int(k), n), control): v for n, v in lmc_metrics(r).items()
                    if "barrier" in n})
    for flavour in FLAVOURS:
        f = res.get(flavour)
        if not f:
            continue
        for kind in KINDS:
            for k, v in f[f"barrier_{kind}"].items():
                split, measure = k.split("_")
                out[barrier_name(kind, split, measure, None, control, flavour)] = v
            for mode, r in f.get("by_bn_mode", {}).items():
                for k, v in r[f"barrier_{kind}"].items():
                    split, measure = k.split("_")
                    out[barrier_name(kind, split, measure, mode, control, flavour)] = v
    return out


def control_subnetwork(hp: ChainHparams, data: DataSplit, weights: dict, mask: Mask, control: str
                       ) -> tuple[dict, Mask]:
    """(weights, mask) of a control of the subnetwork `weights ⊙ mask` (see the module docstring).

    Both are seeded from the seed that found the mask (`prunelab.chain.mask_seed`), so a control is as
    reproducible as the chain: `shuffled` keeps `weights` and draws a mask with the same per-layer
    counts; `reinit` keeps the mask and draws a fresh initialization of the same architecture. With
    `seed_scope: training` that seed is 0 whatever `seed` is, so chains that share a mask share its
    controls too (comparable across seeds); only the controls' LMC trainings vary with `seed`, as the
    mask's own do. For a chain rewound to epoch k > 0 the fresh initialization takes the rewind
    point's place, so it trains the rest of the schedule only (from step k·steps-per-epoch, at that
    point's learning rate), as the mask's own copies do."""
    seed = mask_seed(hp)
    if control == "shuffled":
        return weights, shuffle_layerwise(mask, derive_seed(seed, "control", "shuffled", mask.remaining))
    if control == "reinit":
        model = build_model(hp.model, data.train.shape, data.train.num_classes,
                            seed=derive_seed(seed, "control", "reinit"))
        return {k: v.detach() for k, v in model.state_dict().items()}, mask
    raise ValueError(f"unknown control {control!r}")


def result_key(ev: EvalHparams) -> str:
    """Hash naming one round's stored evaluation: the spec without the choice of rounds, so sweeps
    that evaluate different rounds with the same settings share results.

    The `stacked` switches count only when on (stacked copies equal one-by-one copies up to float
    rounding, not bit for bit): they are `hashed_at_default=False`, so evaluations stored before
    they existed are found. The controls count as a set (their order changes nothing measured).
    An LMC evaluation that records both BN modes (the default) gets a key of its own: one stored
    before both modes were recorded holds one mode and is not this result (evaluations without LMC
    keep their keys; `both_bn_modes: false` is a new key too, as the field is then hashed)."""
    core = ev.replace(sparsities=(), rounds=(), every_round=False, controls=tuple(sorted(ev.controls)),
                      masks_every_round=False)
    if ev.lmc and ev.lmc_hparams.both_bn_modes:
        return hashlib.sha256((core.canonical_json() + "|lmc-both-bn-modes").encode()).hexdigest()[:16]
    return core.hash()
