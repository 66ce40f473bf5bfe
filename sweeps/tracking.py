"""MLflow at the edge: the driver creates the store, the experiment and the parent run before any
trial starts; each chain logs into its own child run whose id lives in its checkpoint, so a retried
or restored trial continues the same run. Metrics are synced from the result store by step, so a
crash between computing and logging never loses or duplicates a step."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import yaml

from prunelab import schema
from prunelab.errors import first_line

RETRIES = 5
# MLflow's HTTP client retries a refused connection for minutes by default (7 retries, back-off
# factor 2), and retries POSTs too, which can log a batch twice when only the reply was lost. The
# sweep retries itself (idempotent calls only) and backs off between syncs, so each HTTP call is
# one short attempt.
# MLflow reads these when it makes each request, so setting them before the first one is enough.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 # a progress bar per artifact download would flood the sweep's and the trials' logs
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# what an unreachable or overloaded tracking store looks like, in the message of any exception in
# the chain (MLflow wraps requests' and SQLAlchemy's errors in its own)
OUTAGE_SIGNS = ("connection refused", "max retries exceeded", "failed to establish", "timed out", "timeout",
                "connection reset", "connection aborted", "remote end closed", "name or service not known",
                "temporarily unavailable", "database is locked", "unable to open database",
                "status code 500", "status code 502", "status code 503", "status code 504", "bad gateway",
                "service unavailable")


def is_outage(e: BaseException) -> bool:
    """Whether `e` says the tracking store could not be reached (as opposed to refusing a request)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        name = type(e).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "NewConnectionError",
                    "MaxRetryError", "ProtocolError", "OperationalError"):
            return True
        if any(sign in str(e).lower() for sign in OUTAGE_SIGNS):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def probe(tracking_uri: str) -> Optional[str]:
    """None if the tracking store answers one cheap call, else why not (one attempt, no retries)."""
    try:
        client(tracking_uri).search_experiments(max_results=1)
        return None
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return describe(e)


def describe(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports of a failed MLflow call."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"} with JSON for lists and None."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def retry(fn: Callable, *args, attempts: int = RETRIES, **kwargs):
    """Call `fn`, retrying transient failures (SQLite busy, server restarting) with backoff."""
    delay = 0.5
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the store's errors vary by backend; the last one is raised
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2


def default_tracking_uri(storage: Path) -> str:
    return f"sqlite:///{(storage / 'mlflow.db').resolve()}"  # sqlite:////abs/path: four slashes


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_commit() -> str:
    return (_git("rev-parse", "HEAD") or "").strip() or schema.UNKNOWN_COMMIT


def source_tags(figure: str) -> dict[str, str]:
    """The runs' source: MLflow's standard tags (commit, entry point) and whether tracked files had
    uncommitted changes (`unknown` outside a git checkout, e.g. an installed wheel)."""
    commit = git_commit()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {schema.GIT_COMMIT_TAG: commit, schema.SOURCE_COMMIT_TAG: commit,
            schema.SOURCE_NAME_TAG: f"sweeps/{figure}.py", schema.SOURCE_TYPE_TAG: "LOCAL",
            schema.GIT_DIRTY_TAG: "unknown" if status is None else str(bool(status.strip())).lower()}


def http_defaults() -> None:
    """Set `HTTP_DEFAULTS` in the environment where the user has not set them (their value wins).
    Processes started later (Ray's workers) inherit them."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def client(tracking_uri: str):
    """An MlflowClient for `tracking_uri`, with `HTTP_DEFAULTS` in place before its first request."""
    # imported here: mlflow takes 1.5-2 s to import; the driver (--help, --dry-run) imports this module
    from mlflow.tracking import MlflowClient

    http_defaults()
    return MlflowClient(tracking_uri=tracking_uri)


def artifact_root(tracking_uri: str) -> Optional[str]:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlartifacts/` beside the
    database (MLflow's own default is `./mlruns` of whatever directory the process runs in). A
    tracking server chooses its own (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str, description: str = "") -> str:
    """Create the store (SQLite tables) and the experiment once, in the driver; return its id. The
    experiment is tagged as a model-training one (MLflow's UI otherwise opens it in its GenAI view)
    and carries `description`; tags a user already set are kept."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    wanted = {schema.EXPERIMENT_KIND_TAG: schema.EXPERIMENT_KIND, **({schema.DESCRIPTION_TAG: description}
                                                                     if description else {})}
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_root(tracking_uri), tags=wanted)
    for key, value in wanted.items():
        if key not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def start_parent_run(tracking_uri: str, experiment_id: str, figure: str, preset: str, config: dict,
                     trials: list[dict]) -> str:
    c = client(tracking_uri)
    name = schema.parent_run_name(figure, preset, time.strftime("%Y%m%d-%H%M%S"))
    run = c.create_run(experiment_id, run_name=name,
                       tags={schema.ROLE_TAG: schema.ROLE_SWEEP, schema.FIGURE_TAG: figure,
                             schema.PRESET_TAG: preset, **source_tags(figure)})
    c.log_param(run.info.run_id, schema.PRESET_PARAM, preset)
    c.log_param(run.info.run_id, schema.TRIALS_PARAM, str(len(trials)))
    c.log_text(run.info.run_id, yaml.safe_dump(config, sort_keys=False), schema.SWEEP_CONFIG)
    c.log_text(run.info.run_id, json.dumps(trials, indent=2), schema.SWEEP_TRIALS)
    return run.info.run_id


def finished_trial_runs(tracking_uri: str, experiment_id: str) -> dict[str, str]:
    """trial key -> run id of the latest chain run of each trial that finished in this experiment."""
    finished = schema.tag_filter(schema.STATUS_TAG, schema.STATUS_FINISHED)
    return _trial_runs(tracking_uri, experiment_id, f"and {finished}")


def latest_trial_runs(tracking_uri: str, experiment_id: str) -> dict[str, str]:
    """trial key -> id of the latest chain run of each trial in this experiment, whatever its status.
    A sweep that (re)computes a chain continues that run rather than opening a second one: after a
    failure, an outage of the tracking server, or a damaged stored result."""
    return _trial_runs(tracking_uri, experiment_id)


def _trial_runs(tracking_uri: str, experiment_id: str, extra: str = "") -> dict[str, str]:
    chains = schema.tag_filter(schema.ROLE_TAG, schema.ROLE_CHAIN)
    runs = retry(client(tracking_uri).search_runs, [experiment_id], filter_string=f"{chains} {extra}",
                 max_results=50000, order_by=["attributes.start_time ASC"])
    return {r.data.tags[schema.TRIAL_KEY_TAG]: r.info.run_id for r in runs}  # the latest one wins


def find_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, key: str,
                   attempts: int = RETRIES) -> Optional[str]:
    """The run id of trial `key` under the sweep run `parent_run_id`, or None."""
    under = schema.tag_filter(schema.PARENT_TAG, parent_run_id)
    runs = retry(client(tracking_uri).search_runs, [experiment_id],
                 filter_string=f"{under} and {schema.tag_filter(schema.TRIAL_KEY_TAG, key)}", max_results=10,
                 order_by=["attributes.start_time ASC"], attempts=attempts)
    return runs[0].info.run_id if runs else None


def system_metrics(tracking_uri: str, run_id: str, every_s: float = 10.0):
    """MLflow's system metrics for a run (`system/cpu_utilization_percentage`, memory, and with
    nvidia-ml-py each GPU's utilisation and memory), sampled every `every_s` seconds by a background
    thread until `.finish()`; None where psutil is not installed (`pip install 'prunelab[gpu]'`)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # needs psutil
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


class ChainRun:
    """The child run of one chain, created once and reopened on retry."""

    def __init__(self, tracking_uri: str, run_id: str, attempts: int = RETRIES):
        self.c = client(tracking_uri)
        self.run_id = run_id
        self.attempts = attempts

    def _call(self, fn: Callable, *args, **kwargs):
        return retry(fn, *args, attempts=self.attempts, **kwargs)

    @classmethod
    def open(cls, tracking_uri: str, experiment_id: str, parent_run_id: str, spec: dict,
             run_id: Optional[str] = None, attempts: int = RETRIES) -> "ChainRun":
        if not run_id:
            # a retry that failed before its first checkpoint has no run id in hand: find the run
            # an earlier attempt of this trial opened under this parent, never open a second one
            run_id = find_trial_run(tracking_uri, experiment_id, parent_run_id, spec["key"], attempts)
        if run_id:
            self = cls(tracking_uri, run_id, attempts)
            self._call(self.c.update_run, run_id, status="RUNNING")
            self.set_tag(schema.STATUS_TAG, schema.STATUS_RUNNING)
            return self
        tags = {schema.PARENT_TAG: parent_run_id, schema.ROLE_TAG: schema.ROLE_CHAIN,
                schema.FIGURE_TAG: spec["figure"], schema.CHAIN_HASH_TAG: spec["chain_hash"],
                schema.TRIAL_KEY_TAG: spec["key"], schema.VARIANT_TAG: spec["variant"],
                schema.STATUS_TAG: schema.STATUS_RUNNING,
                schema.GIT_COMMIT_TAG: spec.get("git_commit", schema.UNKNOWN_COMMIT), **spec.get("source_tags", {})}
        c = client(tracking_uri)
        run = retry(c.create_run, experiment_id, run_name=spec.get("run_name") or spec["label"], tags=tags,
                    attempts=attempts)
        self = cls(tracking_uri, run.info.run_id, attempts)
        from mlflow.entities import Param  # mlflow is loaded by client() above; see there why not at the top

        params = flatten(spec["chain"])
        params[schema.EVAL_ROUNDS_PARAM] = ",".join(map(str, spec["rounds"]))
        params[schema.PRIMARY_BN_PARAM] = str(spec.get("eval", {}).get("lmc_hparams", {}).get("bn_mode", "interpolate"))
        params = {k: (v if len(v) <= 6000 else v[:5990] + "...") for k, v in params.items()}
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._call(self.c.log_batch, self.run_id, params=items[i:i + 100])
        return self

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self._call(self.c.get_metric_history, self.run_id, key)}

    def log_steps(self, records: Iterable[tuple[int, dict]], sentinel: str, done: Optional[set[int]] = None) -> int:
        """Log each (step, metrics) whose `sentinel` metric is not yet logged at that step (`done`, when
        the caller has just read them); the sentinel goes in the same batch, so a step is either fully
        logged or not at all."""
        from mlflow.entities import Metric  # mlflow is loaded by client(); see there why not at the top

        done = self.logged_steps(sentinel) if done is None else done
        n = 0
        now = int(time.time() * 1000)
        for step, metrics in records:
            if step in done:
                continue
            batch = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())]
            # one attempt: a retry after a lost reply could log the step twice; the next sync,
            # which checks what is logged first, is the retry
            retry(self.c.log_batch, self.run_id, metrics=batch, attempts=1)
            n += 1
        return n

    def log_metrics(self, metrics: dict, step: int) -> None:
        """One batch of metrics at `step`, tried once."""
        from mlflow.entities import Metric  # mlflow is loaded by client(); see there why not at the top

        now = int(time.time() * 1000)
        retry(self.c.log_batch, self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())],
              attempts=1)

    def set_tag(self, key: str, value: str) -> None:
        self._call(self.c.set_tag, self.run_id, key, value)

    def log_inputs(self, inputs: list[dict]) -> None:
        """Data sets as the run's inputs (MLflow's Datasets panel): each {name, digest, source_type,
        source, context}; descriptions only, no data is copied. Logging one again adds nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag  # loaded by client(); see there

        entries = [DatasetInput(Dataset(i["name"], i["digest"], i["source_type"], i["source"]),
                                [InputTag("mlflow.data.context", i["context"])]) for i in inputs]
        self._call(self.c.log_inputs, self.run_id, datasets=entries)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(self.c.log_text, self.run_id, text, artifact_file)

    def log_file(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._call(self.c.log_artifact, self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED", reason: str = "") -> None:
        self.set_tag(schema.STATUS_TAG, schema.RUN_STATUS[status])
        if reason:
            self.set_tag(schema.FAILURE_TAG, reason[:schema.FAILURE_MAX_CHARS])
        elif status == "FINISHED" and schema.FAILURE_TAG in self._call(self.c.get_run, self.run_id).data.tags:
            # an attempt failed, a retry finished: the reason no longer applies (warnings/ keeps it)
            self._call(self.c.delete_tag, self.run_id, schema.FAILURE_TAG)
        self._call(self.c.set_terminated, self.run_id, status)
