"""Bringing a chain's MLflow run up to date with the result store, through tracking-server outages.

The result store holds everything a chain computed; MLflow is a copy of it for people to read. So a
tracking server that is away must not stop training: a `TrialLog` tries, and when the server does not
answer it notes that the run is behind and tries again later (at a round boundary, after a back-off).
Every sync logs each round and evaluation at most once (by step), so catching up after an outage
repeats nothing. What a trial could not log, the driver logs at the end of the sweep (`catch_up`).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from prunelab.evaluation import EvalHparams, result_key
from prunelab.hparams import ChainHparams, data_fingerprint
from prunelab.masks import Mask
from prunelab import blobs, schema
from prunelab.schema import round_metrics  # also this module's: `from sweeps.sync import round_metrics`
from prunelab.store import ChainStore

from .tracking import ChainRun, describe, is_outage, probe

# attempts of one MLflow call inside a trial before it counts the server as away (each call also
# retries inside MLflow's HTTP client, see tracking.HTTP_DEFAULTS)
TRIAL_ATTEMPTS = 3
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 300.0


def sync_run(run: ChainRun, store: ChainStore, history: list[dict], rkey: str, rounds: list[int],
             logged: set, masks_every_round: bool = False) -> None:
    """Log what the store holds and the run lacks: round metrics, evaluation metrics, artifacts.

    `logged` (kept by the caller across syncs) holds the rounds whose evaluation is logged, which
    are not read again; a round joins it once its artifacts and metrics are in (artifacts go to fixed
    paths, so a sync cut short logs them again harmlessly). A round's mask is logged with its
    evaluation, or with the round itself when `masks_every_round`."""
    done = run.logged_steps(schema.ROUND_SENTINEL)
    if masks_every_round:
        with tempfile.TemporaryDirectory() as d:
            for h in history:
                if h["round"] not in done:  # before the round's metrics: a sync cut short logs it again
                    log_mask(run, store, h["round"] + 1, Path(d))
    run.log_steps(((h["round"], round_metrics(h)) for h in history), sentinel=schema.ROUND_SENTINEL, done=done)
    new = [(r, res) for r in rounds if r not in logged and (res := store.load_eval(rkey, r)) is not None]
    for r, res in new:
        log_eval_artifacts(run, store, res, r)
        if res.get("lmc"):
            records, sentinel = schema.lmc_curve_records(res["lmc"], r)
            run.log_steps(records, sentinel=sentinel)
    run.log_steps(((r, res["metrics"]) for r, res in new), sentinel=schema.EVAL_SENTINEL)
    logged.update(r for r, _ in new)


def log_eval_artifacts(run: ChainRun, store: ChainStore, res: dict, r: int) -> None:
    if res.get("lmc"):
        run.log_text(json.dumps(res["lmc"]), schema.lmc_artifact(r))
    if res.get("hessian"):
        run.log_text(json.dumps(res["hessian"]), schema.hessian_artifact(r))
    if res.get("spectrum"):
        run.log_text(json.dumps(res["spectrum"]), schema.spectrum_artifact(r))
    with tempfile.TemporaryDirectory() as d:
        if res.get("landscape"):
            land = res["landscape"]
            buf = io.BytesIO()
            np.savez(buf, grid=np.asarray(land["loss"]), accuracy=np.asarray(land["accuracy"]),
                     xs=np.asarray(land["xs"]), ys=np.asarray(land["ys"]),
                     coords=np.asarray([c["coords"] for c in land["copies"]]),
                     distances=np.asarray(land["distances"]))
            p = Path(d) / schema.round_file(r, "npz")
            p.write_bytes(buf.getvalue())
            run.log_file(str(p), schema.LANDSCAPE_DIR)
        log_mask(run, store, r, Path(d))


def log_mask(run: ChainRun, store: ChainStore, r: int, scratch: Path) -> None:
    """Round r's stored mask as `schema.mask_artifact(r)`, a plain torch file, with its checksum."""
    mask = store.mask_bytes(r)
    if mask is None:
        return
    buf = io.BytesIO()
    torch.save(dict(Mask.from_bytes(mask, source=f"round {r}'s mask")), buf)
    p = scratch / schema.round_file(r, "pt")
    p.write_bytes(buf.getvalue())
    run.log_file(str(p), schema.MASKS_DIR)
    run.log_text(f"{hashlib.sha256(buf.getvalue()).hexdigest()}  {p.name}\n", schema.mask_checksum_artifact(r))


def dataset_inputs(hp: ChainHparams, pruning_meta: Optional[dict] = None) -> list[dict]:
    """The chain's data sets as MLflow inputs: the real set (context `training`, also the test split's
    source) and, for a synthetic one, the set its mask was found on (context `pruning`). Digests are
    content identities, never paths: the data fingerprint (or the config of an embedded set) and the
    synthetic store's key."""
    ds = hp.dataset
    fingerprint = data_fingerprint(ds)
    real = {"name": ds.name, "digest": fingerprint or ds.hash(16), "context": "training",
            "source_type": "local" if fingerprint else "code",
            "source": json.dumps({"dataset": {k: v for k, v in ds.to_dict().items() if k != "root"}}, sort_keys=True)}
    out = [real]
    pd = hp.pruning_data
    if pd.kind != "real":
        meta = pruning_meta or {}
        digest = meta.get("key") or meta.get("sha256") or hp.hash()
        name = f"{ds.name}-{pd.method or pd.kind}-ipc{pd.ipc}" if pd.ipc else f"{ds.name}-{pd.kind}"
        out.append({"name": name, "digest": str(digest)[:36], "context": "pruning", "source_type": "code",
                    "source": json.dumps({"pruning_data": {k: v for k, v in pd.to_dict().items()
                                                           if k not in ("path", "store") and v is not None}},
                                         sort_keys=True)})
    return out


class TrialLog:
    """The MLflow run of one trial, kept in step with the store while the tracking server answers.

    Nothing here raises because of MLflow: each method returns whether the run is up to date, and
    `behind` says whether it lacks something the store has; `outage` tells an unreachable server
    (worth waiting for) from a request it refused (`last_error` says which). Warnings that could not
    be logged wait as files in the chain's store folder, so a later attempt, or the driver, logs
    them even if this process dies; tags wait in memory.
    """

    def __init__(self, spec: dict, run_id: Optional[str] = None, attempts: int = TRIAL_ATTEMPTS, quiet: bool = False):
        self.spec = spec
        self.run_id = run_id
        self.run: Optional[ChainRun] = None
        self.attempts = attempts
        self.quiet = quiet
        self.store = ChainStore(spec["store"], ChainHparams.from_dict(spec["chain"]))
        ev = EvalHparams.from_dict(spec["eval"])
        self.rkey = result_key(ev)
        self.masks_every_round = ev.masks_every_round
        self.rounds = list(spec["rounds"])
        self.notes_folder = spec["key"]  # notes/<trial key>/ in the chain's store folder
        self.logged_evals: set = set()
        self.pending_tags: dict[str, str] = {}
        self.pending_inputs: list[dict] = []
        self.pending_files: dict[str, bytes] = {}  # artifact path -> content
        self.behind = False
        self.outage = False
        self.last_error = ""
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST_S

    def _attempt(self, what: str, fn, force: bool = False) -> bool:
        if not force and time.time() < self._retry_at:
            self.behind = True
            return False
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every backend fails differently; the store has the data
            self.last_error = describe(e)
            self.outage = is_outage(e)
            self.behind = True
            self._retry_at = time.time() + self._backoff
            if not self.quiet:
                why = "MLflow unreachable" if self.outage else "MLflow refused a request"
                print(f"prunelab: {why} while trying to {what} ({self.last_error}); training goes on, the "
                      f"store keeps the results, next try in {self._backoff:.0f} s", file=sys.stderr)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            return False
        self._backoff = BACKOFF_FIRST_S
        self._retry_at = 0.0
        self.behind = self.outage = False
        return True

    def _open(self) -> None:
        if self.run is not None:
            return
        s = self.spec
        # without a run id in hand (no checkpoint yet) this finds the run an earlier attempt opened
        self.run = ChainRun.open(s["tracking_uri"], s["experiment_id"], s["parent_run_id"], s, self.run_id,
                                 attempts=self.attempts)
        self.run_id = self.run.run_id

    def _flush_pending(self) -> None:
        for key, value in list(self.pending_tags.items()):
            self.run.set_tag(key, value)
            del self.pending_tags[key]
        if self.pending_inputs:
            self.run.log_inputs(self.pending_inputs)
            self.pending_inputs = []
        for artifact, data in list(self.pending_files.items()):
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / artifact.rsplit("/", 1)[-1]
                p.write_bytes(data)
                self.run.log_file(str(p), artifact.rsplit("/", 1)[0])
            del self.pending_files[artifact]
        for name, text in self.store.notes(self.notes_folder):
            self.run.log_text(text, name.replace("__", "/"))
            self.store.drop_note(self.notes_folder, name)

    def _sync(self, history: list[dict]) -> None:
        self._open()
        self._flush_pending()
        sync_run(self.run, self.store, history, self.rkey, self.rounds, self.logged_evals, self.masks_every_round)

    def open(self) -> bool:
        """Find or create the run (it stays unopened, and the trial goes on, if MLflow is away)."""
        return self._attempt("open the chain's run", self._open, force=True)

    def sync(self, history: list[dict], force: bool = False) -> bool:
        """Log what the store holds for this chain and the run lacks; True when the run is up to date.
        Inside the back-off after a failure it returns False at once unless `force`."""
        return self._attempt("log the chain's results", lambda: self._sync(history), force)

    def progress(self, metrics: dict, step: int) -> None:
        """Progress inside a round (`schema.PROGRESS_*`), best effort: skipped while the run is not
        open or MLflow is in its back-off, never retried (the store keeps the results, not this)."""
        if self.run is None or time.time() < self._retry_at:
            return
        try:
            self.run.log_metrics(metrics, step)
        except Exception:  # noqa: BLE001 - a lost progress point is not worth a warning
            pass

    def note(self, text: str, artifact: str) -> None:
        """A text artifact (e.g. `schema.LAST_ERROR_NOTE`), logged with the next successful sync."""
        self.store.add_note(self.notes_folder, artifact.replace("/", "__"), text)
        self.behind = True

    def tag(self, key: str, value: str) -> None:
        self.pending_tags[key] = value
        self.behind = True

    def weights(self, init: dict, rewind: Optional[dict] = None) -> None:
        """The chain's initialization (and rewind point) as plain PyTorch files with their sha256,
        logged with the next successful sync."""
        for artifact, state in ((schema.INIT_WEIGHTS_ARTIFACT, init), (schema.REWIND_WEIGHTS_ARTIFACT, rewind)):
            if state is None:
                continue
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
            self.pending_files[artifact] = buf.getvalue()
            self.pending_files[artifact + ".sha256"] = (f"{hashlib.sha256(buf.getvalue()).hexdigest()}  "
                                                        f"{artifact.rsplit('/', 1)[-1]}\n").encode()
        self.behind = True

    def inputs(self, inputs: list[dict]) -> None:
        """Data sets (see `dataset_inputs`), logged with the next successful sync."""
        self.pending_inputs = list(inputs)
        self.behind = True

    def finish(self, history: list[dict], status: str = "FINISHED", reason: str = "") -> bool:
        """Sync, then close the run with `status` (and `reason`), whatever the back-off; False if
        MLflow did not answer."""
        def go():
            self._sync(history)
            self.run.finish(status, reason)

        return self._attempt("close the chain's run", go, force=True)


def catch_up(spec: dict, status: str, reason: str = "", run_id: Optional[str] = None) -> TrialLog:
    """In the driver after a sweep: bring the trial's run up to date from the store and close it.
    Returns the TrialLog: `behind` False when done, else `last_error` and `outage` say why not."""
    log = TrialLog(spec, run_id=run_id or spec.get("run_id"), quiet=True)
    state = log.store.load_state(on_corrupt=lambda msg: log.note(msg, schema.CORRUPT_STATE_NOTE))
    log.finish(state.history if state is not None else [], status, reason)
    return log


def catch_up_all(pending: list, tracking_uri: str, wait_s: float) -> list[str]:
    """Log from the store what the trials could not, waiting up to `wait_s` for an unreachable
    tracking server (a request it refuses is not waited for); returns a line per trial still not
    logged, naming the store folder that holds its results.

    `pending` holds a `(spec, status, reason, run_id)` per trial, as `catch_up` takes them."""
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
            f"{blobs.join(spec['store'], 'chains', spec['chain_hash'])}" for spec in everyone if spec["key"] in why]
