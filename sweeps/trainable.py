"""The Ray Tune function trainable: one IMP chain per trial, as a thin adapter around
`prunelab.runner.run_chain`.

The chain runner does the work through the result store (the source of truth, shared by every
sweep); this adapter adds what belongs to Tune and MLflow: the trial's device, a report and a small
checkpoint (round, MLflow run id) after every round, the chain's MLflow run kept in step with the
store (`sweeps.sync.TrialLog`), and the trial's outcome. A retried or restored trial picks up the
stored state and its MLflow run; evaluations already in the store are not recomputed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import ray
import torch
from ray import tune

from prunelab import schema
from prunelab.errors import DivergenceError
from prunelab.evaluation import EvalHparams
from prunelab.hparams import ChainHparams
from prunelab.runner import run_chain
from prunelab.store import ChainStore
from prunelab.synthetic.store import ENV as SYNTHETIC_ENV

from .faults import fault_hook
from .sync import TrialLog, dataset_inputs
from .tracking import system_metrics


def trial_device(spec: dict) -> str:
    """The device Ray assigned to this trial: its GPU (as `cuda`, which Ray's CUDA_VISIBLE_DEVICES
    maps to the assigned one) or the CPU. Never picks a GPU the trial was not given."""
    torch.set_num_threads(max(1, int(spec.get("cpus", 1))))
    if not ray.get_gpu_ids():
        return "cpu"
    frac = spec.get("memory_fraction")
    if frac and frac < 1:
        torch.cuda.set_per_process_memory_fraction(float(frac))
    return "cuda"


PROGRESS_EVERY_S = 10.0  # the most often a trial reports its progress inside a round to Tune


def round_hook(spec: dict, r: int, log: Optional[TrialLog] = None):
    """The training callback of round r: a progress report to Tune and to the chain's MLflow run
    (epoch and loss of the training on the pruning data, at most every PROGRESS_EVERY_S seconds),
    then the spec's injected fault."""
    fault = fault_hook(spec, r)
    last = [time.monotonic()]
    per_round = ChainHparams.from_dict(spec["chain"]).pruning_training.epochs

    def hook(epoch, metrics):
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            loss = float(metrics.get("train_loss", float("nan")))
            tune.report({"round": r, "epoch": epoch, "epoch_train_loss": loss})
            if log is not None:
                log.progress({schema.PROGRESS_TRAIN_LOSS: loss, schema.PROGRESS_ROUND: r}, r * per_round + epoch)
        if fault is not None:
            fault(epoch, metrics)

    return hook


def _report(metrics: dict, run_id: str, round: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "meta.json").write_text(json.dumps({"run_id": run_id, "round": round}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def chain_trial(config: dict) -> None:
    """Tune entry point. `config["spec"]` is one trial as made by sweeps.launch.trial_spec."""
    spec = config["spec"]
    if spec.get("cache_dir"):
        os.environ["PRUNELAB_CACHE"] = spec["cache_dir"]
    if spec.get("synthetic_store"):  # in the sweep's bucket, shared by every node
        os.environ[SYNTHETIC_ENV] = spec["synthetic_store"]
    hp = ChainHparams.from_dict(spec["chain"])
    ev = EvalHparams.from_dict(spec["eval"])
    device = trial_device(spec)

    run_id, ckpt = None, tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            run_id = json.loads(Path(d, "meta.json").read_text())["run_id"]
    log = TrialLog(spec, run_id or spec.get("run_id"))
    log.open()
    # on a GPU: whether packing chains on it pays shows in its utilisation (MLflow's system metrics)
    monitor = None
    if device == "cuda" and log.run_id:
        with contextlib.suppress(Exception):  # no system metrics rather than no chain
            monitor = system_metrics(spec["tracking_uri"], log.run_id)
    try:
        _run(spec, hp, ev, device, log)
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):  # a metrics thread never fails a chain
                monitor.finish()


def _run(spec: dict, hp: ChainHparams, ev: EvalHparams, device: str, log: TrialLog) -> None:
    try:
        ctx = ray.get_runtime_context()
        log.tag(schema.NODE_ID_TAG, ctx.get_node_id())  # the latest attempt's node and share of it
        log.tag(schema.RESOURCES_TAG, json.dumps({k: round(v, 4) for k, v in ctx.get_assigned_resources().items()},
                                               sort_keys=True))
    except Exception:  # noqa: BLE001 - a missing tag must not fail the chain
        pass
    opened_chain: list = []  # the chain once opened: its history is what a failed trial still logs

    def history() -> list:
        return opened_chain[-1].state.history if opened_chain else []

    def opened(chain) -> None:
        opened_chain.append(chain)
        log.inputs(dataset_inputs(hp, getattr(chain.pruning_data, "meta", None)))
        log.weights(chain.state.init, chain.state.rewind)
        log.sync(chain.state.history)  # skipped within the back-off if opening the run just failed

    def evaluated(chain, r: int, res: dict) -> None:
        log.sync(chain.state.history)
        tune.report({"round": chain.round, "evaluated_round": r, **res["metrics"]})

    def stepped(chain, rec: dict) -> None:
        log.sync(chain.state.history)
        _report({"round": chain.round, **schema.round_metrics(rec)}, log.run_id, chain.round)

    try:
        chain = run_chain(hp, ev, spec["rounds"], ChainStore(spec["store"], hp), device=device,
                          on_open=opened, on_round=stepped, on_eval=evaluated,
                          round_callback=lambda r: round_hook(spec, r, log),
                          checkpoint_every_s=60.0 * float(spec.get("checkpoint_minutes", 10.0)),
                          on_corrupt=lambda msg: log.note(msg, schema.CORRUPT_STATE_NOTE))
        log.finish(chain.state.history, "FINISHED")
        # unsynced: the tracking server was away at the end; the driver logs the rest from the store
        _report({"round": chain.round, "done": 1, "unsynced": int(log.behind)}, log.run_id, chain.round)
    except DivergenceError as e:
        # retrying a diverged chain would diverge again: record why, end the trial, spare the retries
        log.finish(history(), "FAILED", f"diverged: {e}")
        tune.report({"failed": 1, "failure": f"diverged: {e}", "unsynced": int(log.behind)})
        return
    except Exception as e:
        # the run stays open for a retry; the reason is recorded now in case there is none
        log.note(traceback.format_exc(), schema.LAST_ERROR_NOTE)
        log.tag(schema.FAILURE_TAG, f"{type(e).__name__}: {e}"[:schema.FAILURE_MAX_CHARS])
        log.sync(history())
        raise
