"""Pruning data: the real training set or a synthetic set, as `pruning_data.kind` names.

kinds: `real`; `idc_file` (IDC's saved data.pt, decoded); `distilled` (built-in `method`: idc, dm);
`random_subset` and `herding` (coresets). Everything generated goes through the content-addressed
store (`store.py`), so a set is built once per (data set, method, ipc, factor, seed, budget) and
reused by every chain that asks for it.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..data import DataSplit, ImageData
from ..errors import ConfigError
from .distill import CORESETS, DEFAULT_BUDGETS, DISTILLERS, check_ipc, distill_dm, distill_idc, herding, random_subset
from .idc import decode, decode_set, decode_zoom, default_factor, formation_factor, load_idc_file
from .store import CorruptSyntheticSetError, SyntheticStore, make_key

METHODS = tuple(DISTILLERS)  # kind=distilled
SOURCES = METHODS + tuple(CORESETS)


def check_method(method) -> str:
    """ConfigError unless `method` names a built-in distiller."""
    if method not in DISTILLERS:
        raise ConfigError("pruning_data.method", f"unknown distillation method {method!r}",
                          "use one of " + ", ".join(METHODS))
    return method


def _factor(source: str, real: ImageData, factor: Optional[int]) -> int:
    # only IDC has multi-formation; the others ignore `factor`, so it is not part of their key
    return formation_factor(real.name, factor) if source == "idc" else 1


def build_synthetic(source: str, real: ImageData, *, ipc: int, seed: int = 0, budget: Optional[int] = None,
                    factor: Optional[int] = None, device="cpu", log: Optional[Callable[[str], None]] = None
                    ) -> ImageData:
    """Build (not store) the set of `source` (idc, dm, random_subset, herding); IDC's stays encoded."""
    if source == "idc":
        return distill_idc(real, ipc, seed, budget, device, log, factor=_factor(source, real, factor))
    if source in DISTILLERS:
        return DISTILLERS[source](real, ipc, seed, budget, device, log)
    if source in CORESETS:
        return CORESETS[source](real, ipc, seed, budget, device, log)
    raise ConfigError("pruning_data.method", f"unknown synthetic source {source!r}",
                      "use one of " + ", ".join(SOURCES))


def synthetic_spec(dataset_hp, source: str, real: ImageData, *, ipc: int, seed: int = 0,
                   budget: Optional[int] = None, factor: Optional[int] = None) -> dict:
    """The inputs that define a synthetic set (its store key is their hash)."""
    learned = source in DISTILLERS
    return {"dataset": dataset_hp.to_dict(), "method": source, "ipc": int(ipc),
            "factor": _factor(source, real, factor), "seed": int(seed),
            "budget": (budget or DEFAULT_BUDGETS[source]) if learned else None}


def get_synthetic(dataset_hp, real: ImageData, source: str, *, ipc: int, seed: int = 0,
                  budget: Optional[int] = None, factor: Optional[int] = None, device="cpu",
                  store: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
                  decoded: bool = True) -> ImageData:
    """The stored set for these inputs, built and stored first if absent (decoded unless told not)."""
    if source not in SOURCES:
        raise ConfigError("pruning_data.method", f"unknown synthetic source {source!r}",
                          "use one of " + ", ".join(SOURCES))
    f = _factor(source, real, factor)
    check_ipc(real, ipc, f)
    spec = synthetic_spec(dataset_hp, source, real, ipc=ipc, seed=seed, budget=budget, factor=factor)
    data = SyntheticStore(store).get_or_create(
        spec, real, lambda: build_synthetic(source, real, ipc=ipc, seed=seed, budget=budget, factor=f,
                                            device=device, log=log), log=log)
    return decode_set(data) if decoded else data


def load_pruning_data(hp, data: DataSplit, device) -> ImageData:
    """The set a chain trains on to find its mask (`hp` is the ChainHparams)."""
    pd = hp.pruning_data
    kind = pd.kind
    if kind == "real":
        return data.train
    if kind == "idc_file":
        return load_idc_file(pd.path, data.train, pd.factor, expected_ipc=pd.ipc)
    if kind == "distilled":
        source = check_method(pd.method)
    elif kind in CORESETS:
        source = kind
    else:
        raise ConfigError("pruning_data.kind", f"unknown kind {kind!r}",
                          "use real, idc_file, distilled, random_subset or herding")
    if pd.ipc is None:
        raise ConfigError("pruning_data.ipc", f"required for kind={kind!r}", "set pruning_data.ipc, e.g. 10")
    return get_synthetic(hp.dataset, data.train, source, ipc=pd.ipc, seed=pd.seed, budget=pd.budget,
                         factor=pd.factor, device=device, store=pd.store)


__all__ = ["CORESETS", "CorruptSyntheticSetError", "DISTILLERS", "METHODS", "SOURCES", "SyntheticStore",
           "build_synthetic", "check_method", "decode", "decode_set", "decode_zoom", "default_factor", "formation_factor",
           "distill_dm", "distill_idc", "get_synthetic", "herding", "load_idc_file", "load_pruning_data",
           "make_key", "random_subset", "synthetic_spec"]
