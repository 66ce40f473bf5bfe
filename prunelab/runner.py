"""Running a chain to its end against the result store: the one loop the CLI and the sweep's
trainable share.

`run_chain` opens the chain of `hp` (its stored state, else a new chain from its start chain's mask
when it has `start_from`, else dense), evaluates the pending rounds, then steps, saves and evaluates
until the last round. The store is the source of truth: after every round the state is saved,
evaluations already stored are not recomputed, and a chain another process is computing right now
(it holds the chain's lease, see `prunelab.lease`) is waited for rather than computed twice. Callers
watch through callbacks (`on_open`, `on_round`, `on_eval`); nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

from .chain import Chain, ChainState
from .data import DataSplit, load_dataset
from .errors import CorruptFileError
from .evaluation import EvalHparams, evaluate_round, result_key
from .hparams import ChainHparams
from .lease import Lease
from .masks import Mask
from .store import ChainStore

WAIT_POLL_S = 10.0  # how often a chain waiting for another process's chain looks again


def _stored_mask(store: ChainStore, round: int) -> Optional[Mask]:
    """The stored mask of `round`, or None (also when damaged: the caller repairs it from the state)."""
    try:
        return store.mask_at(round)
    except CorruptFileError:
        return None


def chain_masks(other: ChainHparams, rounds: Sequence[int], store_root: str, data: DataSplit, device
                ) -> dict[int, Mask]:
    """The masks of chain `other` at `rounds`, computing that chain (via the store) as far as needed:
    the start of a combined chain (`start_from`), or the per-layer allocation of another (`allocation_from`).

    When another process is computing that chain right now (it holds the chain's lease), this waits
    for the masks instead of training the same chain a second time; if that process goes away first,
    this one continues the chain from the store."""
    store = ChainStore(store_root, other)
    rounds = sorted(set(rounds))

    def stored() -> dict[int, Optional[Mask]]:
        return {r: _stored_mask(store, r) for r in rounds}

    masks = stored()
    while any(m is None for m in masks.values()) and store.computing_elsewhere():
        time.sleep(WAIT_POLL_S)
        masks = stored()
    if all(m is not None for m in masks.values()):
        return masks
    with store.computing(poll_s=WAIT_POLL_S) as lease:  # taken over from a process gone, or nobody's
        store.adopt_legacy()
        state = store.load_state(on_corrupt=print)
        # a damaged mask is rewritten from the state
        masks = {r: store.mask_at(r, fallback=state) for r in rounds}
        if any(m is None for m in masks.values()):
            chain = open_chain(other, state, store_root, data, device)
            while chain.round < rounds[-1]:
                chain.step()
                _still_held(lease, store)
                store.save_state(chain.state)
            masks = {r: store.mask_at(r, fallback=chain.state) for r in rounds}
    return masks


def start_mask(hp: ChainHparams, store_root: str, data: DataSplit, device) -> Mask:
    """The mask a combined chain (`start_from`) starts from (see `chain_masks`)."""
    return chain_masks(hp.start_chain(), [hp.start_round], store_root, data, device)[hp.start_round]


def open_chain(hp: ChainHparams, state: Optional[ChainState], store_root: str, data: DataSplit, device) -> Chain:
    """The chain of `hp` continued from its stored `state`, or new: from its start chain's mask
    when it has one (`start_from`), else dense; with `allocation_from`, given that chain's masks."""
    start = {}
    if state is None and hp.start_from is not None:
        start = {"start_mask": start_mask(hp, store_root, data, device), "start_round": hp.start_round}
    if hp.allocation_from is not None:
        start["allocation"] = chain_masks(hp.allocation_chain(), range(1, hp.pruning.rounds + 1), store_root,
                                          data, device)
    return Chain(hp, device, data=data, state=state, **start)


def run_chain(hp: ChainHparams, ev: EvalHparams, rounds: Sequence[int], store: ChainStore, *, device="cpu",
              data: Optional[DataSplit] = None,
              on_open: Optional[Callable[[Chain], None]] = None,
              on_round: Optional[Callable[[Chain, dict], None]] = None,
              on_eval: Optional[Callable[[Chain, int, dict], None]] = None,
              round_callback: Optional[Callable[[int], Optional[Callable]]] = None,
              on_corrupt: Optional[Callable[[str], None]] = None,
              checkpoint_every_s: Optional[float] = None) -> Chain:
    """Bring the chain of `hp` to `hp.pruning.rounds` rounds with `ev` evaluated at `rounds`,
    through `store`; returns the finished chain.

    `on_open(chain)` once the chain is opened (and its first state stored), `on_round(chain, record)`
    after each round is saved, `on_eval(chain, round, result)` after each new evaluation is saved.
    `round_callback(round)` may give the training callback of that round (e.g. a progress hook).
    `on_corrupt(message)` hears of a damaged stored state (the chain then restarts from the last
    good one, see `ChainStore.load_state`). With `checkpoint_every_s`, a round's training on the
    pruning data is also stored part-way that often (at epoch ends), and a chain opened again resumes
    its round from there, to the same mask: a killed process loses at most that much of a round.
    A process that stalled past its lease's expiry while another took the chain over writes nothing
    more: it waits for that process, then goes on from the store (legacy folders are adopted under
    the lease too, see `ChainStore.adopt_legacy`).
    """
    while True:
        try:
            return _run_held(hp, ev, sorted(rounds), store, device, data, on_open, on_round, on_eval,
                             round_callback, on_corrupt, checkpoint_every_s)
        except LeaseLostError as e:
            # this process stalled past its lease's expiry and another one took the chain over: rather
            # than both writing its state, this one waits for that one, then goes on from the store
            print(f"prunelab: {e}; waiting for that process, then going on from what it stored", file=sys.stderr)


class LeaseLostError(RuntimeError):
    """The lease of a chain this process was computing was taken over by another process."""


def _still_held(lease: Lease, store: ChainStore) -> None:
    """Raise LeaseLostError before a write if another process has taken over `lease`."""
    if lease.lost:
        raise LeaseLostError(f"chain {store.hash}: another process took over its lease")


def _run_held(hp, ev, rounds, store, device, data, on_open, on_round, on_eval, round_callback, on_corrupt,
              checkpoint_every_s) -> Chain:
    rkey = result_key(ev)
    # the same chain in another process (another sweep) is waited for, then reused from the store;
    # chains that start from this one wait for its masks
    with store.computing(poll_s=WAIT_POLL_S, on_wait=lambda: print(
            f"prunelab: chain {store.hash} is being computed by another process; waiting for it")) as lease:
        store.adopt_legacy()
        data = data if data is not None else load_dataset(hp.dataset)
        state = store.load_state(on_corrupt=on_corrupt)
        chain = open_chain(hp, state, store.root, data, device)
        if state is None:
            store.save_state(chain.state)  # round-0 (or start) mask, so evaluations can find it
        if on_open:
            on_open(chain)

        def evaluate_pending(upto: int) -> None:
            for r in rounds:
                if r > upto or store.load_eval(rkey, r) is not None:
                    continue
                mask = store.mask_at(r, fallback=chain.state)
                previous = None
                if ev.lmc and ev.lmc_hparams.previous_round and r > chain.state.start_round:
                    previous = store.mask_at(r - 1)
                res = evaluate_round(hp, ev, data, chain.state.rewind_point, mask, r, device, previous_mask=previous)
                _still_held(lease, store)
                store.save_eval(rkey, r, res)
                if on_eval:
                    on_eval(chain, r, res)

        evaluate_pending(chain.round)
        while chain.round < hp.pruning.rounds:
            r = chain.round
            mid_round = {}
            if checkpoint_every_s is not None:
                def save_partial(payload, r=r):
                    _still_held(lease, store)
                    store.save_partial(r, payload)

                mid_round = {"resume": store.load_partial(r, on_corrupt=on_corrupt),
                             "checkpoint": save_partial, "checkpoint_every_s": checkpoint_every_s}
            record = chain.step(callback=round_callback(r) if round_callback else None, **mid_round)
            _still_held(lease, store)
            store.save_state(chain.state)
            store.clear_partial()
            if on_round:
                on_round(chain, record)
            evaluate_pending(chain.round)
    return chain
