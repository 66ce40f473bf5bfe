"""Reading one sweep out of MLflow into plain Python records (no pandas, no torch).

A `Sweep` is the parent run (tag `prunelab.role=sweep`) and its child runs (`Chain`s, tag
`mlflow.parentRunId`). `search_runs` only carries each metric's *last* value, so per-round curves
come from `get_metric_history`, fetched lazily and cached per (run, key). Artifacts are downloaded
on demand into a scratch directory. Names come from `prunelab.schema` (docs/results.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import ViewType

from prunelab import schema
from prunelab.catalog import DATASETS, real_images_per_class


class AnalysisError(RuntimeError):
    """The sweep cannot be read at all (unknown experiment, no parent run, ...)."""


def _num(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(x) -> Optional[int]:
    v = _num(x)
    return None if v is None else int(v)


@dataclass
class Chain:
    """One child run: identity fields parsed from tags/params, metrics read lazily."""

    run_id: str
    name: str
    tags: dict
    params: dict
    last: dict  # metric -> last value (what search_runs returns)
    _sweep: "Sweep" = field(repr=False)
    _hist: dict = field(default_factory=dict, repr=False)
    _arts: dict = field(default_factory=dict, repr=False)

    # -- identity -------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.tags.get(schema.STATUS_TAG, schema.STATUS_FINISHED)

    @property
    def failed(self) -> bool:
        return self.status == schema.STATUS_FAILED

    @property
    def dataset(self) -> str:
        return self.params.get(schema.DATASET_PARAM, "?")

    @property
    def model(self) -> str:
        return self.params.get(schema.MODEL_PARAM, "?")

    @property
    def seed(self) -> Optional[int]:
        return _int(self.params.get(schema.SEED_PARAM))

    @property
    def ipc(self) -> Optional[int]:
        return _int(self.params.get(schema.PRUNING_IPC_PARAM))

    @property
    def kind(self) -> str:
        return self.params.get(schema.PRUNING_KIND_PARAM, "real")

    @property
    def method(self) -> str:
        """How the chain finds its masks (param `pruning.method`): magnitude (IMP, distilled pruning;
        runs from before the parameter existed), or a source at initialization (snip, synflow, ...)."""
        return self.params.get(schema.METHOD_PARAM, "magnitude")

    @property
    def at_init(self) -> bool:
        """A chain whose masks are found at initialization (`pruning.method` other than magnitude)."""
        return self.method != "magnitude"

    @property
    def seed_scope(self) -> str:
        """What the run's seed varies (param `seed_scope`): `all`, or `training` (one mask per chain)."""
        return self.params.get(schema.SEED_SCOPE_PARAM, "all")

    @property
    def rewind_epoch(self) -> int:
        return _int(self.params.get(schema.REWIND_EPOCH_PARAM)) or 0

    @property
    def fraction(self) -> float:
        return _num(self.params.get(schema.FRACTION_PARAM)) or 0.2

    @property
    def variant(self) -> str:
        v = self.tags.get(schema.VARIANT_TAG) or self.params.get(schema.VARIANT_PARAM)
        if v:
            return v
        return "imp" if self.kind == "real" else self.kind

    @property
    def start_round(self) -> int:
        """Rounds of the start chain's mask this chain began from (param `start_round`), else 0."""
        return _int(self.params.get(schema.START_ROUND_PARAM)) or 0

    @property
    def then_imp(self) -> bool:
        """IMP started from another chain's mask (e.g. a synthetic one): param `start_round` > 0."""
        return self.start_round > 0 or "then_imp" in self.variant

    @property
    def is_dense(self) -> bool:
        """A chain that only holds the dense network (variant `dense`, or no pruning rounds)."""
        return self.variant == "dense" or self.params.get(schema.ROUNDS_PARAM) == "0"

    @property
    def is_imp(self) -> bool:
        """Plain IMP on the real data (any rewind epoch), not IMP started from another chain's mask."""
        return self.kind == "real" and not self.then_imp and not self.is_dense and not self.at_init

    @property
    def is_synthetic(self) -> bool:
        return not (self.is_imp or self.then_imp or self.is_dense or self.at_init)

    @property
    def label(self) -> str:
        """The variant as plotted: `IMP (k=0)`, `distilled ipc10`, `<variant> (from ipc10 r8)`, `dense`
        (see `label_kind`)."""
        if self.then_imp:
            s = self.start_round
            ipc = _int(self.params.get(schema.START_IPC_PARAM))
            start = f"ipc{ipc} r{s}" if ipc is not None else f"r{s}"  # one series per start chain
            return f"{self.variant} (from {start})" if s else self.variant
        if self.is_dense:
            return "dense"
        if self.is_imp:
            return f"IMP (k={self.rewind_epoch})"
        return f"{self.variant} ipc{self.ipc}" if self.ipc is not None else self.variant

    @property
    def setting(self) -> tuple[str, str]:
        return (self.dataset, self.model)

    @property
    def eval_rounds(self) -> list[int]:
        """Rounds listed in `eval.rounds` that this chain can evaluate (a then-IMP chain starts at
        its start round)."""
        raw = self.params.get(schema.EVAL_ROUNDS_PARAM, "")
        rounds = {int(x) for x in re.split(r"[,\s]+", raw.strip("[] ")) if x.strip().lstrip("-").isdigit()}
        return sorted(r for r in rounds if r >= self.start_round)

    def describe(self) -> str:
        """A human-readable name for reports: run name, variant, setting and seed."""
        return f"run '{self.name}' ({self.label}, {self.dataset}/{self.model}, seed {self.seed})"

    @property
    def real_per_class(self) -> Optional[float]:
        n, facts = _num(self.params.get(schema.DATASET_TRAIN_SIZE_PARAM)), DATASETS.get(self.dataset)
        if n and facts:
            return n / facts.classes
        return real_images_per_class(self.dataset)

    # -- metrics --------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.last

    def history(self, key: str) -> dict[int, float]:
        """step -> value for metric `key` (the last value logged at each step); {} when absent."""
        if key not in self._hist:
            out: dict[int, float] = {}
            if key in self.last:
                for m in sorted(self._sweep.client.get_metric_history(self.run_id, key),
                                key=lambda m: (m.step, m.timestamp)):
                    out[int(m.step)] = float(m.value)
            self._hist[key] = out
        return self._hist[key]

    def sparsity_at(self, rnd: int) -> float:
        """Sparsity of the subnetwork after `rnd` rounds: logged `eval_sparsity`/`sparsity`, else
        1-(1-f)^r (rounds count from the dense network, in then-IMP chains too)."""
        for key in (schema.EVAL_SPARSITY, schema.SPARSITY):
            v = self.history(key).get(rnd)
            if v is not None:
                return v
        return 1.0 - (1.0 - self.fraction) ** rnd

    # -- artifacts ------------------------------------------------------------------------------
    def artifact_rounds(self, folder: str) -> dict[int, str]:
        """round -> artifact path for files `folder/round_XX.(json|npz)` (listed once per folder)."""
        if folder not in self._arts:
            try:
                infos = self._sweep.client.list_artifacts(self.run_id, folder)
            except Exception:  # a missing folder raises on some artifact stores
                infos = []
            out = {}
            for fi in infos:
                m = schema.ROUND_FILE_RE.search(fi.path)
                if m and not fi.is_dir:
                    out[int(m.group(1))] = fi.path
            self._arts[folder] = out
        return self._arts[folder]

    def download(self, path: str) -> Optional[str]:
        return self._sweep.download(self.run_id, path)

    def mask_file(self, rnd: int) -> Optional[str]:
        """Local copy of round `rnd`'s mask (`masks/round_XX.pt`, a plain torch file), if logged."""
        return self._round_file(schema.MASKS_DIR, rnd)

    def _round_file(self, folder: str, rnd: int) -> Optional[str]:
        """Local copy of `folder/round_XX.*`; the whole folder is fetched in one call the first time."""
        p = self.artifact_rounds(folder).get(rnd)
        if p is None:
            return None
        local = os.path.join(self._sweep.scratch, self.run_id, p)
        if not os.path.exists(local):
            self.download(folder)
        return local if os.path.exists(local) else self.download(p)

    def lmc(self, rnd: int) -> Optional[dict]:
        local = self._round_file(schema.LMC_DIR, rnd)
        if local is None:
            return None
        with open(local) as f:
            return json.load(f)

    def spectrum(self, rnd: int) -> Optional[dict]:
        """Round `rnd`'s `spectrum/round_XX.json` (evaluation.spectrum), if logged."""
        local = self._round_file(schema.SPECTRUM_DIR, rnd)
        if local is None:
            return None
        with open(local) as f:
            return json.load(f)

    def landscape(self, rnd: int) -> Optional[dict]:
        local = self._round_file(schema.LANDSCAPE_DIR, rnd)
        if local is None:
            return None
        with np.load(local, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


@dataclass
class Sweep:
    client: MlflowClient
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_id: str
    parent_tags: dict
    parent_name: str
    chains: list[Chain]
    scratch: str

    @property
    def ok(self) -> list[Chain]:
        """Chains that did not fail (failed ones are reported, never plotted)."""
        return [c for c in self.chains if not c.failed]

    @property
    def failed(self) -> list[Chain]:
        return [c for c in self.chains if c.failed]

    def download(self, run_id: str, path: str) -> Optional[str]:
        dst = os.path.join(self.scratch, run_id)
        local = os.path.join(dst, path)
        if os.path.exists(local):
            return local
        os.makedirs(dst, exist_ok=True)
        try:
            return self.client.download_artifacts(run_id, path, dst)
        except Exception:  # absent artifact: the caller reports it as missing
            return None


def _search_all(client: MlflowClient, exp_id: str, filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string, ViewType.ACTIVE_ONLY, 1000, order_by, token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_sweep(experiment: str, tracking_uri: Optional[str] = None, parent_run_id: Optional[str] = None,
               scratch: Optional[str] = None) -> Sweep:
    """The sweep `parent_run_id` (default: the newest parent run) of `experiment` and its child runs."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise AnalysisError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise AnalysisError(f"experiment {experiment!r} not found at {tracking_uri}")
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except Exception as e:
            raise AnalysisError(f"parent run {parent_run_id!r} not found: {e}") from None
    else:
        parents = _search_all(client, exp.experiment_id, schema.tag_filter(schema.ROLE_TAG, schema.ROLE_SWEEP),
                              ["attributes.start_time DESC"])
        if not parents:
            raise AnalysisError(f"experiment {experiment!r} has no sweep run "
                                f"(tag {schema.ROLE_TAG}={schema.ROLE_SWEEP})")
        parent = parents[0]
    pid = parent.info.run_id
    children = _search_all(client, exp.experiment_id, schema.tag_filter(schema.PARENT_TAG, pid),
                           ["attributes.start_time ASC"])
    sweep = Sweep(client=client, tracking_uri=tracking_uri, experiment=experiment,
                  experiment_id=exp.experiment_id, parent_id=pid, parent_tags=dict(parent.data.tags),
                  parent_name=parent.info.run_name or pid, chains=[],
                  scratch=scratch or tempfile.mkdtemp(prefix="prunelab-analysis-"))
    # a re-run sweep reuses finished chains instead of recomputing them: their runs belong to an
    # earlier parent and are listed (with run ids) in this parent's sweep/trials.json
    have = {r.info.run_id for r in children}
    for t in _trials(sweep):
        rid = t.get("run_id")
        if rid and rid not in have:
            try:
                children.append(client.get_run(rid))
                have.add(rid)
            except Exception:  # deleted since: reported by missing_runs
                pass
    for r in children:
        if r.data.tags.get(schema.ROLE_TAG, schema.ROLE_CHAIN) != schema.ROLE_CHAIN:
            continue
        sweep.chains.append(Chain(run_id=r.info.run_id, name=r.info.run_name or r.info.run_id,
                                  tags=dict(r.data.tags), params=dict(r.data.params),
                                  last=dict(r.data.metrics), _sweep=sweep))
    return sweep


def _trials(sweep: Sweep) -> list[dict]:
    """The parent run's sweep/trials.json (every trial the sweep asked for), or [] if absent."""
    path = sweep.download(sweep.parent_id, schema.SWEEP_TRIALS)
    if not path:
        return []
    with open(path) as f:
        return json.load(f)


def missing_runs(sweep: Sweep) -> list[str]:
    """Trials the sweep asked for that have no chain run, and chains that failed, by name."""
    have = {c.tags.get(schema.TRIAL_KEY_TAG) for c in sweep.chains}
    out = [f"trial {t.get('label', '?')} [{t.get('key', '?')}] has no run (not started, or lost)"
           for t in _trials(sweep) if t.get("key") not in have]
    out += [f"{c.describe()} failed: {c.tags.get(schema.FAILURE_TAG, 'no reason given')}" for c in sweep.failed]
    out += [f"{c.describe()} did not finish (status {c.status})" for c in sweep.chains
            if c.status not in (schema.STATUS_FINISHED, schema.STATUS_FAILED)]
    return out


# ------------------------------------------------------------------------------------------------
# small helpers shared by the figure modules


def group(chains, key) -> dict:
    """Ordered dict: key(chain) -> [chains], keys sorted."""
    out: dict = {}
    for c in chains:
        out.setdefault(key(c), []).append(c)
    return dict(sorted(out.items(), key=lambda kv: tuple(str(x) for x in kv[0]) if isinstance(kv[0], tuple)
                       else str(kv[0])))


def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, s, len(v)


def missing_seeds(chains, figure: str) -> list[str]:
    """Seeds present for some variant of a (data set, model) but absent (or failed) for another."""
    msgs = []
    for (ds, model), cs in group(chains, lambda c: c.setting).items():
        seeds = {c.seed for c in cs}
        for label, lc in group(cs, lambda c: c.label).items():
            ok = {c.seed for c in lc if not c.failed}
            for s in sorted(seeds - ok, key=str):
                msgs.append(f"{figure}: {label} on {ds}/{model} has no successful run for seed {s}")
    return msgs


def seed_words(chains) -> str:
    """How the seeds of these chains differ, for a figure's title."""
    scopes = sorted({c.seed_scope for c in chains})
    words = {"all": "seeds vary init, mask and training", "training": "seeds vary the training only (one mask)"}
    return "; ".join(words.get(s, s) for s in scopes) or words["all"]


def label_kind(label: str) -> str:
    """What a `Chain.label` names: 'imp', 'then_imp', 'dense' or 'synthetic'."""
    if label == "dense":
        return "dense"
    if re.fullmatch(r"IMP \(k=\d+\)", label):
        return "imp"
    if re.search(r"\(from (ipc\d+ )?r\d+\)$", label) or "then_imp" in label:
        return "then_imp"
    return "synthetic"


def sort_labels(labels) -> list[str]:
    """IMP first (by k), then IMP from another chain's mask, then synthetic variants by ipc."""
    def key(l):
        m = re.search(r"k=(\d+)", l)
        i = re.search(r"ipc(\d+)", l)
        kind = label_kind(l)
        if kind == "imp":
            return (0, int(m.group(1)) if m else 0, l)
        if kind == "then_imp":
            return (1, 0, l)
        return (2, int(i.group(1)) if i else 0, l)
    return sorted(labels, key=key)
