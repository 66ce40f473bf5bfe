"""What is measured at a chain's evaluation rounds: real-data accuracy of the subnetwork, and (as a
figure needs) its linear mode connectivity, 2D loss landscape and Hessian.

`evaluate_round` returns plain data: flat `metrics` (names as in docs/results.md) plus the arrays
(curves, grids) a sweep stores as artifacts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .chain import derive_seed, train_subnetwork
from .data import DataSplit
from .hessian import HessianHparams, hessian_analysis
from .hparams import ChainHparams, Hparams, hp, require
from .landscape import LandscapeHparams, landscape
from .masks import Mask, rounds_for_sparsity
from .stability import LMCHparams, instability


@dataclass(frozen=True)
class EvalHparams(Hparams):
    sparsities: tuple[float, ...] = hp((), "evaluate at the rounds nearest these sparsities (e.g. 0.6, 0.87)")
    rounds: tuple[int, ...] = hp((), "evaluate at these rounds (added to those from sparsities)")
    every_round: bool = hp(False, "evaluate at every round from 0 to the last")
    lmc: bool = hp(True, "train two copies and measure linear mode connectivity")
    lmc_hparams: LMCHparams = hp(LMCHparams(), "interpolation settings")
    landscape: bool = hp(False, "train several copies and map the 2D loss landscape")
    landscape_hparams: LandscapeHparams = hp(LandscapeHparams(), "landscape settings")
    hessian: bool = hp(False, "Hessian diagonal statistics of a trained copy")
    hessian_hparams: HessianHparams = hp(HessianHparams(), "Hessian settings")

    def _validate(self, p):
        for i, s in enumerate(self.sparsities):
            require(0.0 <= s < 1.0, f"{p}sparsities[{i}]", f"must be in [0, 1), got {s}",
                    "give sparsities as fractions, e.g. 0.6 or 0.87")
        for i, r in enumerate(self.rounds):
            require(r >= 0, f"{p}rounds[{i}]", f"must be >= 0, got {r}")

    def resolve_rounds(self, chain: ChainHparams, path: str = "evaluation") -> list[int]:
        """The evaluation rounds for this chain, checked against its number of rounds.

        A chain started from another chain's mask (`start_from`, e.g. IMP from a synthetic
        subnetwork) has no masks before `start_round`: those rounds belong to the start chain and
        are left out (its first round is its starting subnetwork)."""
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
                   round: int, device="cpu") -> dict:
    """Train the subnetwork `weights ⊙ mask` on real data and measure what `ev` asks for.

    Returns {"metrics": flat floats, "lmc": curve data or None, "landscape": grid data or None,
    "hessian": stats or None, "wall_s": seconds}.
    """
    t0 = time.perf_counter()
    metrics: dict[str, float] = {"eval_sparsity": mask.sparsity}
    out = {"round": round, "lmc": None, "landscape": None, "hessian": None}
    trained = None
    if ev.lmc:
        res = instability(hp, data, weights, mask, ev.lmc_hparams, device)
        copies = res["copies"]
        metrics.update(test_accuracy=res["copy_test_accuracy"],
                       test_loss=sum(c["test_loss"] for c in copies) / len(copies),
                       train_loss=sum(c["train_loss"] for c in copies) / len(copies))
        for kind in ("mid", "max"):
            for k, v in res[f"barrier_{kind}"].items():
                metrics[f"barrier_{kind}_{k}"] = v
        out["lmc"] = {k: v for k, v in res.items() if k not in ("models",)}
    if ev.landscape:
        out["landscape"] = landscape(hp, data, weights, mask, ev.landscape_hparams, device)
    if ev.hessian or not ev.lmc:
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
    out["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out["wall_s"] = time.perf_counter() - t0
    return out


def result_key(ev: EvalHparams) -> str:
    """Hash naming one round's stored evaluation: the spec without the choice of rounds, so sweeps
    that evaluate different rounds with the same settings share results.

    The `stacked` switches count only when on (stacked copies equal one-by-one copies up to float
    rounding, not bit for bit): they are `hashed_at_default=False`, so evaluations stored before
    they existed are found."""
    return ev.replace(sparsities=(), rounds=(), every_round=False).hash()
