"""Masks at initialization: pruning-at-init baselines scored in one place and selected by `allocation.select`.

SOURCES maps each method's name to its scoring function `scores(model, mask, batch, *, seed=0)` ->
name -> score tensor (higher = keep; CPU, the weight's shape). DATA_FREE names the methods that need no
batch. `find_mask` is the one entry point.
"""

from __future__ import annotations

from torch import nn

from ..allocation import check_scope, select
from ..errors import ConfigError
from ..masks import Mask
from . import grasp, magnitude_init, random, snip, synflow
from ._common import require_batch

SOURCES = {"random": random.scores, "magnitude_init": magnitude_init.scores, "snip": snip.scores,
           "grasp": grasp.scores, "synflow": synflow.scores}
DATA_FREE = ("random", "magnitude_init", "synflow")


def find_mask(method: str, model: nn.Module, mask: Mask, target_remaining: int, *, scope: str = "global",
              batch=None, seed: int = 0, iterations: int = 100, input_shape=None,
              layer_counts=None) -> Mask:
    """A new mask keeping `target_remaining` of the weights `mask` keeps, chosen by `method`.

    One-shot methods score once and `select` with `scope`; "synflow" prunes iteratively over
    `iterations` steps and takes its input shape from `batch`'s x, else from `input_shape` = (C, H, W).
    `batch` = (x, y) on the model's device is required unless the method is in DATA_FREE. With scope
    "chain", `layer_counts` (name -> weights kept) is each layer's allocation.
    """
    if method not in SOURCES:
        raise ConfigError("pruning.method", f"unknown method {method!r}", "use one of " + ", ".join(SOURCES))
    check_scope(scope)
    if method not in DATA_FREE:
        require_batch(batch, method)
    if method == "synflow":
        return synflow.synflow_mask(model, mask, target_remaining, scope=scope, iterations=iterations,
                                    input_shape=synflow.input_shape_of(batch, input_shape), layer_counts=layer_counts)
    return select(SOURCES[method](model, mask, batch, seed=seed), mask, target_remaining, scope,
                  layer_counts=layer_counts)


__all__ = ["SOURCES", "DATA_FREE", "find_mask"]
