"""The Ray Tune function trainable: one IMP chain per trial, advanced round by round.

After every round the chain state goes to the result store (the source of truth, shared by every
sweep) and a small checkpoint (round, MLflow run id) goes to Tune; a retried or restored trial picks
up the stored state and its MLflow run. Evaluations already in the store are not recomputed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

from prunelab.chain import Chain
from prunelab.data import load_dataset
from prunelab.errors import DivergenceError
from prunelab.evaluation import EvalHparams, evaluate_round, result_key
from prunelab.hparams import ChainHparams
from prunelab.store import ChainStore

from .tracking import ChainRun, retry

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


def round_metrics(rec: dict) -> dict:
    """The history record of a round in the names of docs/results.md."""
    return {"sparsity": rec["trained_sparsity"], "pruned_sparsity": rec["sparsity"],
            "pruning_accuracy": rec["pruning_accuracy"], "pruning_train_loss": rec["pruning_train_loss"],
            "pruning_set_size": rec["pruning_set_size"], "pruning_images_seen": rec["pruning_images_seen"]}


def _sync(run: ChainRun, store: ChainStore, state, rkey: str, rounds: list[int], artifacts_done: set) -> None:
    """Bring the MLflow run up to date with the store: round metrics, evaluation metrics, artifacts."""
    run.log_steps(((h["round"], round_metrics(h)) for h in state.history), sentinel="pruning_accuracy")
    evals = []
    for r in rounds:
        res = store.load_eval(rkey, r)
        if res is None:
            continue
        if r not in artifacts_done:
            _log_eval_artifacts(run, store, res, r)
            artifacts_done.add(r)
        evals.append((r, res["metrics"]))
    run.log_steps(evals, sentinel="eval_sparsity")


def _log_eval_artifacts(run: ChainRun, store: ChainStore, res: dict, r: int) -> None:
    if res.get("lmc"):
        run.log_text(json.dumps(res["lmc"]), f"lmc/round_{r:02d}.json")
    if res.get("hessian"):
        run.log_text(json.dumps(res["hessian"]), f"hessian/round_{r:02d}.json")
    if res.get("landscape"):
        land = res["landscape"]
        buf = io.BytesIO()
        np.savez(buf, grid=np.asarray(land["loss"]), accuracy=np.asarray(land["accuracy"]),
                 xs=np.asarray(land["xs"]), ys=np.asarray(land["ys"]),
                 coords=np.asarray([c["coords"] for c in land["copies"]]),
                 distances=np.asarray(land["distances"]))
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"round_{r:02d}.npz"
            p.write_bytes(buf.getvalue())
            run.log_file(str(p), "landscape")
    mask_file = store.dir / "rounds" / f"round_{r:02d}.mask.pt"
    if mask_file.exists():  # logged as masks/round_XX.pt (docs/results.md)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"round_{r:02d}.pt"
            p.write_bytes(mask_file.read_bytes())
            run.log_file(str(p), "masks")


def _report(tune, metrics: dict, run_id: str, round: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "meta.json").write_text(json.dumps({"run_id": run_id, "round": round}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _start_mask(hp: ChainHparams, store_root: str, data, device):
    """The mask a combined chain starts from, computing its start chain (via the store) if needed."""
    start_hp = hp.start_chain()
    start_store = ChainStore(store_root, start_hp)
    mask = start_store.mask_at(hp.start_round)
    if mask is None:
        state = start_store.load_state(on_corrupt=print)
        chain = Chain(start_hp, device, data=data, state=state)
        while chain.round < hp.start_round:
            chain.step()
            start_store.save_state(chain.state)
        mask = start_store.mask_at(hp.start_round)
    return mask


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
    run = ChainRun.open(spec["tracking_uri"], spec["experiment_id"], spec["parent_run_id"], spec, run_id)
    try:
        node = ray.get_runtime_context().get_node_id()
        run.c.set_tag(run.run_id, "prunelab.node_id", node)  # the node of the latest attempt
    except Exception:  # noqa: BLE001 - a missing tag must not fail the chain
        pass
    try:
        data = load_dataset(hp.dataset)
        state = store.load_state(on_corrupt=lambda msg: run.log_text(msg, "warnings/corrupt_state.txt"))
        start = {}
        if state is None and hp.start_from is not None:
            start = {"start_mask": _start_mask(hp, spec["store"], data, device), "start_round": hp.start_round}
        chain = Chain(hp, device, data=data, state=state, **start)
        if state is None:
            store.save_state(chain.state)  # round-0 (or start) mask, so evaluations can find it
        artifacts_done: set = set()
        _sync(run, store, chain.state, rkey, rounds, artifacts_done)

        def evaluate_pending(upto: int) -> None:
            for r in rounds:
                if r > upto or store.load_eval(rkey, r) is not None:
                    continue
                mask = store.mask_at(r)
                res = evaluate_round(hp, ev, data, chain.state.rewind_point, mask, r, device)
                store.save_eval(rkey, r, res)
                _sync(run, store, chain.state, rkey, rounds, artifacts_done)
                tune.report({"round": chain.round, "evaluated_round": r, **res["metrics"]})

        evaluate_pending(chain.round)
        last = hp.pruning.rounds
        while chain.round < last:
            rec = chain.step(callback=_fault_hook(spec, chain.round))
            store.save_state(chain.state)
            _sync(run, store, chain.state, rkey, rounds, artifacts_done)
            _report(tune, {"round": chain.round, **round_metrics(rec)}, run.run_id, chain.round)
            evaluate_pending(chain.round)
        evaluate_pending(last)
        run.finish("FINISHED")
        _report(tune, {"round": chain.round, "done": 1}, run.run_id, chain.round)
    except DivergenceError as e:
        # retrying a diverged chain would diverge again: record why, end the trial, spare the retries
        run.finish("FAILED", f"diverged: {e}")
        tune.report({"failed": 1, "failure": f"diverged: {e}"})
        return
    except Exception as e:
        # the run stays open for a retry; the reason is recorded now in case there is none
        try:
            run.log_text(traceback.format_exc(), "warnings/last_error.txt")
            retry(run.c.set_tag, run.run_id, "prunelab.failure", f"{type(e).__name__}: {e}"[:5000])
        except Exception:  # noqa: BLE001 - MLflow trouble must not hide the error itself
            pass
        raise
