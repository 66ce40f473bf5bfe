"""The shared sweep driver behind sweeps/fig*.py: validate, expand, dedup, start Ray, run, report.

    python sweeps/fig6.py                          # demo preset on the embedded digits data, local Ray
    python sweeps/fig6.py --address auto --preset paper --set root=/data/cifar --storage-path s3://bucket/prunelab
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from prunelab.errors import ConfigError, first_line
from prunelab.evaluation import result_key

from .config import Trial, expand, load_sweep
from .autoscaler import check_cluster
from .preflight import check_data, check_local_resources, check_storage, is_uri

RUN_NAME_FORMAT = "{figure}-{preset}"


def parse_args(figure: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python sweeps/{figure}.py",
                                description=f"Run the {figure} sweep: one Ray Tune trial per IMP chain, logged to MLflow.")
    p.add_argument("--preset", default="demo", help="config preset: demo (digits, CPU, minutes) or paper")
    p.add_argument("--config", help="sweep YAML (default: sweeps/configs/%s.yaml)" % figure)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides: chain keys become grid axes (model=resnet18_bn seeds=[0,1] training.epochs=5); "
                        "evaluation.*, resources.*, base.* set sweep fields")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                   help="Ray cluster to join ('auto' for the running one; default: $RAY_ADDRESS); "
                        "none: start a local Ray")
    p.add_argument("--storage-path", help="results: absolute path or s3:// / gs:// URI (default: "
                   "<current directory>/runs, shared by every figure so common chains run once)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file next to the results)")
    p.add_argument("--experiment", help="MLflow experiment name (default: prunelab-%s)" % figure)
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per chain; fractions (0.25) pack chains on a GPU")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per chain")
    p.add_argument("--max-concurrent", type=int, help="most chains at once")
    p.add_argument("--max-failures", type=int, help="retries of a failed chain")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run of this sweep")
    p.add_argument("--dry-run", action="store_true", help="print the trials and their resources, run nothing")
    p.add_argument("--no-analysis", action="store_true", help="skip the figure at the end")
    p.add_argument("--tracking-wait", type=float, default=600.0, metavar="SECONDS",
                   help="how long the driver waits at the end for an unreachable tracking server before it "
                        "lists what was not logged (default 600)")
    # test hook (hidden): ROUND[:ATTEMPTS[:VARIANT[:KIND]]] -- in that round, on the first ATTEMPTS
    # attempts (0: every attempt), in every trial or only in those of VARIANT: raise, or kill the worker
    p.add_argument("--inject-fault", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.storage_path is None:
        args.storage_path = str(Path.cwd() / "runs")
    return args


def fault_spec(args) -> Optional[dict]:
    """The injected fault (test hook) from --inject-fault or the PRUNELAB_FAIL_AT_ROUND variable of
    the driver: it travels in each trial's spec, so it reaches workers on any node."""
    from .trainable import FAIL_ENV

    raw = args.inject_fault or os.environ.get(FAIL_ENV)
    if not raw:
        return None
    parts = str(raw).split(":")
    try:
        fault = {"round": int(parts[0]), "attempts": int(parts[1]) if len(parts) > 1 and parts[1] else 1,
                 "variant": parts[2] if len(parts) > 2 and parts[2] else None,
                 "kind": parts[3] if len(parts) > 3 and parts[3] else "raise"}
    except ValueError:
        raise ConfigError("--inject-fault", f"{raw!r} is not ROUND[:ATTEMPTS[:VARIANT[:KIND]]]",
                          "e.g. 2 (first attempt fails in round 2) or 1:0:imp (every attempt of imp)") from None
    if fault["kind"] not in ("raise", "kill"):
        raise ConfigError("--inject-fault", f"{raw!r}: unknown kind {fault['kind']!r}", "use raise or kill")
    if fault["round"] < 0 or fault["attempts"] < 0:
        raise ConfigError("--inject-fault", f"{raw!r}: round and attempts must be >= 0", "e.g. 2:1")
    return fault


def _overrides(args) -> list:
    from prunelab.cli import parse_overrides

    out = parse_overrides(args.set)
    for flag, key in (("gpus_per_trial", "resources.gpus_per_trial"), ("cpus_per_trial", "resources.cpus_per_trial"),
                      ("max_concurrent", "resources.max_concurrent"), ("max_failures", "resources.max_failures")):
        if getattr(args, flag) is not None:
            out.append((key, getattr(args, flag)))
    return out


def _storage(path: str) -> str:
    if is_uri(path):
        return path
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise ConfigError("--storage-path", f"{path} is relative; trials run in their own directories and "
                          "other nodes cannot resolve it", f"use an absolute path, e.g. {p.resolve()}")
    return str(p.resolve())


def _local_storage(storage: str) -> Path:
    """Where the result store, the MLflow SQLite file and the synthetic-set cache live. For a URI
    storage path, Ray's bookkeeping goes to the URI and the store to PRUNELAB_STORE (shared FS)."""
    if not is_uri(storage):
        return Path(storage)
    shared = os.environ.get("PRUNELAB_STORE")
    if not shared:
        raise ConfigError("--storage-path", f"{storage} is a URI; the chain store needs a shared file system",
                          "also set PRUNELAB_STORE to a directory every node mounts (e.g. NFS)")
    return Path(shared).resolve()


def trial_spec(t: Trial, figure: str, local: Path, extra: dict) -> dict:
    res = t.resources
    return {"key": t.key, "variant": t.variant, "label": t.label(), "figure": figure, "chain": t.chain.to_dict(),
            "chain_hash": t.chain.hash(), "eval": t.evaluation.to_dict(), "rounds": t.rounds,
            "store": str(local / "store"), "cache_dir": str(local / "cache"),
            "cpus": res.cpus_per_trial, "gpus": res.gpus_per_trial,
            "memory_fraction": res.memory_fraction or (res.gpus_per_trial or None), **extra}


def trial_resources(config: dict) -> dict:
    """Ray resources of one trial (variants may pack their chains more densely than others)."""
    spec = config["spec"]
    return {"cpu": spec["cpus"], "gpu": spec.get("gpus", 0)}


def _resource_kinds(trials: list[Trial]) -> list:
    """The distinct resource requests among the trials (each is checked against the cluster)."""
    kinds = []
    for t in trials:
        if t.resources not in kinds:
            kinds.append(t.resources)
    return kinds


def _check_each_kind(trials: list[Trial], check) -> None:
    """`check(resources)` for each distinct request; an error names the variants asking for it when
    variants differ (their own `resources` are what to change)."""
    kinds = _resource_kinds(trials)
    for kind in kinds:
        try:
            check(kind)
        except ConfigError as e:
            if len(kinds) == 1:
                raise
            names = sorted({t.variant for t in trials if t.resources == kind})
            raise ConfigError(e.field, f"{e.problem} (variants {', '.join(names)})",
                              f"{e.fix}, or change variants.<name>.resources") from None


def _each(res) -> str:
    return f"{res.cpus_per_trial:g} CPU + {res.gpus_per_trial:g} GPU"


def estimates(trials: list[Trial], store: Optional[Path] = None) -> dict[str, Optional[float]]:
    """Each trial's rough time (`Trial.estimated_s`; with the result `store`, the time left) by key;
    None where it cannot be estimated (an estimate orders the sweep, it never stops it)."""
    out: dict[str, Optional[float]] = {}
    for t in trials:
        try:
            out[t.key] = t.estimated_s(str(store) if store is not None else None)
        except Exception as e:  # noqa: BLE001
            out[t.key] = None
            print(f"warning: no time estimate for {t.label()} ({first_line(e)}); it starts after the others")
    return out


def longest_first(trials: list[Trial], est: Optional[dict] = None) -> list[Trial]:
    """The trials in the order they start: the longest estimated chain first, so that no long chain
    starts last and leaves the rest of the cluster idle at the end. A chain others start from
    (`start_from`) goes before the earliest of them: they would otherwise compute it themselves.
    Ties keep the grid's order; trials without an estimate go last."""
    est = estimates(trials) if est is None else est
    rank = {t.key: est.get(t.key) or 0.0 for t in trials}
    by_chain: dict[str, list[str]] = {}
    for t in trials:
        by_chain.setdefault(t.chain.hash(), []).append(t.key)
    # (dependent, start) trial keys; a start chain may itself start from another: raise ranks until none moves
    edges = [(t.key, s) for t in trials if t.chain.start_from is not None
             for s in by_chain.get(t.chain.start_chain().hash(), [])]
    moved = True
    while moved:
        moved = False
        for dependent, start in edges:
            if rank[start] < rank[dependent]:
                rank[start], moved = rank[dependent], True
    order = {t.key: i for i, t in enumerate(trials)}
    return sorted(trials, key=lambda t: (-rank[t.key], t.chain.start_from is not None, order[t.key]))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def print_trials(trials: list[Trial], res, skipped: set, est: dict) -> None:
    """The plan: every trial, longest first, with its estimate (`est`, by key, for those to run)."""
    kinds = _resource_kinds(trials) or [res]
    each = f"each {_each(kinds[0])}" if len(kinds) == 1 else "resources per trial below"
    print(f"{len(trials)} trials ({len(skipped)} already complete), {each}; longest first "
          "(~ a rough time left per chain, from its config and what the store holds):")
    for t in longest_first(trials, est):
        mark = "done " if t.key in skipped else "run  "
        own = f"  [{_each(t.resources)}]" if len(kinds) > 1 else ""
        time_s = "" if t.key in skipped else f"~{_duration(est[t.key])}" if est.get(t.key) is not None else "~?"
        print(f"  {mark}{t.key}  {t.label():60s} rounds->{t.chain.pruning.rounds} eval@{t.rounds}"
              f"  {time_s}{own}")


def _hours(h: float) -> str:
    return f"{h:.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2g}"


def plan_totals(trials: list[Trial], skipped: set, est: dict) -> str:
    """The plan in one line: trials, chain-hours (the sum of the estimates), GPU-hours after packing
    (a trial holds its gpus_per_trial share of a GPU while it runs), CPU-hours of the CPU-only trials
    (their CPUs × time), and the largest trial."""
    todo = [t for t in trials if t.key not in skipped]
    hours = {t.key: est[t.key] / 3600 for t in todo if est.get(t.key) is not None}
    known = [t for t in todo if t.key in hours]
    gpu = sum(t.resources.gpus_per_trial * hours[t.key] for t in known if t.resources.gpus_per_trial > 0)
    cpu = sum(t.resources.cpus_per_trial * hours[t.key] for t in known if t.resources.gpus_per_trial == 0)
    parts = [f"total: {len(trials)} trials ({len(todo)} to run), {_hours(sum(hours.values()))} chain-hours"
             + (f" ({len(todo) - len(known)} without estimate)" if len(known) < len(todo) else "")]
    if any(t.resources.gpus_per_trial > 0 for t in known):
        parts.append(f"{_hours(gpu)} GPU-hours with packing")
    if any(t.resources.gpus_per_trial == 0 for t in known):
        parts.append(f"{_hours(cpu)} CPU-hours")
    if known:
        largest = max(known, key=lambda t: hours[t.key])
        parts.append(f"largest: {largest.label()} {_duration(est[largest.key])}")
    return "; ".join(parts)


def data_problems(trials: list[Trial], keep_going: bool = False) -> dict[str, int]:
    """`check_data` for every trial: the first failing check raises. With `keep_going` (planning), each
    distinct problem is kept instead, as {message (field, problem, fix): trials it concerns}."""
    problems: dict[str, int] = {}
    for t in trials:
        found: Optional[list] = [] if keep_going else None
        check_data(t.chain, found)
        for message in dict.fromkeys(str(e) for e in found or ()):  # a trial counts once per problem
            problems[message] = problems.get(message, 0) + 1
    return problems


def _dirname(trial) -> str:
    spec = trial.config["spec"]
    return f"{spec['variant']}_{spec['key'][:10]}"


def main(figure: str, argv=None) -> int:
    args = parse_args(figure, argv)
    started_ray = []
    try:
        return run_sweep(figure, args, started_ray)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if started_ray:  # a Ray the driver started goes with it; a caller's own session stays
            import ray

            ray.shutdown()


def run_sweep(figure: str, args, started_ray: Optional[list] = None) -> int:
    t0 = time.time()
    # 1. everything that can be checked without Ray
    sweep, raw = load_sweep(figure, args.preset, _overrides(args), args.config)
    trials = expand(sweep, figure)
    problems = data_problems(trials, keep_going=args.dry_run)  # without --dry-run the first one raises
    storage = _storage(args.storage_path)
    check_storage(storage, args.address)
    local = _local_storage(storage)
    res = sweep.resources
    fault = fault_spec(args)
    experiment = args.experiment or sweep.experiment or f"prunelab-{figure}"
    from .tracking import default_tracking_uri, ensure_experiment, finished_trial_runs, start_parent_run

    tracking_uri = args.tracking_uri or default_tracking_uri(local)
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        raise ConfigError("--tracking-uri", f"{tracking_uri} is a relative SQLite path; trials run in their own "
                          "directories", "use an absolute path: sqlite:////abs/path/mlflow.db (four slashes)")

    if args.dry_run:
        for message, n in problems.items():
            print(f"warning: {message} [{n} trial{'s' if n != 1 else ''}]")
        skipped = _complete_without_writing(trials, tracking_uri, experiment, local)
        est = estimates([t for t in trials if t.key not in skipped], local / "store")
        print_trials(trials, res, skipped, est)
        print(plan_totals(trials, skipped, est))
        return 0
    import ray

    if not args.address and not ray.is_initialized():
        # checked against the Ray this driver would start
        _check_each_kind(trials, lambda kind: check_local_resources(kind, args.num_cpus))
    if args.address and not ray.is_initialized():
        from prunelab.doctor import resolve_ray_address

        # no cluster there: say so at once (ray.init retries for minutes), before anything is written
        args.address = resolve_ray_address(args.address)

    # 2. MLflow store, experiment and parent run, before any trial can race to create them
    local.mkdir(parents=True, exist_ok=True)
    try:
        exp_id = ensure_experiment(tracking_uri, experiment)
        done_runs = finished_trial_runs(tracking_uri, exp_id)
    except Exception as e:  # noqa: BLE001 - each backend fails in its own way
        raise ConfigError("--tracking-uri", f"the tracking store at {tracking_uri} does not answer ({first_line(e)})",
                          "start the MLflow server (or correct --tracking-uri) and run again; "
                          "`python -m prunelab.doctor --tracking-uri URI` checks it") from None
    skipped = _complete(trials, done_runs, local)
    todo = [t for t in trials if t.key not in skipped]
    est = estimates(todo, local / "store")  # what is left of each chain: a resumed one counts less
    print_trials(trials, res, skipped, est)
    todo = longest_first(todo, est)
    if todo:  # the cluster can run these chains: checked before the sweep leaves any record
        _init_ray(args, res, started_ray if started_ray is not None else [])
        _check_each_kind(todo, lambda kind: check_cluster(kind, args.address, storage))
    # reused trials point at their runs (children of an earlier sweep run); the others get child runs
    summary = [{"key": t.key, "variant": t.variant, "label": t.label(), "chain_hash": t.chain.hash(),
                "rounds": t.rounds, "run_id": done_runs[t.key] if t.key in skipped else None} for t in trials]
    parent = start_parent_run(tracking_uri, exp_id, figure, args.preset, raw, summary)
    print(f"MLflow: experiment {experiment!r} (id {exp_id}), parent run {parent}, tracking URI {tracking_uri}")
    from .tracking import client, describe, find_trial_run, retry

    c = client(tracking_uri)
    errors: list[str] = []
    unlogged: list[str] = []
    analysis_error = tracking_error = ""
    try:
        if todo:
            errors, unlogged = _run_tune(figure, args, todo, res, storage, local, tracking_uri, exp_id, parent,
                                         fault)
        # what follows needs MLflow; if it stayed away, the report below says what it lacks
        if todo and not unlogged:
            try:
                # chains that continued a run of an earlier sweep (--resume, a rerun) log there: list them
                lost = [row for row in summary
                        if row["run_id"] is None and find_trial_run(tracking_uri, exp_id, parent, row["key"]) is None]
                finished = finished_trial_runs(tracking_uri, exp_id) if lost else {}
                for row in lost:
                    row["run_id"] = finished.get(row["key"])
                if any(row["run_id"] for row in lost):
                    retry(c.log_text, parent, json.dumps(summary, indent=2), "sweep/trials.json")
            except Exception as e:  # noqa: BLE001 - the chains are logged; only the sweep run's list is not
                tracking_error = (f"the sweep run {parent} could not record its chains' runs ({describe(e)}); "
                                  "run the same command again to redo it")
        elif not todo:
            print("every trial is already complete: nothing to compute")

        # 3. the figure, from what MLflow holds
        if not args.no_analysis and not unlogged:
            try:
                _analysis(figure, experiment, tracking_uri, local, parent)
            except Exception as e:  # noqa: BLE001 - the chains' results stand; say why there is no figure
                analysis_error = f"{type(e).__name__}: {e}"
    except BaseException:
        with contextlib.suppress(Exception):
            c.set_terminated(parent, "KILLED")  # never leave the sweep run looking alive
        raise
    failed = bool(errors or unlogged or analysis_error or tracking_error)
    try:
        # one attempt when MLflow already stayed away for --tracking-wait
        retry(c.set_terminated, parent, "FAILED" if failed else "FINISHED", attempts=1 if unlogged else 5)
    except Exception as e:  # noqa: BLE001
        tracking_error = tracking_error or f"the sweep run {parent} could not be closed ({describe(e)})"
    print(f"sweep finished in {time.time() - t0:.0f} s: {len(trials)} trials, {len(todo)} run, "
          f"{len(skipped)} reused, {len(errors)} failed" + (f", {len(unlogged)} not logged to MLflow" if unlogged else ""))
    print(f"browse: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)")
    if unlogged:
        print(f"not logged: the tracking store at {tracking_uri} did not take these chains' results; every "
              "result is in the chain store (one folder per chain, below). Run the same command again once it "
              "answers: the finished chains are logged from the store without training.", file=sys.stderr)
        for line in unlogged:
            print(f"  {line}", file=sys.stderr)
    if errors:
        print("failed trials:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
    if analysis_error:
        print(f"analysis failed: {analysis_error}", file=sys.stderr)
    if tracking_error:
        print(f"MLflow: {tracking_error}", file=sys.stderr)
    return 1 if failed else 0


def _complete(trials: list[Trial], done_runs: dict, local: Path) -> set:
    """Keys of the trials whose chain run finished in MLflow and whose results are all in the store."""
    from prunelab.store import ChainStore

    return {t.key for t in trials if t.key in done_runs
            and ChainStore(local / "store", t.chain).complete(result_key(t.evaluation), t.rounds)}


def _complete_without_writing(trials: list[Trial], tracking_uri: str, experiment: str, local: Path) -> set:
    """For --dry-run: the complete trials, read from an existing local SQLite store only (creates nothing)."""
    db = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else None
    if not db or not Path(db).is_file() or not (local / "store").is_dir():
        return set()
    from .tracking import client, finished_trial_runs

    exp = client(tracking_uri).get_experiment_by_name(experiment)
    return _complete(trials, finished_trial_runs(tracking_uri, exp.experiment_id), local) if exp else set()


def _init_ray(args, res, started: list):
    import ray

    if ray.is_initialized():  # the caller's session (e.g. tests) is used as it is
        return ray
    started.append(True)
    if args.address:  # resolved by run_sweep: a cluster answers there
        from .autoscaler import auth_hint, enable_token_auth_if_available

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
    return ray


def _run_tune(figure, args, todo, res, storage, local, tracking_uri, exp_id, parent, fault
              ) -> tuple[list[str], list[str]]:
    from ray import tune

    from .trainable import chain_trial
    from .tracking import git_commit, latest_trial_runs

    extra = {"tracking_uri": tracking_uri, "experiment_id": exp_id, "parent_run_id": parent, "git_commit": git_commit(),
             "fault": fault}
    reopen = latest_trial_runs(tracking_uri, exp_id)
    specs = [trial_spec(t, figure, local, {**extra, "run_id": reopen.get(t.key)}) for t in todo]  # longest first
    trainable = tune.with_resources(chain_trial, trial_resources)
    ray_dir = storage.rstrip("/") + "/ray" if is_uri(storage) else str(local / "ray")
    name = RUN_NAME_FORMAT.format(figure=figure, preset=args.preset)
    path = f"{ray_dir}/{name}"
    run_config = tune.RunConfig(
        name=name, storage_path=ray_dir,
        failure_config=tune.FailureConfig(max_failures=res.max_failures),
        # every checkpoint is kept (each is a few bytes: the round and the MLflow run id; the chain
        # itself is in the store): keeping only n would make Tune snapshot the whole experiment
        # state every n rounds of every trial
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None))
    if args.resume and tune.Tuner.can_restore(path):
        print(f"resuming {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True,
                                   param_space={"spec": tune.grid_search(specs)})
    else:
        if (not is_uri(path)) and Path(path).exists():
            # a fresh run of the same sweep: Tune's own bookkeeping starts over; the store dedups
            old, n = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}", 1
            while Path(old).exists():
                old, n = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
            os.replace(path, old)
        tuner = tune.Tuner(trainable, param_space={"spec": tune.grid_search(specs)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent or None,
                                                       trial_dirname_creator=_dirname),
                           run_config=run_config)
    results = tuner.fit()
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
    return errors, _catch_up(pending, tracking_uri, args.tracking_wait)


def _run_id(result) -> Optional[str]:
    """The MLflow run id a trial kept in its last checkpoint, if it made one."""
    try:
        with result.checkpoint.as_directory() as d:
            return json.loads(Path(d, "meta.json").read_text())["run_id"]
    except Exception:  # noqa: BLE001 - no checkpoint (or none readable): the run is found by its key
        return None


def _catch_up(pending: list, tracking_uri: str, wait_s: float) -> list[str]:
    """Log from the store what the trials could not, waiting up to `wait_s` for an unreachable
    tracking server (a request it refuses is not waited for); returns a line per trial still not
    logged, naming the store folder that holds its results."""
    from .sync import catch_up
    from .tracking import probe

    deadline = time.time() + wait_s
    everyone = [spec for spec, *_ in pending]
    why: dict[str, str] = {}
    refused: set = set()
    said = False
    while pending:
        down = probe(tracking_uri)  # one cheap call, so that a pass over many chains is not many timeouts
        if down is None:
            for spec, status, reason, run_id in pending:
                log = catch_up(spec, status, reason, run_id)
                if not log.behind:
                    why.pop(spec["key"], None)
                    continue
                why[spec["key"]] = log.last_error
                if not log.outage:
                    refused.add(spec["key"])
                if log.outage or time.time() >= deadline:
                    break  # the server went away again: wait (or give up) before the next chain
            pending = [p for p in pending if p[0]["key"] in why and p[0]["key"] not in refused]
        else:
            for spec, *_ in pending:
                why[spec["key"]] = down
        if not pending or time.time() >= deadline:
            break
        if not said:
            print(f"MLflow at {tracking_uri} does not answer ({next(iter(why.values()))}): waiting up to "
                  f"{wait_s:.0f} s to log {len(pending)} chain(s) from the store", flush=True)
            said = True
        time.sleep(min(10.0, max(0.0, deadline - time.time())))
    return [f"{spec['label']} [{spec['key']}]: {why[spec['key']]}; results in "
            f"{Path(spec['store']) / 'chains' / spec['chain_hash']}" for spec in everyone if spec["key"] in why]


def _analysis(figure: str, experiment: str, tracking_uri: str, local: Path, parent: str) -> Optional[dict]:
    try:
        import analysis
    except ImportError as e:
        print(f"analysis skipped: {e}")
        return None
    out = local / "figures" / figure
    result = analysis.run(figure, experiment, tracking_uri, out, parent_run_id=parent)
    for p in result.get("figures", []):
        print(f"figure: {p}")
    for p in result.get("tables", []):
        print(f"table:  {p}")
    if result.get("report"):
        print(f"report: {result['report']}")
    for m in result.get("missing", []):
        print(f"missing: {m}")
    return result
