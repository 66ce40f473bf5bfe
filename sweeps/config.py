"""Sweep configs: YAML presets -> typed, validated SweepHparams -> the list of trials (one per chain).

Everything here runs before Ray starts, so a bad config costs no compute.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import string
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Optional

import yaml

from prunelab.checkpoint import CHECKPOINT_EVERY_S
from prunelab.cost import chain_cost
from prunelab.errors import ConfigError
from prunelab.evaluation import EvalHparams, result_key
from prunelab.hparams import ChainHparams, Hparams, hp, require, set_path
from prunelab.store import ChainStore

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# short names accepted by --set for the common grid axes
AXIS_ALIASES = {"model": "model.name", "dataset": "dataset.name", "seeds": "seed", "ipc": "pruning_data.ipc",
                "root": "dataset.root"}
SWEEP_KEYS = ("base", "grid", "variants", "evaluation", "resources", "experiment", "paths")


@dataclass(frozen=True)
class VariantHparams(Hparams):
    name: str = hp("imp", "label of this kind of chain (imp, distilled, random_subset, ...)")
    set: dict = hp({}, "chain config values that make this variant (nested mapping)")
    grid: dict = hp({}, "extra grid axes for this variant only (dotted key -> list)")
    zip: dict = hp({}, "axes that vary together, one value of each per chain (dotted key -> list, equal "
                       "lengths), e.g. ipc with the learning rate of its images")
    start_from: Optional[str] = hp(None, "start from the mask of this other variant (same grid point)")
    start_round: int = hp(0, "round of that variant's mask to start from")
    allocation_from: Optional[str] = hp(None, "take each layer's count of kept weights, round by round, from this "
                                              "other variant's chain at the same grid point (set pruning.scope: "
                                              "chain), e.g. SNIP with IMP's per-layer densities")
    resources: dict = hp({}, "this variant's chains' own cpus_per_trial / gpus_per_trial / memory_fraction "
                             "(e.g. gpus_per_trial: 0.25 packs small-batch distilled chains four to a GPU)")

    def _validate(self, p):
        require(bool(self.name), p + "name", "must not be empty")
        lengths = {k: len(v) if isinstance(v, (list, tuple)) else -1 for k, v in self.zip.items()}
        for k, n in lengths.items():
            require(n > 0, f"{p}zip.{k}", "must be a non-empty list", f"write e.g. {k}: [value1, value2]")
        require(len(set(lengths.values())) <= 1, p + "zip", f"lists of different lengths: {lengths}",
                "give every zipped axis one value per chain")
        clash = sorted(set(self.zip) & set(self.grid))
        require(not clash, f"{p}zip.{clash[0] if clash else ''}", "is also a grid axis", "put it in one of the two")
        require(self.start_from is None or self.start_round >= 1, p + "start_round",
                "must be >= 1 with start_from", "e.g. 8 for the paper's 83% synthetic subnetwork")


PER_VARIANT_RESOURCES = ("cpus_per_trial", "gpus_per_trial", "memory_fraction", "workers_per_trial",
                         "split_copies")


@dataclass(frozen=True)
class ResourcesHparams(Hparams):
    cpus_per_trial: float = hp(1.0, "CPUs reserved per chain")
    gpus_per_trial: float = hp(0.0, "GPUs per chain; a fraction (0.25) packs chains on one GPU")
    memory_fraction: Optional[float] = hp(None, "cap of GPU memory per chain (default: gpus_per_trial)")
    workers_per_trial: int = hp(1, "data-parallel workers per chain (Ray Train), each with cpus_per_trial CPUs "
                                   "and, with gpus_per_trial: 1, a GPU of its own; the global batch is split")
    split_copies: bool = hp(True, "with several workers, train independent copies (an LMC pair) at once on parts of "
                                  "the workers, each at the full global batch on fewer workers (more memory a "
                                  "worker); false: one after the other on all of them")
    max_concurrent: int = hp(0, "most chains at once (0: as many as resources allow)")
    max_failures: int = hp(2, "retries of a failed chain, each from its last checkpoint")
    checkpoint_minutes: float = hp(CHECKPOINT_EVERY_S / 60, "store a round's training state part-way this often (0: every epoch), "
                                         "so a retried chain loses at most this much of a round",
                                   hashed_at_default=False)

    def _validate(self, p):
        require(self.cpus_per_trial > 0, p + "cpus_per_trial", f"must be positive, got {self.cpus_per_trial}")
        g = self.gpus_per_trial
        require(g >= 0, p + "gpus_per_trial", f"must be >= 0, got {g}")
        if 0 < g < 1:
            require(abs(1 / g - round(1 / g)) < 1e-6, p + "gpus_per_trial",
                    f"{g} does not divide one GPU evenly", "use 1/n: 0.5, 0.25, 0.2, 0.125, ...")
        elif g >= 1:
            require(float(g).is_integer(), p + "gpus_per_trial", f"must be a whole number above 1, got {g}")
        m = self.memory_fraction
        require(m is None or 0 < m <= 1, p + "memory_fraction", f"must be in (0, 1], got {m}")
        n = self.workers_per_trial
        require(n >= 1, p + "workers_per_trial", f"must be >= 1, got {n}")
        require(n == 1 or g in (0, 1), p + "gpus_per_trial", f"{g:g} with workers_per_trial: {n}: each "
                "data-parallel worker holds one whole GPU", "use gpus_per_trial: 1 (or 0 on CPUs)")
        require(self.max_concurrent >= 0, p + "max_concurrent", "must be >= 0")
        require(self.max_failures >= 0, p + "max_failures", "must be >= 0")
        require(self.checkpoint_minutes >= 0, p + "checkpoint_minutes", f"must be >= 0, got {self.checkpoint_minutes}",
                "e.g. 10 (minutes), or 0 for every epoch")


@dataclass(frozen=True)
class SweepHparams(Hparams):
    experiment: str = hp("", "MLflow experiment (default prunelab-<figure>)")
    paths: dict = hp({}, "named roots filling {name} in pruning_data.path (e.g. idc: /abs/idc for IDC's files)")
    base: dict = hp({}, "chain config shared by every trial (ChainHparams as a nested mapping)")
    grid: dict = hp({}, "grid axes: dotted chain key -> list of values (cartesian product)")
    variants: tuple[VariantHparams, ...] = hp((VariantHparams(),), "kinds of chain compared")
    evaluation: EvalHparams = hp(EvalHparams(), "what is measured at the evaluation rounds")
    resources: ResourcesHparams = hp(ResourcesHparams(), "Ray resources per chain")

    def _validate(self, p):
        for k, v in self.grid.items():
            require(isinstance(v, (list, tuple)) and len(v) > 0, f"{p}grid.{k}", f"must be a non-empty list, got {v!r}",
                    f"write e.g. {k}: [value1, value2]")
        names = [v.name for v in self.variants]
        require(len(set(names)) == len(names), p + "variants", f"variant names repeat: {names}", "name each variant once")
        for i, v in enumerate(self.variants):
            require(v.start_from is None or v.start_from in names, f"{p}variants[{i}].start_from",
                    f"no variant named {v.start_from!r}", "use one of " + ", ".join(names))
            require(v.allocation_from is None or v.allocation_from in names, f"{p}variants[{i}].allocation_from",
                    f"no variant named {v.allocation_from!r}", "use one of " + ", ".join(names))
            for dependency in (v.start_from, v.allocation_from):
                require(dependency is None or not (self.variant(dependency).start_from
                                                   or self.variant(dependency).allocation_from),
                        f"{p}variants[{i}]", f"{dependency!r} itself starts from or takes its allocation from "
                        "another variant", "name that other variant")
            self.resources_for(v, f"{p}variants.{v.name}.resources")  # validates the merged values

    def variant(self, name: str) -> VariantHparams:
        return next(v for v in self.variants if v.name == name)

    def resources_for(self, variant: VariantHparams, path: str = "resources") -> ResourcesHparams:
        """The sweep's resources with the variant's own values on top."""
        if not variant.resources:
            return self.resources
        bad = sorted(set(variant.resources) - set(PER_VARIANT_RESOURCES))
        require(not bad, f"{path}.{bad[0] if bad else ''}", "cannot be set per variant",
                "set it under the sweep's resources, or use one of " + ", ".join(PER_VARIANT_RESOURCES))
        merged = {**self.resources.to_dict(), **variant.resources}
        if "gpus_per_trial" in variant.resources and "memory_fraction" not in variant.resources:
            merged["memory_fraction"] = None  # the sweep's cap was meant for its own share of a GPU
        return ResourcesHparams.from_dict(merged, path)


@dataclass
class Trial:
    """One chain of a sweep and what to measure on it."""

    variant: str
    chain: ChainHparams
    rounds: list[int]
    evaluation: EvalHparams
    axes: dict
    resources: ResourcesHparams = ResourcesHparams()

    @property
    def key(self) -> str:
        """Trial identity: chain hash + evaluation settings + rounds (+ chain length)."""
        blob = json.dumps([self.chain.hash(), self.chain.pruning.rounds, result_key(self.evaluation),
                           self.rounds, self.variant], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def estimated_s(self, store: Optional[str] = None) -> float:
        """A rough time for this chain on its own resources (`prunelab.cost`): what orders a sweep's
        chains, longest first. With the result `store`, only what is left of it."""
        reached, evaluated = None, []
        if store is not None:
            reached, evaluated = ChainStore(store, self.chain).progress(result_key(self.evaluation), self.rounds)
        total = chain_cost(self.chain, self.evaluation, self.rounds, reached, evaluated)["total"]
        r = self.resources
        return total.seconds("gpu" if r.gpus_per_trial > 0 else "cpu", threads=r.cpus_per_trial,
                             workers=r.workers_per_trial)

    def label(self) -> str:
        short = {v: k for k, v in AXIS_ALIASES.items() if k != "seeds"}  # seed=0, not seeds=0
        def name(k: str) -> str:
            if k.startswith("start."):
                return "start_" + name(k[len("start."):])
            return short.get(k, k.split(".")[-1])

        parts = [self.variant] + [f"{name(k)}={_no_path(v)}" for k, v in self.axes.items()]
        return ",".join(parts)

    def run_name(self) -> str:
        """The chain's name in MLflow and Tune: short, distinct within a sweep, without paths:
        variant, model, data set, ipc (and the start chain's), seed, then any other axis of the grid."""
        c, start = self.chain, self.chain.start_chain()
        parts = [self.variant, c.model.name.removesuffix("_bn")]
        if c.dataset.name not in self.variant:  # distilled_imagenet10 says it already
            parts.append(c.dataset.name)
        if c.pruning_data.ipc is not None:
            parts.append(f"ipc{c.pruning_data.ipc}")
        if start is not None:
            parts.append(f"from-ipc{start.pruning_data.ipc}" if start.pruning_data.ipc is not None else "from-real")
        parts.append(f"s{c.seed}")
        shown = {"model.name", "dataset.name", "pruning_data.ipc", "seed", "dataset.root", "start.pruning_data.ipc"}
        parts += [f"{k.rsplit('.', 1)[-1]}={_no_path(v)}" for k, v in self.axes.items() if k not in shown]
        return " ".join(str(p) for p in parts)


def _no_path(value):
    """A label's value without the machine's folders: a path (a data root, a file) by its last name."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return PurePath(value.rstrip("/\\")).name or value
    return value


def resource_kinds(trials: list[Trial]) -> list[ResourcesHparams]:
    """The distinct resource requests among the trials, in order (each is checked against the cluster)."""
    kinds = []
    for t in trials:
        if t.resources not in kinds:
            kinds.append(t.resources)
    return kinds


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_sweep_yaml(figure: str, preset: str, path: Optional[str] = None) -> dict:
    """The raw mapping of one preset of a figure's YAML (sweeps/configs/<figure>.yaml)."""
    file, doc = _read_config(figure, path)
    presets = doc["presets"] or {}
    return _resolve_preset(presets, preset, figure, [])


def preset_names(figure: str) -> list[str]:
    """The presets of a figure's shipped YAML (empty if it cannot be read: --help still works)."""
    try:
        return list(_read_config(figure, None)[1].get("presets") or {})
    except ConfigError:
        return []


def figure_description(figure: str, path: Optional[str] = None) -> str:
    """The `description` of a figure's YAML: what the figure shows and how to read it."""
    return " ".join(str(_read_config(figure, path)[1].get("description") or "").split())


def _read_config(figure: str, path: Optional[str]) -> tuple[Path, dict]:
    """(file, its mapping) of a figure's sweep YAML, checked for its top-level keys."""
    file = Path(path) if path else CONFIG_DIR / f"{figure}.yaml"
    try:
        doc = yaml.safe_load(file.read_text())
    except OSError as e:
        raise ConfigError("--config", f"cannot read {file}: {e.strerror}", "give an existing YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        ctx = getattr(e, "context", None)
        raise ConfigError(str(file), f"malformed YAML: {where}{what}" + (f" ({ctx})" if ctx else ""),
                          "fix the YAML syntax there") from None
    if not isinstance(doc, dict) or "presets" not in doc:
        raise ConfigError(str(file), "no 'presets' mapping", "put each preset under presets: <name>:")
    unknown = sorted(set(doc) - {"figure", "description", "presets"})
    if unknown:
        raise ConfigError(f"{file.name}: {unknown[0]}", "unknown key", "use figure, description, presets")
    return file, doc


def _resolve_preset(presets: dict, name: str, figure: str, seen: list) -> dict:
    """A preset with what it `extends` merged under it (mappings merged key by key; a null value
    clears the inherited one)."""
    if name not in presets:
        where = "--preset" if not seen else f"presets.{seen[-1]}.extends"
        raise ConfigError(where, f"{figure} has no preset {name!r}", "use one of " + ", ".join(sorted(presets)))
    if name in seen:
        raise ConfigError(f"presets.{name}.extends", f"presets extend each other in a loop: {seen + [name]}",
                          "let one of them stand alone")
    own = copy.deepcopy(presets[name]) or {}
    parent = own.pop("extends", None)
    return _deep_merge(_resolve_preset(presets, parent, figure, seen + [name]), own) if parent else own


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]]) -> dict:
    """`--set` values: keys starting with a sweep field (evaluation.lmc, resources.gpus_per_trial, ...)
    set that field (a resource set so also replaces the variants' own values of it); any other key is
    a chain key made a grid axis (`model=resnet18_bn`, `seeds=[0,1]`, `training.epochs=5`), replacing
    the base value and any grid entry for it."""
    # a kind of pruning data decides which variants use the other pruning-data keys: it goes first
    overrides = sorted(overrides, key=lambda kv: AXIS_ALIASES.get(kv[0], kv[0]) != "pruning_data.kind")
    for key, value in overrides:
        head = key.split(".", 1)[0]
        parts = key.split(".")
        if head == "grid" and len(parts) > 1:  # a grid axis is one dotted chain key: grid.pruning_data.ipc
            _mapping(raw, "grid")[AXIS_ALIASES.get(key[5:], key[5:])] = _values(value)
            continue
        if head == "variants" and len(parts) > 3 and parts[2] in ("grid", "set"):
            variant = _variant(raw, parts[1])
            rest = ".".join(parts[3:])
            for field in ("grid", "set"):
                _mapping(variant, field)
            if parts[2] == "grid":  # variants.distilled.grid.pruning_data.ipc=[1,5]
                axis = AXIS_ALIASES.get(rest, rest)
                if not _narrow_zip(parts[1], variant, axis, _values(value), key):
                    variant["grid"][axis] = _values(value)
            else:  # variants.distilled.set.pruning_data.ipc=5: this value, not the variant's axis of that key
                set_path(variant["set"], rest, value)
                variant["grid"].pop(rest, None)
                if isinstance(variant.get("zip"), dict):
                    variant["zip"].pop(rest, None)  # its partners keep varying
            continue
        if head in SWEEP_KEYS:
            set_path(raw, key, value)
            leaf = key.split(".", 1)[1] if "." in key else ""
            if head == "resources" and leaf in PER_VARIANT_RESOURCES and isinstance(raw.get("variants"), dict):
                # a sweep-wide value given now (--gpus-per-trial 0) wins over the preset's per-variant ones
                for v in raw["variants"].values():
                    if isinstance(v, dict) and isinstance(v.get("resources"), dict):
                        v["resources"].pop(leaf, None)
            continue
        _chain_axis(raw, key, AXIS_ALIASES.get(key, key), _values(value))
    return raw


def _kind(raw: dict, spec: dict) -> str:
    """The kind of pruning data of a variant (`spec`) of the preset `raw`."""
    def kind(d) -> Optional[str]:
        pd = (d or {}).get("pruning_data") if isinstance(d, dict) else None
        return pd.get("kind") if isinstance(pd, dict) else None

    return kind(spec.get("set")) or kind(raw.get("base")) or "real"


def _uses(raw: dict, spec: dict, axis: str) -> bool:
    """Whether a variant's chains read `axis`: a pruning-data setting (ipc, method, budget, ...) only
    where they prune on something other than the real data (its kind, or any value of a kind axis);
    every other key everywhere."""
    if axis.startswith("pruning_data.") and axis != "pruning_data.kind":
        kinds = [_kind(raw, spec)]
        for grid in (raw.get("grid"), spec.get("grid")):
            if isinstance(grid, dict) and "pruning_data.kind" in grid:
                kinds = list(grid["pruning_data.kind"])
        return any(k != "real" for k in kinds)
    return True


def _chain_axis(raw: dict, key: str, axis: str, values: list) -> None:
    """A chain key from the command line, made an axis of the variants that use it (all of them: the
    shared grid), replacing their own axis or narrowing their zipped axes to it; a key no variant uses
    is an error naming the variants."""
    variants = {n: v for n, v in (raw.get("variants") or {}).items()} if isinstance(raw.get("variants"), dict) else {}
    users = [n for n, v in variants.items() if _uses(raw, v if isinstance(v, dict) else {}, axis)]
    if variants and not users:
        kinds = ", ".join(f"{n} ({_kind(raw, v if isinstance(v, dict) else {})})" for n, v in variants.items())
        raise ConfigError(key, f"no variant of this preset uses it: its variants prune on {kinds}",
                          "drop it, or give a variant that prunes on synthetic data "
                          "(variants.<name>.set.pruning_data.kind)")
    shared = not variants or len(users) == len(variants)
    if shared:
        _mapping(raw, "grid")[axis] = values
    elif isinstance(raw.get("grid"), dict):
        raw["grid"].pop(axis, None)
    for name in users:
        variant = _variant(raw, name)
        _mapping(variant, "grid")
        zipped = _narrow_zip(name, variant, axis, values, key)
        if shared or zipped:
            variant["grid"].pop(axis, None)
        else:
            variant["grid"][axis] = values


def _narrow_zip(name: str, variant: dict, axis: str, values: list, key: str) -> bool:
    """When `variant` zips `axis` with other axes, keep the rows whose `axis` value is in `values` (its
    partners follow); True if it did. A value not among the zipped ones is an error naming the partners."""
    zipped = variant.get("zip")
    if not isinstance(zipped, dict) or axis not in zipped:
        return False
    have = list(zipped[axis])
    missing = [v for v in values if v not in have]
    if missing:
        partners = [k for k in zipped if k != axis]
        raise ConfigError(key, f"variant {name} varies {axis} together with {', '.join(partners)} "
                               f"(zip: {have}); {missing} is not among them",
                          f"choose among {have}, or give each value: --set variants.{name}.set.{axis}=V "
                          + " ".join(f"variants.{name}.set.{p}=..." for p in partners))
    rows = [row for row in zip(*zipped.values()) if row[list(zipped).index(axis)] in values]
    variant["zip"] = {k: [row[i] for row in rows] for i, k in enumerate(zipped)}
    return True


def _mapping(d: dict, key: str) -> dict:
    """`d[key]` as a mapping to write into, made empty where the preset has none (or `key: null`)."""
    if not isinstance(d.get(key), dict):
        d[key] = {}
    return d[key]


def _values(value) -> list:
    """An axis' values: a list as given, a single value as a list of one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _variant(raw: dict, name: str) -> dict:
    """The preset's mapping of variant `name`; ConfigError naming the variants there if it has none."""
    variants = raw.get("variants") if isinstance(raw.get("variants"), dict) else {}
    if name not in variants:
        raise ConfigError(f"variants.{name}", "no such variant in this preset",
                          "use one of " + (", ".join(sorted(variants)) or "(none)"))
    if not isinstance(variants[name], dict):
        variants[name] = {}
    return variants[name]


class _KeepMissing(dict):
    """Format values where a root is not given: its placeholder stays, for the data check to name."""

    def __missing__(self, key):
        return "{" + key + "}"


def _format_paths(data: dict, paths: dict) -> None:
    """IDC files differ per data set and ipc: `pruning_data.path` may hold {dataset}, {ipc}, {model},
    and any root named under the sweep's `paths` (e.g. {idc}). A root that is not given stays as its
    placeholder: planning (--dry-run) goes on, and the data check before a run names what is missing."""
    pd = data.get("pruning_data") or {}
    if isinstance(pd.get("path"), str) and "{" in pd["path"]:
        values = {k: v for k, v in (paths or {}).items() if v}
        values.update(dataset=(data.get("dataset") or {}).get("name", "digits"), ipc=pd.get("ipc"),
                      model=(data.get("model") or {}).get("name", "convnet3"))
        known = set(values) | set(paths or {})
        try:
            names = {f[1] for f in string.Formatter().parse(pd["path"]) if f[1]}
        except ValueError as e:
            raise ConfigError("pruning_data.path", f"malformed placeholder in {pd['path']!r} ({e})",
                              "write placeholders as {name}") from None
        unknown = sorted(names - known)
        if unknown:
            raise ConfigError("pruning_data.path", f"unknown placeholder {{{unknown[0]}}} in {pd['path']!r}",
                              "use {dataset}, {ipc}, {model} or a root named under paths (e.g. paths: {idc: ...})")
        pd["path"] = pd["path"].format_map(_KeepMissing(values))


def expand(sweep: SweepHparams, figure: str) -> list[Trial]:
    """Every (variant × grid point) as a validated Trial; duplicates (same key) removed.

    A variant with `start_from` gets one chain per chain of the start variant at the same point of
    the shared grid; when the start variant has grid axes of its own (e.g. ipc), each start chain's
    values of those axes appear in the trial's axes as `start.<axis>`."""
    trials: dict[str, Trial] = {}
    # shared-grid point -> variant -> [(the variant's own axes, chain)]
    by_point: dict[tuple, dict[str, list[tuple[dict, ChainHparams]]]] = {}
    # start and allocation chains first
    ordered = sorted(sweep.variants, key=lambda v: v.start_from is not None or v.allocation_from is not None)
    for variant in ordered:
        axes = {**sweep.grid, **variant.grid}
        keys = list(axes)
        zipped = list(zip(*variant.zip.values())) if variant.zip else [()]
        for combo, together in itertools.product(itertools.product(*(axes[k] for k in keys)), zipped):
            point = {**dict(zip(keys, combo)), **dict(zip(variant.zip, together))}
            shared = tuple(sorted((k, json.dumps(v)) for k, v in point.items() if k in sweep.grid))
            where = f"variant {variant.name!r}" + (f" at {point}" if point else "")
            def others(field: str) -> list[tuple[dict, Optional[ChainHparams]]]:
                """The chains of the variant named by `field` at the same point of the shared grid, and
                agreeing on the axes both variants have of their own (`--set ipc=[1,5]` moves ipc from
                the shared grid into the grids of the variants that use it: a chain still starts from
                its own ipc's)."""
                name = getattr(variant, field)
                if not name:
                    return [({}, None)]
                found = [(axes_, chain_) for axes_, chain_ in by_point.get(shared, {}).get(name, [])
                         if all(json.dumps(point[k]) == json.dumps(v) for k, v in axes_.items() if k in point)]
                if not found:
                    raise ConfigError(f"variants.{variant.name}.{field}", f"no {name!r} chain at {dict(shared)} ({where})",
                                      "give both variants the same grid axes")
                return found

            for (start_axes, start), (alloc_axes, alloc) in itertools.product(others("start_from"),
                                                                             others("allocation_from")):
                data = _deep_merge(sweep.base, variant.set)
                for k, v in point.items():
                    set_path(data, k, v)
                _format_paths(data, sweep.paths)
                trial_axes = dict(point)
                if start is not None:
                    data["start_from"] = start.replace(
                        pruning=start.pruning.replace(rounds=variant.start_round)).to_dict()
                    data["start_round"] = variant.start_round
                    trial_axes.update({f"start.{k}": v for k, v in start_axes.items()})
                if alloc is not None:
                    data["allocation_from"] = alloc.to_dict()
                    set_path(data, "pruning.scope", "chain")
                    trial_axes.update({f"alloc.{k}": v for k, v in alloc_axes.items()})
                try:
                    chain = ChainHparams.from_dict(data)
                    rounds = sweep.evaluation.resolve_rounds(chain)
                except ConfigError as e:
                    raise ConfigError(e.field, f"{e.problem} ({where})", e.fix) from None
                own = {k: v for k, v in point.items() if k not in sweep.grid}
                by_point.setdefault(shared, {}).setdefault(variant.name, []).append((own, chain))
                t = Trial(variant.name, chain, rounds, sweep.evaluation, trial_axes, sweep.resources_for(variant))
                trials.setdefault(t.key, t)
    return list(trials.values())


def load_sweep(figure: str, preset: str, overrides: list[tuple[str, Any]] = (), path: Optional[str] = None
               ) -> tuple[SweepHparams, dict]:
    """Parse, override and validate one preset; returns the typed sweep and its resolved mapping."""
    raw = apply_overrides(load_sweep_yaml(figure, preset, path), list(overrides))
    typed = dict(raw)
    variants = raw.get("variants")
    if isinstance(variants, dict):  # YAML writes variants as name -> spec, so --set can reach them
        # a null field (e.g. `grid: null` in a preset that extends another) is the field's default
        typed["variants"] = [{"name": n, **{k: x for k, x in (v or {}).items() if x is not None}}
                             for n, v in variants.items()]
    return SweepHparams.from_dict(typed), raw
