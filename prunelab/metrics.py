"""The names of a round's evaluation metrics, in one place: `evaluation.py` writes them, `analysis/`
reads them (this module imports nothing heavy, so the analysis side needs no torch).

    test_accuracy                                   the subnetwork's mean test accuracy (LMC copies)
    barrier_<mid|max>_<train|test>_<loss|error>     barriers in the primary BN mode (lmc_hparams.bn_mode)
    ..._bn_<interpolate|recompute>                  the same in a named BN mode (both are recorded)
    control_<shuffled|reinit>_<any name above>      the same for a control of the round's mask
    aligned_..., aligned_repair_...                 the pair after permutation alignment (+ REPAIR)
    spawn<k>_barrier_...                            the pair spawned after k epochs of shared training

Controls (`EvalHparams.controls`): `shuffled` keeps each layer's count of surviving weights and draws
their positions at random (is it *which* weights, or only how many per layer?); `reinit` keeps the
mask and draws a fresh initialization (does the mask only work with the weights it was found on?).
"""

from __future__ import annotations

from typing import Optional, Sequence

# curvature on the mask's subspace (evaluation.spectrum): the largest Hessian eigenvalue, the trace and
# the trace per unpruned weight (the mean eigenvalue)
SPECTRUM_TOP, SPECTRUM_TRACE, SPECTRUM_TRACE_PER_WEIGHT = ("spectrum_top_eigenvalue", "spectrum_trace",
                                                           "spectrum_trace_per_weight")
BN_MODES = ("interpolate", "recompute")
PRIMARY_BN_PARAM = "eval.bn_mode"  # the run param naming the BN mode of the plain barrier names
CONTROLS = ("shuffled", "reinit")
# the same pair measured after permutation alignment (lmc_hparams.align): weight matching with the mask
# permuted along (both BN modes), and aligned + REPAIR (one measurement: REPAIR sets the statistics)
FLAVOURS = ("aligned", "aligned_repair", "previous_round")
# previous_round (lmc_hparams.previous_round): copy A of the round's subnetwork against a copy of the
# previous round's subnetwork trained with the same data order: the barrier between consecutive rounds'
# solutions (both BN modes)
SPLITS = ("train", "test")
MEASURES = ("loss", "error")
KINDS = ("mid", "max")


def barrier_name(kind: str = "mid", split: str = "train", measure: str = "loss", bn_mode: Optional[str] = None,
                 control: Optional[str] = None, flavour: Optional[str] = None) -> str:
    """e.g. `barrier_mid_train_loss`, `barrier_mid_test_error_bn_recompute`,
    `control_shuffled_barrier_mid_train_loss_bn_interpolate`, `aligned_barrier_mid_train_loss`,
    `aligned_repair_barrier_mid_train_loss` (a `flavour` of FLAVOURS)."""
    name = f"barrier_{kind}_{split}_{measure}" + (f"_bn_{bn_mode}" if bn_mode else "")
    return with_control(f"{flavour}_{name}" if flavour else name, control)


def spawn_name(k: int, name: str) -> str:
    """`name` (a barrier) of the pair spawned after k epochs of shared training
    (lmc_hparams.spawn_epochs): `spawn<k>_<name>`, e.g. `spawn2_barrier_mid_train_loss`."""
    return f"spawn{k}_{name}"


def accuracy_name(control: Optional[str] = None) -> str:
    """`test_accuracy`, or `control_<name>_test_accuracy`."""
    return with_control("test_accuracy", control)


def with_control(name: str, control: Optional[str]) -> str:
    """`name` as measured on `control` (unchanged for the mask itself)."""
    return f"control_{control}_{name}" if control else name


def other_bn_mode(mode: str) -> str:
    """The BN mode that is not `mode`."""
    return next(m for m in BN_MODES if m != mode)


def barrier_flavour(spec: str) -> tuple[Optional[str], str]:
    """`aligned_repair_train_loss` -> ("aligned_repair", "train_loss"); a spec without one -> (None, spec)."""
    for f in sorted(FLAVOURS, key=len, reverse=True):
        if spec.startswith(f + "_"):
            return f, spec[len(f) + 1:]
    return None, spec


def parse_barrier(spec: str) -> tuple[str, str, str]:
    """`train_loss` / `test_error` / `mid_train_loss` (after a flavour, see `barrier_flavour`) ->
    (kind, split, measure); ValueError if unknown."""
    spec = barrier_flavour(spec)[1]
    parts = spec.split("_")
    if len(parts) == 2:
        parts = ["mid"] + parts
    if len(parts) != 3 or parts[0] not in KINDS or parts[1] not in SPLITS or parts[2] not in MEASURES:
        raise ValueError(f"unknown barrier {spec!r}: use [aligned_|aligned_repair_][mid_|max_]<train|test>_<loss|error>, "
                         "e.g. train_loss")
    return parts[0], parts[1], parts[2]


def barriers(alphas: Sequence[float], values: Sequence[float]) -> dict:
    """Both barrier definitions for one curve of `values` at `alphas` (which include 0.5):
    `mid` (the paper, Fig. 6) is the value at α = 0.5 minus the mean of the endpoint values; `max`
    (Frankle et al. 2020) is the largest value above the straight line between the endpoints."""
    alphas = [float(a) for a in alphas]
    values = [float(v) for v in values]
    v0, v1 = values[0], values[-1]
    mid = values[alphas.index(0.5)] - 0.5 * (v0 + v1)
    mx = max(v - ((1 - a) * v0 + a * v1) for a, v in zip(alphas, values))
    return {"mid": float(mid), "max": float(mx)}
