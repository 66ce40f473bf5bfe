"""The shared sweep driver behind sweeps/fig*.py: the command line, and a sweep as its steps: the
config (`sweeps.config`), the plan (`sweeps.plan`), the checks before compute (`sweeps.preflight`),
the chains and their MLflow catch-up (`sweeps.launch`), the figure (`analysis`), the report.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prunelab.cli import parse_overrides
from prunelab.errors import ConfigError, first_line
from prunelab.schema import REUSED_BY_TAG, SWEEP_TRIALS, experiment_name

from . import plan, preflight
from .config import expand, figure_description, load_sweep, preset_names
from .faults import fault_spec
from .tracking import (client, default_tracking_uri, describe, ensure_experiment, find_trial_run,
                       finished_trial_runs, retry, start_parent_run)


EPILOG = """examples:
  python sweeps/{figure}.py                       demo preset: digits, CPU, minutes
  python sweeps/{figure}.py --preset paper --dry-run
                                                 the paper's trials and GPU-hours, nothing run
  python sweeps/{figure}.py --set seeds=[0,1,2] ipc=[1,10]
                                                 chain keys become grid axes (ipc only where a variant uses it)
  python sweeps/{figure}.py --set variants.distilled.grid.pruning_data.ipc=[1,5]
                                                 one variant's own axis
  python sweeps/{figure}.py --address auto --preset paper --set root=/data/cifar
      --storage-path s3://bucket/prunelab --tracking-uri http://head:5000
                                                 on a cluster: results in a bucket, MLflow on the head

environment:
  RAY_ADDRESS              the Ray cluster --address defaults to
  MLFLOW_TRACKING_URI      the tracking store --tracking-uri defaults to
  PRUNELAB_CACHE           the machine's cache (synthetic sets, decoded data, fingerprints; ~/.cache/prunelab)
  PRUNELAB_STORE           the chain store somewhere other than <storage-path>/store
  PRUNELAB_SYNTHETIC_STORE the distilled sets (default <cache>/synthetic; <storage-path>/synthetic for a bucket)
  PRUNELAB_SHARED_STORAGE  1: a local --storage-path is on a file system every node mounts
  PRUNELAB_LOCAL           the driver's files (figures, SQLite) when --storage-path is a bucket
  AWS_ENDPOINT_URL, AWS_*, GOOGLE_APPLICATION_CREDENTIALS
                           a bucket's endpoint and credentials, as the SDKs read them
"""


def parse_args(figure: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python sweeps/{figure}.py",
                                description=f"Run the {figure} sweep: one Ray Tune trial per IMP chain, logged to MLflow.",
                                epilog=EPILOG.format(figure=figure), formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = preset_names(figure)
    p.add_argument("--preset", default="demo", metavar="{" + ",".join(presets) + "}" if presets else None,
                   help=f"config preset of sweeps/configs/{figure}.yaml (default demo: digits, CPU, minutes; "
                        "paper: the paper's settings, given its data roots; paper-builtin: paper with every "
                        "synthetic set distilled by prunelab)")
    p.add_argument("--config", help="sweep YAML (default: sweeps/configs/%s.yaml)" % figure)
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides: chain keys become grid axes (model=resnet18_bn seeds=[0,1] training.epochs=5); "
                        "evaluation.*, resources.*, base.* set sweep fields")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                   help="Ray cluster to join ('auto' for the running one; default: $RAY_ADDRESS); "
                        "none: start a local Ray")
    p.add_argument("--storage-path", help="results: absolute path or s3:// / gs:// URI (default: "
                   "<current directory>/runs, shared by every figure so common chains run once)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite file next to the results)")
    p.add_argument("--experiment", help=f"MLflow experiment name (default: {experiment_name(figure)})")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per chain; fractions (0.25) pack chains on a GPU")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per chain (per worker with --workers-per-trial)")
    p.add_argument("--workers-per-trial", type=int,
                   help="train each chain data-parallel on this many Ray Train workers (GPUs with --gpus-per-trial 1)")
    p.add_argument("--max-concurrent", type=int, help="most chains at once")
    p.add_argument("--max-failures", type=int, help="retries of a failed chain")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run of this sweep")
    p.add_argument("--dry-run", action="store_true", help="print the trials and their resources, run nothing")
    p.add_argument("--no-analysis", action="store_true", help="skip the figure at the end")
    p.add_argument("--tracking-wait", type=float, default=600.0, metavar="SECONDS",
                   help="how long the driver waits at the end for an unreachable tracking server before it "
                        "lists what was not logged (default 600)")
    # test hook (hidden, sweeps.faults): ROUND[:ATTEMPTS[:VARIANT[:KIND]]] -- in that round, on the first
    # ATTEMPTS attempts (0: every attempt), in every trial or only in those of VARIANT: raise, or kill the worker
    p.add_argument("--inject-fault", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.storage_path is None:
        args.storage_path = str(Path.cwd() / "runs")
    return args


def runs_page(ui: str, experiment_id: Optional[str]) -> str:
    """The experiment's runs table in MLflow's model-training view (without `workflowType` a fresh
    browser opens MLflow 3.17's GenAI view, whatever the experiment's kind tag says)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else ui


def browse_hint(tracking_uri: str, experiment_id: Optional[str] = None) -> str:
    """How to look at the runs: a tracking server's own address, or the UI to start over a local
    store; with the experiment, the link to its runs table (chains under the sweep run's row; the
    chart view overlays their LMC curves)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {runs_page(tracking_uri, experiment_id)} in a browser (the tracking server's UI)"
    return (f"mlflow ui --backend-store-uri {tracking_uri}   (then open "
            f"{runs_page('http://127.0.0.1:5000', experiment_id)})")


def _overrides(args) -> list:
    """--set and the resource flags, as (key, value) overrides of the preset."""
    out = parse_overrides(args.set)
    for flag, key in (("gpus_per_trial", "resources.gpus_per_trial"), ("cpus_per_trial", "resources.cpus_per_trial"),
                      ("workers_per_trial", "resources.workers_per_trial"),
                      ("max_concurrent", "resources.max_concurrent"), ("max_failures", "resources.max_failures")):
        if getattr(args, flag) is not None:
            out.append((key, getattr(args, flag)))
    return out


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
            import ray  # loaded already when the driver started it; --help and --dry-run go without it

            ray.shutdown()


@dataclass
class Outcome:
    """What went wrong once the sweep ran; any of it makes the exit code 1."""

    errors: list[str] = field(default_factory=list)  # a line per failed trial
    unlogged: list[str] = field(default_factory=list)  # a line per chain whose results MLflow did not take
    analysis_error: str = ""
    tracking_error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.unlogged or self.analysis_error or self.tracking_error)


def run_sweep(figure: str, args, started_ray: Optional[list] = None) -> int:
    """One sweep, step by step; returns the exit code. A ConfigError stops it before it costs compute."""
    t0 = time.time()
    # 1. everything that can be checked without Ray
    sweep, raw = load_sweep(figure, args.preset, _overrides(args), args.config)
    trials = expand(sweep, figure)
    preflight.check_workers(trials)
    problems = plan.data_problems(trials, keep_going=args.dry_run)  # without --dry-run the first one raises
    storage = preflight.storage_path(args.storage_path)
    preflight.check_storage(storage, args.address)
    local = preflight.local_storage(storage)
    store = preflight.store_root(storage, local)
    fault = fault_spec(args)
    experiment = args.experiment or sweep.experiment or experiment_name(figure)
    tracking_uri = args.tracking_uri or default_tracking_uri(local)
    preflight.check_tracking_uri(tracking_uri)
    if args.dry_run:
        plan.print_plan(trials, sweep.resources, problems, tracking_uri, experiment, store)
        return 0
    from . import launch  # imports Ray Tune (~1.5 s): --dry-run and --help go without it

    args.address = preflight.check_before_ray(trials, args.address, args.num_cpus)

    # 2. MLflow store, experiment and parent run, before any trial can race to create them
    exp_id, done_runs = _open_experiment(tracking_uri, experiment, local, figure_description(figure, args.config))
    skipped, todo = plan.plan_run(trials, sweep.resources, done_runs, store)
    if todo:  # the cluster can run these chains: checked before the sweep leaves any record
        launch.init_ray(args, started_ray if started_ray is not None else [])
        preflight.check_cluster_resources(todo, args.address, storage)
        preflight.check_tracking_reach(tracking_uri, args.address)
    if not todo and args.no_analysis:  # nothing to compute or draw: no sweep run to leave behind
        print("every trial is already complete: nothing to compute, and --no-analysis: nothing to draw")
        print(f"browse: {browse_hint(tracking_uri, exp_id)}")
        return 0
    # reused trials point at their runs (children of an earlier sweep run); the others get child runs
    summary = [{"key": t.key, "variant": t.variant, "label": t.label(), "run_name": t.run_name(),
                "chain_hash": t.chain.hash(), "rounds": t.rounds,
                "run_id": done_runs[t.key] if t.key in skipped else None} for t in trials]
    parent = start_parent_run(tracking_uri, exp_id, figure, args.preset, raw, summary)
    print(f"MLflow: experiment {experiment!r} (id {exp_id}), parent run {parent}, tracking URI {tracking_uri}")
    _link_reused(client(tracking_uri), parent, [row["run_id"] for row in summary if row["run_id"]])

    # 3. the chains (and what MLflow missed of them), then the figure from what MLflow holds
    c = client(tracking_uri)
    out = Outcome()
    try:
        if todo:
            out.errors, out.unlogged = launch.run_trials(figure, args, todo, sweep.resources, storage, local,
                                                         tracking_uri, exp_id, parent, fault)
        # what follows needs MLflow; if it stayed away, the report below says what it lacks
        if todo and not out.unlogged:
            out.tracking_error = _record_chain_runs(c, tracking_uri, exp_id, parent, summary)
        elif not todo:
            print("every trial is already complete: nothing to compute")
        if not args.no_analysis and not out.unlogged:
            try:
                _analysis(figure, experiment, tracking_uri, local, parent)
            except Exception as e:  # noqa: BLE001 - the chains' results stand; say why there is no figure
                out.analysis_error = f"{type(e).__name__}: {e}"
    except BaseException:
        with contextlib.suppress(Exception):
            c.set_terminated(parent, "KILLED")  # never leave the sweep run looking alive
        raise
    # 4. the sweep run closed, and what happened
    return _finish(c, parent, out, tracking_uri, t0, (len(trials), len(todo), len(skipped)), exp_id)


def _link_reused(c, parent: str, run_ids: list[str]) -> None:
    """Chain runs this sweep reuses (children of an earlier sweep run) name it in a tag; the sweep
    run's `sweep/trials.json` lists them. A tag that cannot be set changes nothing else."""
    for run_id in run_ids:
        with contextlib.suppress(Exception):
            c.set_tag(run_id, REUSED_BY_TAG, parent)


def _open_experiment(tracking_uri: str, experiment: str, local: Path, description: str = "") -> tuple[str, dict]:
    """The experiment's id (store and experiment created if new, with `description`) and its finished
    chain runs by trial key."""
    local.mkdir(parents=True, exist_ok=True)
    try:
        exp_id = ensure_experiment(tracking_uri, experiment, description)
        return exp_id, finished_trial_runs(tracking_uri, exp_id)
    except Exception as e:  # noqa: BLE001 - each backend fails in its own way
        raise ConfigError("--tracking-uri", f"the tracking store at {tracking_uri} does not answer ({first_line(e)})",
                          "start the MLflow server (or correct --tracking-uri) and run again; "
                          "`python -m sweeps.doctor --tracking-uri URI` checks it") from None


def _record_chain_runs(c, tracking_uri: str, exp_id: str, parent: str, summary: list[dict]) -> str:
    """Chains that continued a run of an earlier sweep (--resume, a rerun) logged there: the sweep run's
    list of trials gets those runs. Returns why it could not, or ''."""
    try:
        lost = [row for row in summary
                if row["run_id"] is None and find_trial_run(tracking_uri, exp_id, parent, row["key"]) is None]
        finished = finished_trial_runs(tracking_uri, exp_id) if lost else {}
        for row in lost:
            row["run_id"] = finished.get(row["key"])
        if any(row["run_id"] for row in lost):
            retry(c.log_text, parent, json.dumps(summary, indent=2), SWEEP_TRIALS)
    except Exception as e:  # noqa: BLE001 - the chains are logged; only the sweep run's list is not
        return (f"the sweep run {parent} could not record its chains' runs ({describe(e)}); "
                "run the same command again to redo it")
    return ""


def _analysis(figure: str, experiment: str, tracking_uri: str, local: Path, parent: str) -> Optional[dict]:
    """The figure from what MLflow holds, its files printed."""
    try:
        import analysis  # guarded: a failed import skips the figure, not the sweep
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


def _finish(c, parent: str, out: Outcome, tracking_uri: str, t0: float, counts: tuple[int, int, int],
            experiment_id: Optional[str] = None) -> int:
    """Close the sweep run (FAILED when anything failed) and say how the sweep went: its trials
    (`counts`: all, run, reused) and each problem. Returns the exit code, which a sweep run that
    cannot be closed does not change (that is reported)."""
    failed = out.failed
    try:
        # one attempt when MLflow already stayed away for --tracking-wait
        retry(c.set_terminated, parent, "FAILED" if failed else "FINISHED", attempts=1 if out.unlogged else 5)
    except Exception as e:  # noqa: BLE001
        out.tracking_error = out.tracking_error or f"the sweep run {parent} could not be closed ({describe(e)})"
    n, run, reused = counts
    print(f"sweep finished in {time.time() - t0:.0f} s: {n} trials, {run} run, {reused} reused, {len(out.errors)} "
          "failed" + (f", {len(out.unlogged)} not logged to MLflow" if out.unlogged else ""))
    print(f"browse: {browse_hint(tracking_uri, experiment_id)}")
    if out.unlogged:
        print(f"not logged: the tracking store at {tracking_uri} did not take these chains' results; every "
              "result is in the chain store (one folder per chain, below). Run the same command again once it "
              "answers: the finished chains are logged from the store without training.", file=sys.stderr)
        for line in out.unlogged:
            print(f"  {line}", file=sys.stderr)
    if out.errors:
        print("failed trials:", file=sys.stderr)
        for e in out.errors:
            print(f"  {e}", file=sys.stderr)
    if out.analysis_error:
        print(f"analysis failed: {out.analysis_error}", file=sys.stderr)
    if out.tracking_error:
        print(f"MLflow: {out.tracking_error}", file=sys.stderr)
    return 1 if failed else 0
