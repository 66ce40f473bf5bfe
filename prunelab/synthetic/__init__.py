"""Pruning data: the real training set or a synthetic set, as `pruning_data.kind` names.

kinds: `real`; `idc_file` (IDC's saved data.pt, decoded); `distilled` (built-in `method`: idc, dm);
`random_subset` and `herding` (coresets). Everything generated goes through the content-addressed
store (`store.py`), so a set is built once per (data set, method, ipc, factor, seed, budget, and the
distiller settings net_width, inner_loop, batch_real, lr_img where set) and reused by every chain
that asks for it. The distiller settings apply to kind=distilled only; coresets ignore them (as all
but IDC ignore `factor`).
"""

from __future__ import annotations

from typing import Callable, Optional

from ..checkpoint import CHECKPOINT_EVERY_S
from ..data import DataSplit, ImageData
from ..errors import ConfigError
from ..hparams import data_fingerprint
from .distill import (CORESETS, DEFAULT_BUDGETS, DISTILLER_SETTINGS, DISTILLERS, check_ipc, distill_dm, distill_idc,
                      distiller_kwargs, effective_settings, herding, random_subset)
from .idc import decode, decode_set, decode_zoom, default_factor, formation_factor, load_idc_file
from .recipes import idc_net_steps, idc_settings
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


def _settings(source: str, settings: dict) -> dict:
    # a distiller's keyword arguments (ConfigError for one it lacks); coresets take none
    return distiller_kwargs(source, **settings) if source in DISTILLERS else {}


def build_synthetic(source: str, real: ImageData, *, ipc: int, seed: int = 0, budget: Optional[int] = None,
                    factor: Optional[int] = None, device="cpu", log: Optional[Callable[[str], None]] = None,
                    net_width: Optional[int] = None, inner_loop: Optional[int] = None,
                    batch_real: Optional[int] = None, lr_img: Optional[float] = None,
                    resume: Optional[dict] = None, checkpoint: Optional[Callable[[dict], None]] = None,
                    checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> ImageData:
    """Build (not store) the set of `source` (idc, dm, random_subset, herding); IDC's stays encoded.

    net_width, inner_loop, batch_real, lr_img: the distiller's settings where not None (coresets
    ignore them; dm has no inner_loop: ConfigError). A distiller stores its state part-way through
    `checkpoint` every `checkpoint_every_s` seconds and continues from `resume` (`distill.Progress`)."""
    if source in DISTILLERS:
        kw = _settings(source, dict(net_width=net_width, inner_loop=inner_loop, batch_real=batch_real, lr_img=lr_img))
        if source == "idc":
            kw["factor"] = _factor(source, real, factor)
        return DISTILLERS[source](real, ipc, seed, budget, device, log, resume=resume, checkpoint=checkpoint,
                                  checkpoint_every_s=checkpoint_every_s, **kw)
    if source in CORESETS:
        return CORESETS[source](real, ipc, seed, budget, device, log)
    raise ConfigError("pruning_data.method", f"unknown synthetic source {source!r}",
                      "use one of " + ", ".join(SOURCES))


def synthetic_spec(dataset_hp, source: str, real: ImageData, *, ipc: int, seed: int = 0,
                   budget: Optional[int] = None, factor: Optional[int] = None, net_width: Optional[int] = None,
                   inner_loop: Optional[int] = None, batch_real: Optional[int] = None,
                   lr_img: Optional[float] = None, legacy: bool = False) -> dict:
    """The inputs that define a synthetic set (its store key is their hash).

    Distiller settings enter only where set, so the keys of sets built at the defaults stay as they were.
    A data root enters by its files' fingerprint; `legacy` gives the spec as it was when it held the
    root's path (such stored sets are adopted under the new key)."""
    learned = source in DISTILLERS
    settings = _settings(source, dict(net_width=net_width, inner_loop=inner_loop, batch_real=batch_real, lr_img=lr_img))
    dataset, where = dataset_hp.to_dict(), {}
    if dataset_hp.root is not None and not legacy:  # the data's content, not where it lies
        dataset["root"] = None
        where = {"data_fingerprint": data_fingerprint(dataset_hp)}
    return {"dataset": dataset, "method": source, "ipc": int(ipc),
            "factor": _factor(source, real, factor), "seed": int(seed),
            "budget": (budget or DEFAULT_BUDGETS[source]) if learned else None, **settings, **where}


def get_synthetic(dataset_hp, real: ImageData, source: str, *, ipc: int, seed: int = 0,
                  budget: Optional[int] = None, factor: Optional[int] = None, device="cpu",
                  store: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
                  decoded: bool = True, net_width: Optional[int] = None, inner_loop: Optional[int] = None,
                  batch_real: Optional[int] = None, lr_img: Optional[float] = None,
                  checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> ImageData:
    """The stored set for these inputs, built and stored first if absent (decoded unless told not).
    A distillation stores its state every `checkpoint_every_s` seconds; one killed part-way continues
    from there the next time the set is asked for."""
    if source not in SOURCES:
        raise ConfigError("pruning_data.method", f"unknown synthetic source {source!r}",
                          "use one of " + ", ".join(SOURCES))
    settings = dict(net_width=net_width, inner_loop=inner_loop, batch_real=batch_real, lr_img=lr_img)
    f = _factor(source, real, factor)
    check_ipc(real, ipc, f)
    spec = synthetic_spec(dataset_hp, source, real, ipc=ipc, seed=seed, budget=budget, factor=factor, **settings)
    aliases = [synthetic_spec(dataset_hp, source, real, ipc=ipc, seed=seed, budget=budget, factor=factor,
                              legacy=True, **settings)] if dataset_hp.root is not None else []
    data = SyntheticStore(store).get_or_create(
        spec, real, lambda **run: build_synthetic(source, real, ipc=ipc, seed=seed, budget=budget, factor=f,
                                                  device=device, log=log, checkpoint_every_s=checkpoint_every_s,
                                                  **settings, **run), log=log, resumable=True,
        aliases=aliases)
    return decode_set(data) if decoded else data


def distiller_settings(pd) -> dict:
    """`pd`'s (PruningDataHparams) distiller settings, None where unset."""
    return {k: getattr(pd, k) for k in DISTILLER_SETTINGS}


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
                         factor=pd.factor, device=device, store=pd.store, log=_say, **distiller_settings(pd))


def _say(message: str) -> None:
    """A distillation's progress, on stdout (a sweep's trial log, or the terminal of `prunelab run`)."""
    print(f"prunelab: {message}", flush=True)


__all__ = ["CORESETS", "CorruptSyntheticSetError", "DISTILLER_SETTINGS", "DISTILLERS", "METHODS", "SOURCES",
           "SyntheticStore", "build_synthetic", "check_method", "decode", "decode_set", "decode_zoom",
           "default_factor", "distill_dm", "distill_idc", "distiller_kwargs", "distiller_settings",
           "formation_factor", "get_synthetic", "herding", "idc_net_steps", "idc_settings", "load_idc_file",
           "load_pruning_data", "make_key", "random_subset", "synthetic_spec"]
