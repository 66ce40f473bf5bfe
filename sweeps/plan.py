"""The plan of a sweep: which trials are complete already, a rough time for each of the others, the
order they start in (longest first), and the list and totals that `--dry-run` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prunelab.blobs import open_root
from prunelab.errors import first_line
from prunelab.evaluation import result_key
from prunelab.store import ChainStore

from .config import Trial, resource_kinds
from .preflight import check_data
from .tracking import client, finished_trial_runs


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


# -- which trials are complete ----------------------------------------------------------------------

def complete_trials(trials: list[Trial], done_runs: dict, store: str) -> set:
    """Keys of the trials whose chain run finished in MLflow and whose results are all in the store."""
    return {t.key for t in trials if t.key in done_runs
            and ChainStore(store, t.chain).complete(result_key(t.evaluation), t.rounds)}


def _complete_without_writing(trials: list[Trial], tracking_uri: str, experiment: str, store: str) -> set:
    """For --dry-run: the complete trials, read from an existing local SQLite store only (creates nothing)."""
    db = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else None
    if not db or not Path(db).is_file() or not open_root(store).list("chains"):
        return set()
    exp = client(tracking_uri).get_experiment_by_name(experiment)
    return complete_trials(trials, finished_trial_runs(tracking_uri, exp.experiment_id), store) if exp else set()


# -- estimates and order ----------------------------------------------------------------------------

def estimates(trials: list[Trial], store: Optional[str] = None) -> dict[str, Optional[float]]:
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


# -- what is printed --------------------------------------------------------------------------------

def _each(res) -> str:
    one = f"{res.cpus_per_trial:g} CPU + {res.gpus_per_trial:g} GPU"
    return one if res.workers_per_trial == 1 else f"{res.workers_per_trial} workers × ({one})"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _hours(h: float) -> str:
    return f"{h:.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2g}"


def print_trials(trials: list[Trial], res, skipped: set, est: dict) -> None:
    """The plan: every trial, longest first, with its estimate (`est`, by key, for those to run)."""
    kinds = resource_kinds(trials) or [res]
    each = f"each {_each(kinds[0])}" if len(kinds) == 1 else "resources per trial below"
    print(f"{len(trials)} trials ({len(skipped)} already complete), {each}; longest first "
          "(~ a rough time left per chain, from its config and what the store holds):")
    for t in longest_first(trials, est):
        mark = "done " if t.key in skipped else "run  "
        own = f"  [{_each(t.resources)}]" if len(kinds) > 1 else ""
        time_s = "" if t.key in skipped else f"~{_duration(est[t.key])}" if est.get(t.key) is not None else "~?"
        print(f"  {mark}{t.key}  {t.label():60s} rounds->{t.chain.pruning.rounds} eval@{t.rounds}"
              f"  {time_s}{own}")


def plan_totals(trials: list[Trial], skipped: set, est: dict) -> str:
    """The plan in one line: trials, chain-hours (the sum of the estimates), GPU-hours after packing
    (a trial holds its gpus_per_trial share of a GPU, on each of its workers, while it runs), CPU-hours
    of the CPU-only trials (their CPUs × workers × time), and the largest trial."""
    todo = [t for t in trials if t.key not in skipped]
    hours = {t.key: est[t.key] / 3600 for t in todo if est.get(t.key) is not None}
    known = [t for t in todo if t.key in hours]
    def held(t, per_worker: float) -> float:
        return per_worker * t.resources.workers_per_trial * hours[t.key]

    gpu = sum(held(t, t.resources.gpus_per_trial) for t in known if t.resources.gpus_per_trial > 0)
    cpu = sum(held(t, t.resources.cpus_per_trial) for t in known if t.resources.gpus_per_trial == 0)
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


def print_plan(trials: list[Trial], res, problems: dict[str, int], tracking_uri: str, experiment: str,
               store: str) -> None:
    """--dry-run: each data problem (one warning line each), every trial with its estimate, the
    totals. Reads what the store and an existing SQLite tracking file hold; writes nothing."""
    for message, n in problems.items():
        print(f"warning: {message} [{n} trial{'s' if n != 1 else ''}]")
    skipped = _complete_without_writing(trials, tracking_uri, experiment, store)
    est = estimates([t for t in trials if t.key not in skipped], store)
    print_trials(trials, res, skipped, est)
    print(plan_totals(trials, skipped, est))


def plan_run(trials: list[Trial], res, done_runs: dict, store: str) -> tuple[set, list[Trial]]:
    """Before a run: prints the plan; returns the keys of the complete trials and the other trials in
    the order they start."""
    skipped = complete_trials(trials, done_runs, store)
    todo = [t for t in trials if t.key not in skipped]
    est = estimates(todo, store)  # what is left of each chain: a resumed one counts less
    print_trials(trials, res, skipped, est)
    return skipped, longest_first(todo, est)
