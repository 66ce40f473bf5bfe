"""Pruning data: the real training set or a synthetic set, as `pruning_data.kind` names."""

from __future__ import annotations

from ..data import DataSplit, ImageData
from ..errors import ConfigError


def load_pruning_data(hp, data: DataSplit, device) -> ImageData:
    """The set a chain trains on to find its mask (`hp` is the ChainHparams)."""
    kind = hp.pruning_data.kind
    if kind == "real":
        return data.train
    raise ConfigError("pruning_data.kind", f"{kind!r} is not available in this build", "use kind: real")
