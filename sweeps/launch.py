"""Running the chains: Ray started or joined, one Ray Tune trial per chain (in the plan's order), and
afterwards, from the store, what the trials could not log to MLflow."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import ray
from ray import tune

from prunelab.blobs import is_uri
from prunelab.errors import ConfigError
from prunelab.schema import RUN_NAME_FORMAT, SPARSITY, TEST_ACCURACY

from . import autoscaler, preflight, sync
from .autoscaler import auth_hint, enable_token_auth_if_available
from .config import Trial
from .tracking import git_commit, latest_trial_runs, source_tags
from .trainable import chain_trial


def init_ray(args, started: list) -> None:
    """Join the cluster at args.address (resolved by the preflight checks), or start a local Ray of
    our own; appends to `started` when this call started a Ray session."""
    if ray.is_initialized():  # the caller's session (e.g. tests) is used as it is
        return
    started.append(True)
    if args.address:
        enable_token_auth_if_available()  # a client does not switch token mode on by itself
        try:
            ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError("--address", f"no Ray cluster at {args.address!r} ({str(e).splitlines()[0]})",
                              auth_hint(e) or "start one with `ray start --head` or drop --address to run "
                              "locally") from None
    else:
        # "local": a new Ray of our own, even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)


def trial_spec(t: Trial, figure: str, local: Path, extra: dict, store: Optional[str] = None,
               synthetic: Optional[str] = None) -> dict:
    """One trial's config as the trainable reads it (`sweeps.trainable.chain_trial`): the result
    `store` (default: `<local>/store`), the synthetic-set store (default: the node's cache)."""
    res = t.resources
    return {"key": t.key, "variant": t.variant, "label": t.label(), "run_name": t.run_name(), "figure": figure,
            "chain": t.chain.to_dict(),
            "chain_hash": t.chain.hash(), "eval": t.evaluation.to_dict(), "rounds": t.rounds,
            "store": store or str(local / "store"), "synthetic_store": synthetic,
            # beside a shared storage path; with a bucket, each node's own cache (the driver's is not there)
            "cache_dir": None if store and is_uri(store) else str(local / "cache"),
            "cpus": res.cpus_per_trial, "gpus": res.gpus_per_trial, "workers": res.workers_per_trial,
            "split_copies": res.split_copies,
            "checkpoint_minutes": res.checkpoint_minutes,
            "memory_fraction": res.memory_fraction or (res.gpus_per_trial or None), **extra}


# What the Tune trial of a data-parallel chain reserves: no CPU or GPU (its Ray Train workers hold
# those in a placement group of their own), and Ray takes no empty request, so the memory of the
# process that launches them and waits
DRIVER_MEMORY = 512 * 2**20


def trial_resources(config: dict) -> dict:
    """Ray resources of one trial (variants may pack their chains more densely than others). A
    data-parallel trial's workers hold theirs themselves (sweeps.trainable)."""
    spec = config["spec"]
    if int(spec.get("workers", 1)) > 1:
        return {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY}
    return {"cpu": spec["cpus"], "gpu": spec.get("gpus", 0)}


def _dirname(trial) -> str:
    spec = trial.config["spec"]
    return f"{spec.get('run_name', spec['variant']).replace(' ', '_')}_{spec['key'][:8]}"


def _trial_name(trial) -> str:
    """What Tune's table calls a trial: the chain's run name (as in MLflow)."""
    spec = trial.config["spec"]
    return spec.get("run_name") or spec["label"]


def run_trials(figure, args, todo, res, storage, local, tracking_uri, exp_id, parent, fault
               ) -> tuple[list[str], list[str]]:
    """Run `todo` (in that order) as one Tune experiment; returns a line per failed trial and a line
    per chain whose results MLflow did not take (after waiting up to --tracking-wait for it)."""
    extra = {"tracking_uri": tracking_uri, "experiment_id": exp_id, "parent_run_id": parent, "git_commit": git_commit(),
             "source_tags": source_tags(figure),
             "fault": fault}
    reopen = latest_trial_runs(tracking_uri, exp_id)
    store, synthetic = preflight.store_root(storage, local), preflight.synthetic_root(storage)
    ray_dir = storage.rstrip("/") + "/ray" if is_uri(storage) else str(local / "ray")
    extra["train_storage"] = f"{ray_dir}/train"  # Ray Train's own records of data-parallel trials
    specs = [trial_spec(t, figure, local, {**extra, "run_id": reopen.get(t.key)}, store, synthetic)
             for t in todo]  # longest first
    name = RUN_NAME_FORMAT.format(figure=figure, preset=args.preset)
    print(f"trial logs (stdout, stderr of each chain): {ray_dir}/{name}/<chain>_<key>/")
    results = _tuner(specs, ray_dir, name, res, args.resume, concurrency(todo, res, args.address)).fit()
    errors, pending = [], []
    for r in results:
        spec = r.config["spec"] if r.config else {}
        metrics = r.metrics or {}
        failure = r.error or metrics.get("failure")
        if failure:
            errors.append(f"{spec.get('label', '?')} [{spec.get('key', '?')}]: {str(failure).strip().splitlines()[-1]}")
        # a trial that gave up leaves its run open; one that finished while MLflow was away left it behind
        if spec and (r.error or metrics.get("unsynced")):
            status = "FAILED" if failure else "FINISHED"
            pending.append((spec, status, str(failure).strip().splitlines()[-1] if failure else "", _run_id(r)))
    return errors, sync.catch_up_all(pending, tracking_uri, args.tracking_wait)


def progress_table() -> tune.CLIReporter:
    """Tune's live table: one row per chain, named as its MLflow run, with the columns that tell
    chains apart and where each one is (the round, its sparsity, the last test accuracy)."""
    # Ray's newer console output ignores a reporter; this keeps Tune's table unless the user chose
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return tune.CLIReporter(
        parameter_columns={"spec/variant": "variant", "spec/chain/model/name": "model",
                           "spec/chain/dataset/name": "data", "spec/chain/pruning_data/ipc": "ipc",
                           "spec/chain/seed": "seed"},
        metric_columns={"round": "round", "epoch": "epoch", SPARSITY: "sparsity", TEST_ACCURACY: "test acc"},
        max_column_length=40, max_report_frequency=30, sort_by_metric=False)


def concurrency(todo: list[Trial], res, address=None) -> Optional[int]:
    """Tune's max_concurrent_trials: the sweep's `max_concurrent`; else, for a sweep of data-parallel
    chains alone on a cluster that cannot grow, as many as its alive nodes hold at once (workers
    placed node by node). Such trials hold no Tune resources (their Ray Train workers do), so Tune
    would start them all at once, and the longest-first order would be lost among their workers'
    pending placement groups. A cluster that can add nodes gets them all: their pending workers are
    what makes it grow."""
    if res.max_concurrent:
        return res.max_concurrent
    if not todo or any(t.resources.workers_per_trial == 1 for t in todo) or autoscaler.can_grow(address):
        return None
    most = max(1, min(autoscaler.alive_capacity(t.resources.cpus_per_trial, t.resources.gpus_per_trial)
                      // t.resources.workers_per_trial for t in todo))
    print(f"data-parallel chains: at most {most} at once (what the cluster's nodes hold; --max-concurrent to change)")
    return most


def _tuner(specs: list[dict], ray_dir: str, name: str, res, resume: bool, max_concurrent: Optional[int] = None
           ) -> tune.Tuner:
    """The Tuner of one trial per spec: restored with --resume when Tune has this sweep's
    bookkeeping, else new (an earlier run's bookkeeping moved aside)."""
    trainable = tune.with_resources(chain_trial, trial_resources)
    path = f"{ray_dir}/{name}"
    run_config = tune.RunConfig(
        # verbose=1: the table alone (2 and 3 print every result of every trial)
        name=name, storage_path=ray_dir, progress_reporter=progress_table(), log_to_file=True, verbose=1,
        failure_config=tune.FailureConfig(max_failures=res.max_failures),
        # every checkpoint is kept (each is a few bytes: the round and the MLflow run id; the chain
        # itself is in the store): keeping only n would make Tune snapshot the whole experiment
        # state every n rounds of every trial
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None))
    if resume and tune.Tuner.can_restore(path):
        print(f"resuming {path}")
        return tune.Tuner.restore(path, trainable, resume_errored=True, param_space={"spec": tune.grid_search(specs)})
    if (not is_uri(path)) and Path(path).exists():
        # a fresh run of the same sweep: Tune's own bookkeeping starts over; the store dedups
        old, n = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}", 1
        while Path(old).exists():
            old, n = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
        os.replace(path, old)
    return tune.Tuner(trainable, param_space={"spec": tune.grid_search(specs)},
                      tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                                  trial_dirname_creator=_dirname,
                                                  trial_name_creator=_trial_name),
                      run_config=run_config)


def _run_id(result) -> Optional[str]:
    """The MLflow run id a trial kept in its last checkpoint, if it made one."""
    try:
        with result.checkpoint.as_directory() as d:
            return json.loads(Path(d, "meta.json").read_text())["run_id"]
    except Exception:  # noqa: BLE001 - no checkpoint (or none readable): the run is found by its key
        return None
