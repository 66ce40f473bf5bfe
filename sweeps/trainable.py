"""The Ray Tune function trainable: one IMP chain per trial, as a thin adapter around
`prunelab.runner.run_chain`; with `resources.workers_per_trial` > 1, the trial launches a Ray Train
TorchTrainer whose workers train the chain data-parallel (`prunelab.parallel`).

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
import uuid
from pathlib import Path
from typing import Optional

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from prunelab import schema
from prunelab.errors import DivergenceError
from prunelab.data import load_dataset
from prunelab.evaluation import EvalHparams
from prunelab.hparams import ChainHparams
from prunelab.parallel import GROUP_TIMEOUT_S, Leader, lead_or_follow
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


def round_hook(spec: dict, r: int, log: Optional[TrialLog] = None, to_tune: bool = True):
    """The training callback of round r: a progress report (epoch and loss of the training on the
    pruning data, at most every PROGRESS_EVERY_S seconds) to the chain's MLflow run and, `to_tune`, to
    Tune, then the spec's injected fault."""
    fault = fault_hook(spec, r)
    last = [time.monotonic()]
    per_round = ChainHparams.from_dict(spec["chain"]).pruning_training.epochs

    def hook(epoch, metrics):
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            loss = float(metrics.get("train_loss", float("nan")))
            if to_tune:
                tune.report({"round": r, "epoch": epoch, "epoch_train_loss": loss})
            if log is not None:
                log.progress({schema.PROGRESS_TRAIN_LOSS: loss, schema.PROGRESS_ROUND: r}, r * per_round + epoch)
        if fault is not None:
            fault(epoch, metrics)

    return hook


class TuneReports:
    """What a one-device trial tells Tune: results, a round's end with a small checkpoint (round,
    MLflow run id), progress inside a round."""

    in_round = True

    @staticmethod
    def result(metrics: dict) -> None:
        tune.report(metrics)

    @staticmethod
    def round(metrics: dict, run_id: str, round: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "meta.json").write_text(json.dumps({"run_id": run_id, "round": round}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


REPORT = "report"  # the follower handler of TrainReports


class TrainReports:
    """What rank 0 of a data-parallel trial tells Tune: every Ray Train worker reports together (a
    report is a barrier of the group), so each result is sent to the followers first (`REPORT`), and
    Ray Train's TuneReportCallback passes rank 0's on to the trial. Nothing is reported inside a
    round (the followers are inside the training's collectives then); the chain's MLflow run still
    gets its progress. No checkpoint: a retried trial finds its MLflow run by the chain's key."""

    in_round = False

    def __init__(self, leader: Leader):
        self.leader = leader

    def result(self, metrics: dict) -> None:
        self.leader.call(REPORT, metrics)
        ray.train.report(metrics)

    def round(self, metrics: dict, run_id: str, round: int) -> None:
        self.result(metrics)


def _environment(spec: dict) -> None:
    if spec.get("cache_dir"):
        os.environ["PRUNELAB_CACHE"] = spec["cache_dir"]
    if spec.get("synthetic_store"):  # in the sweep's bucket, shared by every node
        os.environ[SYNTHETIC_ENV] = spec["synthetic_store"]


def chain_trial(config: dict) -> None:
    """Tune entry point. `config["spec"]` is one trial as made by sweeps.launch.trial_spec."""
    spec = config["spec"]
    if int(spec.get("workers", 1)) > 1:
        return _data_parallel_trial(spec)
    _environment(spec)
    hp = ChainHparams.from_dict(spec["chain"])
    ev = EvalHparams.from_dict(spec["eval"])
    device = trial_device(spec)

    run_id, ckpt = None, tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            run_id = json.loads(Path(d, "meta.json").read_text())["run_id"]
    _trial(spec, hp, ev, device, TuneReports, run_id)


def _trial(spec: dict, hp: ChainHparams, ev: EvalHparams, device, reports, run_id: Optional[str] = None,
           data=None, workers: int = 1) -> None:
    log = TrialLog(spec, run_id or spec.get("run_id"))
    log.open()
    # on a GPU: whether packing chains on it pays shows in its utilisation (MLflow's system metrics)
    monitor = None
    if torch.device(device).type == "cuda" and log.run_id:
        with contextlib.suppress(Exception):  # no system metrics rather than no chain
            monitor = system_metrics(spec["tracking_uri"], log.run_id)
    try:
        _run(spec, hp, ev, device, log, reports, data, workers)
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):  # a metrics thread never fails a chain
                monitor.finish()


def _data_parallel_trial(spec: dict) -> None:
    """A trial of `spec["workers"]` data-parallel workers: a Ray Train TorchTrainer launched from the
    Tune trial (Ray's Tune + Train pattern), rank 0's results passed on to Tune. The trial itself
    holds no resources; its workers hold `cpus` CPUs and, on GPUs, one GPU each. A failed group
    fails the trial, which Tune retries; the chain goes on from the store."""
    gpu = float(spec.get("gpus", 0)) > 0
    resources = {"CPU": float(spec["cpus"]), **({"GPU": 1.0} if gpu else {})}
    trainer = TorchTrainer(
        _chain_worker, train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=GROUP_TIMEOUT_S),
        scaling_config=ScalingConfig(num_workers=int(spec["workers"]), use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{spec['key']}-{uuid.uuid4().hex[:8]}", storage_path=spec["train_storage"],
                             callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0)))
    trainer.fit()


def _chain_worker(config: dict) -> None:
    """One Ray Train worker of a data-parallel trial: rank 0 runs the chain (store, MLflow, reports)
    as a one-device trial would, inside `prunelab.parallel.Leader`; the others follow its trainings."""
    spec = config["spec"]
    _environment(spec)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.get("cpus", 1))))
    device = ray.train.torch.get_device() if float(spec.get("gpus", 0)) > 0 else torch.device("cpu")
    hp = ChainHparams.from_dict(spec["chain"])
    data = load_dataset(hp.dataset)
    sets = {"train": data.train}  # each worker reads the real training set itself; other sets travel
    # a set streamed from host memory (too large for the device) is gathered by the worker's other CPUs
    leader = lead_or_follow(rank, world, device, sets, handlers={REPORT: ray.train.report},
                            split_copies=bool(spec.get("split_copies", True)),
                            num_workers=max(0, int(float(spec.get("cpus", 1))) - 1))
    if leader is None:
        return
    with leader:
        _trial(spec, hp, EvalHparams.from_dict(spec["eval"]), device, TrainReports(leader), data=data, workers=world)


def _run(spec: dict, hp: ChainHparams, ev: EvalHparams, device, log: TrialLog, reports, data=None,
         workers: int = 1) -> None:
    try:
        ctx = ray.get_runtime_context()
        log.tag(schema.NODE_ID_TAG, ctx.get_node_id())  # the latest attempt's node and share of it
        log.tag(schema.RESOURCES_TAG, json.dumps({k: round(v, 4) for k, v in ctx.get_assigned_resources().items()},
                                               sort_keys=True))
        log.tag(schema.WORKERS_TAG, str(workers))
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
        reports.result({"round": chain.round, "evaluated_round": r, **res["metrics"]})

    def stepped(chain, rec: dict) -> None:
        log.sync(chain.state.history)
        reports.round({"round": chain.round, **schema.round_metrics(rec)}, log.run_id, chain.round)

    try:
        chain = run_chain(hp, ev, spec["rounds"], ChainStore(spec["store"], hp), device=device, data=data,
                          on_open=opened, on_round=stepped, on_eval=evaluated,
                          round_callback=lambda r: round_hook(spec, r, log, reports.in_round),
                          checkpoint_every_s=60.0 * float(spec.get("checkpoint_minutes", 10.0)),
                          on_corrupt=lambda msg: log.note(msg, schema.CORRUPT_STATE_NOTE))
        log.finish(chain.state.history, "FINISHED")
        # unsynced: the tracking server was away at the end; the driver logs the rest from the store
        reports.round({"round": chain.round, "done": 1, "unsynced": int(log.behind)}, log.run_id, chain.round)
    except DivergenceError as e:
        # retrying a diverged chain would diverge again: record why, end the trial, spare the retries
        log.finish(history(), "FAILED", f"diverged: {e}")
        reports.result({"failed": 1, "failure": f"diverged: {e}", "unsynced": int(log.behind)})
        return
    except Exception as e:
        # the run stays open for a retry; the reason is recorded now in case there is none
        log.note(traceback.format_exc(), schema.LAST_ERROR_NOTE)
        log.tag(schema.FAILURE_TAG, f"{type(e).__name__}: {e}"[:schema.FAILURE_MAX_CHARS])
        log.sync(history())
        raise
