"""The Ray Tune function trainable: one IMP chain per trial, advanced round by round.

After every round the chain state goes to the result store (the source of truth, shared by every
sweep) and a small checkpoint (round, MLflow run id) goes to Tune; a retried or restored trial picks
up the stored state and its MLflow run. Evaluations already in the store are not recomputed.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import traceback
from pathlib import Path

import torch

from prunelab.chain import Chain
from prunelab.data import load_dataset
from prunelab.errors import CorruptFileError, DivergenceError
from prunelab.evaluation import EvalHparams, evaluate_round, result_key
from prunelab.hparams import ChainHparams
from prunelab.store import ChainStore

from .sync import TrialLog, round_metrics

# test hook: raise in a given round (a fault injected by the driver, see sweeps.driver.fault_spec).
# The driver reads this variable and carries the fault in each trial's spec: environment variables
# of the driver process do not reach Ray workers that are already running (or on other nodes).
FAIL_ENV = "PRUNELAB_FAIL_AT_ROUND"


def _fault_hook(spec: dict, round: int):
    """The training callback that injects the spec's fault into this round, or None.

    The fault hits mid-round, after the first epoch of training on the pruning data: `raise` raises,
    `kill` ends the worker process with SIGKILL (as a preempted machine would). `attempts` faults are
    injected (0: every attempt); each is counted by a marker file under the result store, which
    survives retries on any node."""
    fault = spec.get("fault")
    if not fault or int(fault["round"]) != round:
        return None
    if fault.get("variant") and fault["variant"] != spec["variant"]:
        return None

    def hit(epoch, metrics):
        marks = Path(spec["store"]) / "faults" / spec["parent_run_id"] / spec["key"]
        marks.mkdir(parents=True, exist_ok=True)
        n = len(list(marks.iterdir()))
        attempts = int(fault.get("attempts", 1))
        if attempts and n >= attempts:
            return
        (marks / f"{n + 1}").touch()
        if fault.get("kind") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injected in round {round} (fault {n + 1} of {attempts or 'every attempt'})")

    return hit


def trial_device(spec: dict) -> str:
    """The device Ray assigned to this trial: its GPU (as `cuda`, which Ray's CUDA_VISIBLE_DEVICES
    maps to the assigned one) or the CPU. Never picks a GPU the trial was not given."""
    import ray

    torch.set_num_threads(max(1, int(spec.get("cpus", 1))))
    if not ray.get_gpu_ids():
        return "cpu"
    frac = spec.get("memory_fraction")
    if frac and frac < 1:
        torch.cuda.set_per_process_memory_fraction(float(frac))
    return "cuda"


def _report(tune, metrics: dict, run_id: str, round: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "meta.json").write_text(json.dumps({"run_id": run_id, "round": round}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


WAIT_POLL_S = 10.0  # how often a trial waiting for another trial's start chain looks again


def _start_mask(hp: ChainHparams, store_root: str, data, device):
    """The mask a combined chain starts from, computing its start chain (via the store) if needed.

    When another trial is computing that chain right now (its mark in the store is fresh), this
    waits for the mask instead of training the same chain a second time; if that trial goes away
    first, this one continues the chain from the store."""
    start_hp = hp.start_chain()
    start_store = ChainStore(store_root, start_hp)
    mask = _stored_mask(start_store, hp.start_round)
    while mask is None and start_store.computing_elsewhere():
        time.sleep(WAIT_POLL_S)
        mask = _stored_mask(start_store, hp.start_round)
    if mask is not None:
        return mask
    state = start_store.load_state(on_corrupt=print)
    mask = start_store.mask_at(hp.start_round, fallback=state)  # a damaged mask is rewritten from the state
    if mask is None:
        with start_store.computing():
            chain = _open_chain(start_hp, state, store_root, data, device)
            while chain.round < hp.start_round:
                chain.step()
                start_store.save_state(chain.state)
        mask = start_store.mask_at(hp.start_round, fallback=chain.state)
    return mask


def _open_chain(hp: ChainHparams, state, store_root: str, data, device) -> Chain:
    """The chain of `hp` continued from its stored `state`, or new: from its start chain's mask
    when it has one (`start_from`), else dense."""
    start = {}
    if state is None and hp.start_from is not None:
        start = {"start_mask": _start_mask(hp, store_root, data, device), "start_round": hp.start_round}
    return Chain(hp, device, data=data, state=state, **start)


def _stored_mask(store: ChainStore, round: int):
    """The stored mask of `round`, or None (also when damaged: the caller repairs it from the state)."""
    try:
        return store.mask_at(round)
    except CorruptFileError:
        return None


def chain_trial(config: dict) -> None:
    """Tune entry point. `config["spec"]` is one trial as made by sweeps.driver."""
    import ray
    from ray import tune

    spec = config["spec"]
    os.environ["PRUNELAB_CACHE"] = spec["cache_dir"]
    hp = ChainHparams.from_dict(spec["chain"])
    ev = EvalHparams.from_dict(spec["eval"])
    rounds = list(spec["rounds"])
    rkey = result_key(ev)
    device = trial_device(spec)
    store = ChainStore(spec["store"], hp)

    run_id, ckpt = None, tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            run_id = json.loads(Path(d, "meta.json").read_text())["run_id"]
    log = TrialLog(spec, run_id or spec.get("run_id"))
    log.open()
    try:
        ctx = ray.get_runtime_context()
        log.tag("prunelab.node_id", ctx.get_node_id())  # the latest attempt's node and share of it
        log.tag("prunelab.resources", json.dumps({k: round(v, 4) for k, v in ctx.get_assigned_resources().items()},
                                                 sort_keys=True))
    except Exception:  # noqa: BLE001 - a missing tag must not fail the chain
        pass
    history: list = []
    try:
        while store.computing_elsewhere():  # the same chain in another trial (another sweep): wait, then reuse
            time.sleep(WAIT_POLL_S)
        with store.computing():  # trials that start from this chain wait for its masks
            data = load_dataset(hp.dataset)
            state = store.load_state(on_corrupt=lambda msg: log.note(msg, "warnings/corrupt_state.txt"))
            chain = _open_chain(hp, state, spec["store"], data, device)
            history = chain.state.history
            if state is None:
                store.save_state(chain.state)  # round-0 (or start) mask, so evaluations can find it
            log.sync(history)  # skipped within the back-off if opening the run just failed

            def evaluate_pending(upto: int) -> None:
                for r in rounds:
                    if r > upto or store.load_eval(rkey, r) is not None:
                        continue
                    mask = store.mask_at(r, fallback=chain.state)
                    res = evaluate_round(hp, ev, data, chain.state.rewind_point, mask, r, device)
                    store.save_eval(rkey, r, res)
                    log.sync(history)
                    tune.report({"round": chain.round, "evaluated_round": r, **res["metrics"]})

            evaluate_pending(chain.round)
            last = hp.pruning.rounds
            while chain.round < last:
                rec = chain.step(callback=_fault_hook(spec, chain.round))
                store.save_state(chain.state)
                log.sync(history)
                _report(tune, {"round": chain.round, **round_metrics(rec)}, log.run_id, chain.round)
                evaluate_pending(chain.round)
            evaluate_pending(last)
            log.finish(history, "FINISHED")
            # unsynced: the tracking server was away at the end; the driver logs the rest from the store
            _report(tune, {"round": chain.round, "done": 1, "unsynced": int(log.behind)}, log.run_id, chain.round)
    except DivergenceError as e:
        # retrying a diverged chain would diverge again: record why, end the trial, spare the retries
        log.finish(history, "FAILED", f"diverged: {e}")
        tune.report({"failed": 1, "failure": f"diverged: {e}", "unsynced": int(log.behind)})
        return
    except Exception as e:
        # the run stays open for a retry; the reason is recorded now in case there is none
        log.note(traceback.format_exc(), "warnings/last_error.txt")
        log.tag("prunelab.failure", f"{type(e).__name__}: {e}"[:5000])
        log.sync(history)
        raise
