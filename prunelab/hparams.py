"""Typed hyperparameters: dataclasses with defaults and one-line help, loaded from dicts/YAML and
validated before any compute. A config is data: `to_dict`, `from_dict` and a canonical hash."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from . import catalog, fingerprint
from .errors import ConfigError

SCHEMA_VERSION = 1


def hp(default: Any = dataclasses.MISSING, help: str = "", *, hashed_at_default: bool = True, **kwargs) -> Any:
    """A dataclass field with a one-line help text (shown by `describe`).

    `hashed_at_default=False` leaves the field out of content hashes while it holds its default: a
    switch added after results were stored keeps every stored hash while it is off."""
    if not hashed_at_default and (dataclasses.is_dataclass(default) or isinstance(default, (list, dict, set))):
        raise TypeError("hashed_at_default=False is for plain values (a switch), not nested or mutable ones")
    meta = {"help": help, "hashed_at_default": hashed_at_default}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kwargs)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists/dicts to tuples/dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # before a nested Hparams, whose from_dict would read None as "all defaults"
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}",
                          "change the value to " + _type_name(tp))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(path, f"expected null, got {value!r}", "remove the value")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(path, f"unknown value {value!r}", "use one of " + ", ".join(map(repr, choices)))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}", "write it as a YAML list")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}", "write key: value pairs")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}", "write true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"expected an integer, got {value!r}", "write a whole number such as 10")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "5e-4" as a string
            except ValueError:
                pass
        raise ConfigError(path, f"expected a number, got {value!r}", "write a number such as 0.01")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {value!r}", "quote the value")
    return value


class Hparams:
    """Mixin for hyperparameter dataclasses.

    Subclasses are `@dataclass(frozen=True)` and may define `_validate(self, path)` that raises
    ConfigError for values of the right type but out of range.
    """

    @classmethod
    def from_dict(cls, data: Optional[dict], path: str = ""):
        """Build from a plain dict (e.g. parsed YAML), rejecting unknown keys and wrong types."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path or cls.__name__, f"expected a mapping, got {data!r}",
                              "write key: value pairs under it")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{unknown[0]}", "unknown key",
                              "remove it, or use one of: " + ", ".join(sorted(fields)))
        kwargs = {}
        for name, value in data.items():
            sub = f"{path}.{name}" if path else name
            kwargs[name] = _coerce(value, hints[name], sub)
        obj = cls(**kwargs)
        obj.validate(path)
        return obj

    def validate(self, path: str = "") -> None:
        """Check ranges of this object and every nested Hparams."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Hparams):
                v.validate(f"{path}.{f.name}" if path else f.name)
        check = getattr(self, "_validate", None)
        if check is not None:
            check(path + "." if path else "")

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def hash_dict(self) -> dict:
        """`to_dict` less the fields left out of hashes while at their default."""
        return _strip_unhashed(type(self), self.to_dict())

    def canonical_json(self) -> str:
        return canonical_json(self.hash_dict())

    def hash(self, length: int = 16) -> str:
        """Content hash of the resolved values (sorted JSON plus schema version)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:length]

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, default, help (nested classes indented)."""
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
            if isinstance(default, Hparams):
                lines.append(f"{f.name}:  {f.metadata.get('help', '')}")
                lines += ["  " + ln for ln in type(default).describe().splitlines()]
            else:
                lines.append(f"{f.name} = {default!r}  # {f.metadata.get('help', '')}")
        return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _hash_schema(cls) -> tuple[dict[str, Any], dict[str, type]]:
    """Of a Hparams class: the fields left out of hashes at their default (name -> default, as JSON
    gives it back), and the nested Hparams fields (name -> class)."""
    hints = typing.get_type_hints(cls)
    unhashed = {f.name: json.loads(json.dumps(f.default)) for f in dataclasses.fields(cls)
                if not f.metadata.get("hashed_at_default", True)}
    nested = {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    return unhashed, nested


def _strip_unhashed(cls, values: dict) -> dict:
    """`values` (a dict of `cls`'s fields, possibly partial) without the fields marked
    hashed_at_default=False that hold their default; nested Hparams likewise."""
    unhashed, nested = _hash_schema(cls)
    return {k: _strip_unhashed(nested[k], v) if k in nested and isinstance(v, dict) else v
            for k, v in values.items() if not (k in unhashed and v == unhashed[k])}


def _strip_chain(values: dict) -> dict:
    """`_strip_unhashed` of a ChainHparams dict, its `start_from` and `allocation_from` (other chains'
    configs kept as plain data) stripped alike."""
    out = _strip_unhashed(ChainHparams, values)
    for key in ("start_from", "allocation_from"):
        if isinstance(out.get(key), dict):
            out[key] = _strip_chain(out[key])
    return out


def canonical_json(values: dict) -> str:
    """Sorted, compact JSON of resolved values plus the schema version: what config hashes are of."""
    return json.dumps({"schema": SCHEMA_VERSION, "hparams": values}, sort_keys=True, separators=(",", ":"))


def require(cond: bool, field: str, problem: str, fix: str = "") -> None:
    if not cond:
        raise ConfigError(field, problem, fix)


def set_path(data: dict, dotted: str, value: Any) -> dict:
    """Set `a.b.c=value` in a nested dict in place (used by command-line overrides)."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(dotted, f"{k} is not a mapping", "override a leaf key instead")
        cur = nxt
    cur[keys[-1]] = value
    return data


# ---------------------------------------------------------------------------------------------
# The core's hyperparameters.


@dataclass(frozen=True)
class DatasetHparams(Hparams):
    name: str = hp("digits", "data set: digits, shapes, cifar10, cifar100, imagenet10")
    root: Optional[str] = hp(None, "local directory holding the data (cifar10/100, imagenet10)")
    split_seed: int = hp(0, "seed of the train/test split (digits, shapes)")
    train_size: Optional[int] = hp(None, "number of training examples (shapes; a subset elsewhere)")
    test_size: Optional[int] = hp(None, "number of test examples (shapes; a subset elsewhere)")
    image_size: Optional[int] = hp(None, "resize images to this size (imagenet10: 224)")

    def _validate(self, p):
        require(self.name in catalog.DATASETS, p + "name", f"unknown data set {self.name!r}",
                "use one of " + ", ".join(sorted(catalog.DATASETS)))
        for k in ("train_size", "test_size", "image_size"):
            v = getattr(self, k)
            require(v is None or v > 0, p + k, f"must be positive, got {v}")


@dataclass(frozen=True)
class ModelHparams(Hparams):
    name: str = hp("convnet3", "model: convnet3, resnet10_bn, resnet18_bn")
    width: Optional[int] = hp(None, "channel width (convnet3 default 128; resnets' first stage 64)")
    depth: Optional[int] = hp(None, "convnet blocks (default: 3 at 32 px, 2 at 8 px, up to 5 at 224 px)")

    def _validate(self, p):
        require(self.name in catalog.MODELS, p + "name", f"unknown model {self.name!r}",
                "use one of " + ", ".join(sorted(catalog.MODELS)))
        require(self.width is None or self.width > 0, p + "width", f"must be positive, got {self.width}")
        require(self.depth is None or self.depth > 0, p + "depth", f"must be positive, got {self.depth}")


@dataclass(frozen=True)
class TrainingHparams(Hparams):
    optimizer: Literal["sgd", "adam"] = hp("sgd", "optimizer")
    lr: float = hp(0.01, "learning rate")
    momentum: float = hp(0.9, "SGD momentum")
    weight_decay: float = hp(5e-4, "L2 weight decay")
    nesterov: bool = hp(False, "Nesterov momentum")
    batch_size: int = hp(64, "mini-batch size")
    epochs: int = hp(300, "training epochs (ignored if steps is set)")
    steps: Optional[int] = hp(None, "training steps instead of epochs")
    milestones: tuple[float, ...] = hp((2 / 3, 5 / 6), "lr decay points as fractions of training")
    gamma: float = hp(0.2, "lr multiplier at each milestone")
    warmup_steps: int = hp(0, "linear lr warm-up steps")
    augment: Literal["standard", "standard_cutmix", "none", "dsa", "dsa_cutmix"] = hp(
        "standard", "augmentation: data set's standard (crop+flip), with CutMix (IDC's ImageNet recipe), "
                    "none, DSA, DSA with CutMix")
    cutmix_prob: float = hp(0.5, "probability of CutMix per batch (augment *_cutmix; IDC: 0.5 on CIFAR, 1.0 on "
                                  "ImageNet)", hashed_at_default=False)
    precision: Literal["fp32", "bf16"] = hp("fp32", "bf16 autocast (CUDA only)")
    channels_last: bool = hp(False, "channels-last memory format (CUDA only)")
    compile: bool = hp(False, "torch.compile the model")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = hp(
        "default", "torch.compile mode (compile=true): reduce-overhead replays CUDA graphs, for small-batch "
                   "training such as on a distilled set", hashed_at_default=False)
    eval_batch_size: int = hp(1024, "batch size for evaluation")

    def _validate(self, p):
        require(self.lr > 0, p + "lr", f"must be positive, got {self.lr}")
        require(0 <= self.momentum < 1, p + "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, p + "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.batch_size > 0, p + "batch_size", f"must be positive, got {self.batch_size}")
        require(self.epochs > 0 or (self.steps or 0) > 0, p + "epochs",
                f"must be positive, got {self.epochs}", "set epochs >= 1 (or steps >= 1)")
        require(self.steps is None or self.steps > 0, p + "steps", f"must be positive, got {self.steps}")
        require(all(0 < m < 1 for m in self.milestones), p + "milestones",
                f"must be fractions in (0, 1), got {list(self.milestones)}", "e.g. [0.667, 0.833]")
        require(0 < self.gamma <= 1, p + "gamma", f"must be in (0, 1], got {self.gamma}")
        require(self.warmup_steps >= 0, p + "warmup_steps", "must be >= 0")
        require(self.eval_batch_size > 0, p + "eval_batch_size", "must be positive")
        require(0 < self.cutmix_prob <= 1, p + "cutmix_prob", f"must be in (0, 1], got {self.cutmix_prob}",
                "e.g. 0.5 (IDC's CIFAR recipe) or 1.0 (its ImageNet recipe)")
        require(self.compile or self.compile_mode == "default", p + "compile_mode",
                f"{self.compile_mode!r} needs compile: true", "set compile: true as well, or drop compile_mode")


@dataclass(frozen=True)
class PruningHparams(Hparams):
    fraction: float = hp(0.2, "fraction of the remaining weights pruned per round")
    rounds: int = hp(10, "pruning rounds (sparsity after r rounds: 1 - (1 - fraction)^r)")
    rewind_epoch: int = hp(0, "rewind point: 0 = initialization, k = weights after k epochs on real data")
    scope: Literal["global", "layerwise", "erk", "chain"] = hp(
        "global", "how the kept weights spread over layers: one ranking over all layers (global), the same "
                  "density in every layer (layerwise), Erdős–Rényi-kernel densities (erk), or each layer's "
                  "count in another chain's mask of the same round (chain: see allocation_from)")
    prune_classifier: bool = hp(True, "also prune the final linear layer")
    method: Literal["magnitude", "random", "magnitude_init", "snip", "grasp", "synflow"] = hp(
        "magnitude", "how a round's mask is found: magnitude (train on the pruning data, prune the smallest "
                     "weights: IMP, distilled pruning), or at initialization, one-shot from the dense network at "
                     "each round's sparsity: random, magnitude_init, snip, grasp, synflow (iterative, data-free)",
        hashed_at_default=False)
    score_examples: int = hp(256, "real training images (the chain's seeded order) snip and grasp score on",
                             hashed_at_default=False)
    synflow_iterations: int = hp(100, "pruning iterations of synflow to each round's sparsity",
                                 hashed_at_default=False)

    def _validate(self, p):
        require(self.score_examples > 0, p + "score_examples", f"must be positive, got {self.score_examples}",
                "e.g. 256 (ten per class or more)")
        require(self.synflow_iterations > 0, p + "synflow_iterations",
                f"must be positive, got {self.synflow_iterations}", "e.g. 100, as the SynFlow paper")
        require(0 < self.fraction < 1, p + "fraction", f"must be in (0, 1), got {self.fraction}",
                "use e.g. 0.2 to remove 20% of the remaining weights per round")
        require(self.rounds >= 0, p + "rounds", f"must be >= 0, got {self.rounds}")
        require(self.rewind_epoch >= 0, p + "rewind_epoch", f"must be >= 0, got {self.rewind_epoch}")


@dataclass(frozen=True)
class PruningDataHparams(Hparams):
    kind: Literal["real", "idc_file", "distilled", "random_subset", "herding"] = hp(
        "real", "data the mask is found on: the real training set or a synthetic set")
    ipc: Optional[int] = hp(None, "images per class of the synthetic set")
    method: Optional[str] = hp(None, "distillation method (kind=distilled): idc, dm")
    path: Optional[str] = hp(None, "IDC data.pt file or its directory (kind=idc_file)")
    factor: Optional[int] = hp(None, "multi-formation factor (IDC: 2 for CIFAR, 3 for ImageNet)")
    seed: int = hp(0, "seed of the synthetic set")
    budget: Optional[int] = hp(None, "distillation budget (outer iterations)")
    net_width: Optional[int] = hp(None, "width of the distiller's ConvNet (None: the method's default; IDC's "
                                        "CIFAR runs: 128)", hashed_at_default=False)
    inner_loop: Optional[int] = hp(None, "idc: matching steps per outer iteration (None: default; IDC's CIFAR: 100)",
                                   hashed_at_default=False)
    batch_real: Optional[int] = hp(None, "real images per class per matching step (None: default; IDC's CIFAR: 64)",
                                   hashed_at_default=False)
    lr_img: Optional[float] = hp(None, "learning rate of the synthetic images (None: default; IDC's CIFAR: "
                                       "0.005 x ipc / 10)", hashed_at_default=False)
    store: Optional[str] = hp(None, "directory of the synthetic-set store (default: ~/.cache/prunelab)")

    def _validate(self, p):
        require(self.ipc is None or self.ipc > 0, p + "ipc", f"must be a positive integer, got {self.ipc}",
                "give images per class, e.g. 10 (or leave it out)")
        if self.kind != "real":
            require(self.ipc is not None and self.ipc > 0 or self.kind == "idc_file", p + "ipc",
                    f"must be a positive integer for kind={self.kind!r}, got {self.ipc}",
                    "set pruning_data.ipc, e.g. 10")
        if self.kind == "idc_file":
            require(bool(self.path), p + "path", "required for kind='idc_file'",
                    "point it at IDC's data.pt or the folder that holds it")
        if self.kind == "distilled":
            require(self.method in catalog.DISTILLERS, p + "method",
                    f"unknown distillation method {self.method!r}" if self.method else "required for kind='distilled'",
                    "use one of " + ", ".join(catalog.DISTILLERS))
            require(self.method != "dm" or self.inner_loop is None, p + "inner_loop",
                    "is a setting of method idc; dm has no inner loop", "remove pruning_data.inner_loop")
        require(self.factor is None or self.factor >= 1, p + "factor", f"must be >= 1, got {self.factor}")
        require(self.budget is None or self.budget > 0, p + "budget", f"must be positive, got {self.budget}")
        for k in ("net_width", "inner_loop", "batch_real"):
            v = getattr(self, k)
            require(v is None or v > 0, p + k, f"must be positive, got {v}")
        require(self.lr_img is None or self.lr_img > 0, p + "lr_img", f"must be positive, got {self.lr_img}")


def data_fingerprint(dataset: DatasetHparams) -> Optional[str]:
    """What stands for `dataset.root` in identities: its files' fingerprint ("absent" when they are
    not on this machine, e.g. a dry run away from the data), or None without a root."""
    if dataset.root is None:
        return None
    return fingerprint.dataset_fingerprint(dataset.name, dataset.root) or "absent"


def _without_paths(hp: "ChainHparams") -> tuple["ChainHparams", list[str]]:
    """`hp` with its data root, IDC path and those of its start chain cleared, and the fingerprints
    standing for them, in a fixed order (none at all for a chain without paths: its hash is unchanged)."""
    marks = []
    if hp.dataset.root is not None:
        marks.append(f"root:{data_fingerprint(hp.dataset)}")
        hp = hp.replace(dataset=hp.dataset.replace(root=None))
    if hp.pruning_data.path is not None:
        marks.append(f"idc:{fingerprint.file_fingerprint(hp.pruning_data.path) or 'absent'}")
        hp = hp.replace(pruning_data=hp.pruning_data.replace(path=None))
    for field_name, prefix in (("start_from", "start"), ("allocation_from", "alloc")):
        other = getattr(hp, field_name)
        if other is None:
            continue
        _, other_marks = _without_paths(ChainHparams.from_dict(other, field_name))
        if other_marks:
            hp = hp.replace(**{field_name: {**other, "dataset": {**other.get("dataset", {}), "root": None},
                                            "pruning_data": {**other.get("pruning_data", {}), "path": None}}})
            marks += [f"{prefix}-{m}" for m in other_marks]
    return hp, marks


@dataclass(frozen=True)
class ChainHparams(Hparams):
    """Everything that determines one IMP chain (and so its content hash)."""

    dataset: DatasetHparams = hp(DatasetHparams(), "real data set")
    model: ModelHparams = hp(ModelHparams(), "architecture")
    pruning: PruningHparams = hp(PruningHparams(), "pruning schedule")
    pruning_data: PruningDataHparams = hp(PruningDataHparams(), "data the mask is found on")
    pruning_training: TrainingHparams = hp(TrainingHparams(epochs=1000), "training on the pruning data")
    training: TrainingHparams = hp(TrainingHparams(), "training a subnetwork on the real data")
    seed: int = hp(0, "seed of the initialization, data order and augmentation")
    seed_scope: Literal["all", "training"] = hp(
        "all", "what `seed` varies: all (initialization, mask and every training) or training (the authors': "
               "one mask per chain, found with seed 0; seeds vary only the trainings after pruning)",
        hashed_at_default=False)
    start_from: Optional[dict] = hp(None, "chain config whose mask at start_round this chain starts from "
                                          "(IMP from a synthetic subnetwork, Fig. 7)")
    start_round: int = hp(0, "round of start_from's mask; this chain's rounds continue from it")
    allocation_from: Optional[dict] = hp(None, "chain config whose mask at each round gives this chain's "
                                               "per-layer counts at that round (pruning.scope: chain), e.g. "
                                               "IMP's: the same allocation, other weights", hashed_at_default=False)

    def hash(self, length: int = 16) -> str:
        """Content hash without `pruning.rounds` (the mask of round r does not depend on how many
        rounds follow, so chains of different lengths share results), without where synthetic sets
        are cached, and without machine paths: a data root or an IDC file enters by the fingerprint
        of its content (`prunelab.fingerprint`), so one chain has one hash on every machine."""
        core = self.replace(pruning=self.pruning.replace(rounds=0),
                            pruning_data=self.pruning_data.replace(store=None))
        if core.allocation_from is not None:  # it runs as far as this chain, whatever length it was given
            alloc = core.allocation_chain()
            core = core.replace(allocation_from=alloc.replace(pruning=alloc.pruning.replace(rounds=0)).to_dict())
        core, data = _without_paths(core)
        return self._digest(core, "".join(f"|data-{d}" for d in data), length)

    def paths_fingerprinted(self) -> bool:
        """True when every data root and IDC file of this chain (and its start chain) is on this
        machine, so that `hash()` stands for their content rather than for their absence."""
        return not any(m.endswith(":absent") for m in _without_paths(self)[1])

    def legacy_hash(self, length: int = 16) -> str:
        """The hash this chain had while its identity held the data root and IDC path (stores
        written then are found through it, see `ChainStore`); equal to `hash()` without paths."""
        core = self.replace(pruning=self.pruning.replace(rounds=0),
                            pruning_data=self.pruning_data.replace(store=None))
        return self._digest(core, "", length)

    def _digest(self, core: "ChainHparams", suffix: str, length: int) -> str:
        if self.pruning_data.kind in ("distilled",) + catalog.CORESETS:
            # a built-in synthetic set changes with its code version: so do the masks found on it
            suffix = f"|synthetic-code-{catalog.SYNTHETIC_CODE_VERSION}" + suffix
        if not suffix:
            return Hparams.hash(core, length)
        return hashlib.sha256((core.canonical_json() + suffix).encode()).hexdigest()[:length]

    def hash_dict(self) -> dict:
        return _strip_chain(self.to_dict())

    def start_chain(self) -> Optional["ChainHparams"]:
        return None if self.start_from is None else ChainHparams.from_dict(self.start_from, "start_from")

    def allocation_chain(self) -> Optional["ChainHparams"]:
        """The chain whose masks give this one's per-layer counts, run as far as this one."""
        if self.allocation_from is None:
            return None
        other = ChainHparams.from_dict(self.allocation_from, "allocation_from")
        return other.replace(pruning=other.pruning.replace(rounds=self.pruning.rounds))

    def _validate(self, p):
        if self.start_from is not None:
            start = ChainHparams.from_dict(self.start_from, p + "start_from")
            require(self.start_round >= 1, p + "start_round", "must be >= 1 when start_from is set",
                    "give the round of the start chain's mask, e.g. 8")
            require(start.pruning.rounds >= self.start_round, p + "start_from.pruning.rounds",
                    f"the start chain stops before round {self.start_round}",
                    f"set start_from.pruning.rounds >= {self.start_round}")
            require(self.pruning.rounds > self.start_round, p + "pruning.rounds",
                    f"must exceed start_round={self.start_round}", "count rounds from the dense network")
        require((self.pruning.scope == "chain") == (self.allocation_from is not None), p + "pruning.scope",
                f"scope {self.pruning.scope!r} with allocation_from {'set' if self.allocation_from else 'unset'}",
                "use pruning.scope: chain together with allocation_from (another chain's config), or neither")
        if self.allocation_from is not None:
            other = ChainHparams.from_dict(self.allocation_from, p + "allocation_from")
            for key in ("fraction", "prune_classifier"):
                require(getattr(other.pruning, key) == getattr(self.pruning, key), f"{p}allocation_from.pruning.{key}",
                        f"{getattr(other.pruning, key)} differs from this chain's {getattr(self.pruning, key)}",
                        "take the allocation of a chain on the same pruning schedule")
            require(other.model == self.model, p + "allocation_from.model", "another architecture",
                    "take the allocation of a chain of the same model")
            require(other.allocation_from is None and other.start_from is None, p + "allocation_from",
                    "an allocation taken from a chain that starts from, or takes its allocation from, another",
                    "name a chain that starts dense")
            require(other.dataset.replace(root=None) == self.dataset.replace(root=None), p + "allocation_from.dataset",
                    f"{other.dataset.name} differs from this chain's {self.dataset.name} (or its split)",
                    "take the allocation of a chain on the same data set")
        if self.pruning.method != "magnitude":
            require(self.pruning_data.kind == "real", p + "pruning_data.kind",
                    f"pruning.method={self.pruning.method!r} finds masks at initialization (scored on real data "
                    f"where it needs data), not on kind={self.pruning_data.kind!r}",
                    "drop pruning_data, or use pruning.method: magnitude")
            require(self.start_from is None, p + "start_from", f"pruning.method={self.pruning.method!r} finds "
                    "each round's mask from the dense network", "start a magnitude chain from another's mask instead")
        if self.pruning_data.kind == "real" and self.pruning.rewind_epoch > 0:
            require(self.pruning.rewind_epoch < self.training.epochs, p + "pruning.rewind_epoch",
                    f"rewind epoch {self.pruning.rewind_epoch} is not before the end of training "
                    f"({self.training.epochs} epochs)", "use a smaller rewind_epoch")
