"""The result store: one folder per chain, named by its config hash (see docs/results.md), on a
local disk, a shared file system or a bucket (`s3://`, `gs://`; see `prunelab.blobs`).

It is what makes resume and dedup work: a chain that reached round r is never trained to round r
again, and an evaluation already stored is never recomputed, whichever sweep asks for it. Every file
is written atomically (a local temporary name then a rename; an object store's single PUT), and
states, masks and evaluations carry a checksum: a damaged file is reported by name and never used as
if it were good. One process at a time computes a chain: it holds the chain's lease (`prunelab.lease`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import checkpoint
from .blobs import Blobs, LocalBlobs, open_root
from .chain import ChainState, CorruptStateError
from .errors import CorruptFileError
from .hparams import ChainHparams
from .lease import POLL_S, RENEW_S, TTL_S, Lease
from .masks import Mask

# A process computing a chain renews its lease every HEARTBEAT_S seconds; one not renewed for
# STALE_S seconds belongs to a process that is gone.
HEARTBEAT_S = RENEW_S
STALE_S = TTL_S

_MIGRATED = "moved.json"  # left in a chain folder written under a legacy hash (see ChainStore.__init__)


class ChainStore:
    """Files of one chain under `<root>/chains/<hash>/`."""

    def __init__(self, root, hp: ChainHparams):
        self.root = root if isinstance(root, (str, Path)) else str(root)
        self.hp = hp
        self.hash = hp.hash()
        base = open_root(root)
        self.files: Blobs = base.sub(f"chains/{self.hash}")
        self._base = base

    def adopt_legacy(self) -> bool:
        """Bring this chain's files over from the folder of its legacy hash (an identity that held
        machine paths, see `ChainHparams.legacy_hash`) when it has none of its own; True if it did.

        Only the holder of the chain's lease calls this (`runner.run_chain`): a plan or a dry run
        never moves files. Nothing is adopted while a data root or IDC file of the chain is absent
        from this machine: its hash then stands for missing data, not for the files the legacy
        folder was computed on."""
        legacy = self.hp.legacy_hash()
        if legacy == self.hash or not self.hp.paths_fingerprinted() or self.files.exists("state.pt"):
            return False
        return _adopt(self._base.sub(f"chains/{legacy}"), self.files, self.hash)

    @property
    def dir(self) -> Path:
        """The chain's folder, for a store on a local or shared file system."""
        if not isinstance(self.files, LocalBlobs):
            raise TypeError(f"{self.files.root} is not a local folder")
        return self.files.path

    def describe(self, key: str = "") -> str:
        return self.files.describe(key)

    # ---- state ------------------------------------------------------------------------------
    def save_state(self, state: ChainState) -> None:
        """Store the state, the mask of its round and the round history; keep the previous state."""
        if not self.files.exists("config.json"):
            self.files.write("config.json", json.dumps(self.hp.to_dict(), indent=2).encode())
        self.files.copy("state.pt", "state.prev.pt")
        self.files.write(self.mask_key(state.round), state.mask.to_bytes())
        self.files.write("history.jsonl", "".join(json.dumps(h) + "\n" for h in state.history).encode())
        self.files.write("state.pt", state.to_bytes())

    def load_state(self, on_corrupt=None) -> Optional[ChainState]:
        """The latest good state, or None. A corrupted latest state is reported through
        `on_corrupt(message)` and the previous one is used instead."""
        for name in ("state.pt", "state.prev.pt"):
            data = self.files.read(name)
            if data is None:
                continue
            try:
                return ChainState.from_bytes(data, source=self.files.describe(name))
            except CorruptStateError as e:
                if on_corrupt is None:
                    raise
                on_corrupt(str(e))
        return None

    def mask_key(self, round: int) -> str:
        return f"rounds/round_{round:02d}.mask.pt"

    def mask_path(self, round: int) -> Path:
        """The mask file of `round` in a local store."""
        return self.dir / self.mask_key(round)

    def mask_bytes(self, round: int) -> Optional[bytes]:
        """The stored mask file of `round` as it is (checksummed frame), or None."""
        return self.files.read(self.mask_key(round))

    def mask_at(self, round: int, fallback: Optional[ChainState] = None) -> Optional[Mask]:
        """The mask of `round`, or None if the chain has not reached it. A damaged mask file is
        replaced from `fallback` (a state of that round, which holds its mask); without one it
        raises CorruptFileError naming the file."""
        key = self.mask_key(round)
        data = self.files.read(key)
        if data is None:
            return None
        try:
            return Mask.from_bytes(data, source=self.files.describe(key))
        except CorruptFileError as e:
            if fallback is None or fallback.round != round:
                raise CorruptFileError(f"{e}; the chain's state no longer holds round {round}: delete "
                                       f"{self.files.root} to recompute the chain") from None
            print(f"prunelab: {e}; rewritten from the chain's state", file=sys.stderr)
            self.files.write(key, fallback.mask.to_bytes())
            return fallback.mask

    # ---- mid-round training state ------------------------------------------------------------
    def save_partial(self, round: int, payload: dict) -> None:
        """The training state part-way through `round` (see `prunelab.train.train`), checksummed; one
        per chain, replaced by the next and cleared when the round's state is saved."""
        checkpoint.save(self.files, "round_partial.pt", {"round": round, "config_hash": self.hash, "payload": payload})

    def load_partial(self, round: int, on_corrupt=None) -> Optional[dict]:
        """The stored training state part-way through `round`, or None (none stored, one of another
        round, or a damaged one, which is reported through `on_corrupt(message)`: the round restarts)."""
        doc = checkpoint.load(self.files, "round_partial.pt", on_corrupt, "the round restarts from its beginning")
        if doc is None or doc.get("round") != round or doc.get("config_hash") not in (self.hash, self.hp.legacy_hash()):
            return None
        return doc["payload"]

    def clear_partial(self) -> None:
        self.files.delete("round_partial.pt")

    # ---- notes waiting for the tracking server -----------------------------------------------
    def notes(self, folder: str) -> list[tuple[str, str]]:
        """(name, text) of the notes stored under `notes/<folder>/`, by name."""
        out = []
        for name in self.files.list(f"notes/{folder}"):
            data = self.files.read(f"notes/{folder}/{name}")
            if data is not None:
                out.append((name, data.decode(errors="replace")))
        return out

    def add_note(self, folder: str, name: str, text: str) -> None:
        self.files.write(f"notes/{folder}/{name}", text.encode())

    def drop_note(self, folder: str, name: str) -> None:
        self.files.delete(f"notes/{folder}/{name}")

    # ---- evaluations -------------------------------------------------------------------------
    def _eval_key(self, eval_hash: str, round: int) -> str:
        return f"evals/{eval_hash}/round_{round:02d}.json"

    def save_eval(self, eval_hash: str, round: int, result: dict) -> None:
        result = json.loads(json.dumps(result))  # as it will read back (tuples as lists, keys as strings)
        body = json.dumps(result, sort_keys=True)
        doc = {"sha256": hashlib.sha256(body.encode()).hexdigest(), "result": result}
        self.files.write(self._eval_key(eval_hash, round), json.dumps(doc, sort_keys=True).encode())

    def load_eval(self, eval_hash: str, round: int) -> Optional[dict]:
        """A stored evaluation, or None. A damaged one counts as missing (it is recomputed) and is
        reported by name on stderr."""
        key = self._eval_key(eval_hash, round)
        data = self.files.read(key)
        if data is None:
            return None
        try:
            doc = json.loads(data)
            if isinstance(doc, dict) and "metrics" in doc and "sha256" not in doc:
                return doc  # written before evaluations carried a checksum
            result = doc["result"]
            if hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest() != doc["sha256"]:
                raise ValueError("checksum mismatch")
        except (ValueError, KeyError, TypeError) as e:
            print(f"prunelab: {self.files.describe(key)}: damaged evaluation ({type(e).__name__}: {e}); it is computed again",
                  file=sys.stderr)
            return None
        return result

    def complete(self, eval_hash: str, rounds) -> bool:
        """True when the chain reached its last round and every evaluation is stored."""
        if not self.files.exists("state.pt"):
            return False
        reached = self._history_round()
        return (reached is not None and reached >= self.hp.pruning.rounds
                and all(self.load_eval(eval_hash, r) is not None for r in rounds))

    # ---- who is computing it ---------------------------------------------------------------
    def lease(self, ttl_s: float = STALE_S, renew_s: float = HEARTBEAT_S) -> Lease:
        return Lease(self.files, "lease", ttl_s=ttl_s, renew_s=renew_s)

    @contextlib.contextmanager
    def computing(self, poll_s: float = POLL_S, every_s: float = HEARTBEAT_S,
                  on_wait: Optional[Callable[[], None]] = None) -> Iterator[Lease]:
        """Hold the chain's lease while the block runs (waiting first while another process holds
        it, checking every `poll_s` seconds), so that one process computes the chain and the others,
        including trials that need its masks, wait for its results instead of computing them again.
        The block gets the lease: its `lost` turns True if this process stalled past the expiry and
        another one took over."""
        with self.lease(renew_s=every_s).hold(poll_s=poll_s, on_wait=on_wait) as lease:
            yield lease

    def computing_elsewhere(self, stale_s: float = STALE_S) -> bool:
        """True while another live process holds this chain's lease (renewed within `stale_s` seconds;
        one of a process of this host that has exited, or an unreadable one, does not count)."""
        return self.lease(ttl_s=stale_s).held_elsewhere()

    def progress(self, eval_hash: str, rounds) -> tuple[Optional[int], list[int]]:
        """Cheaply, without reading states or checking checksums: the round the stored state has
        reached (None when no state is stored) and which of `rounds` have a stored evaluation."""
        reached = None
        if self.files.exists("state.pt") or self.files.exists("state.prev.pt"):
            reached = self._history_round()
            reached = 0 if reached is None else reached  # unreadable history: estimated as not started
        done = set()
        for r in rounds:
            if self.files.exists(self._eval_key(eval_hash, r)):
                done.add(r)
        return reached, [r for r in rounds if r in done]

    def _history_round(self) -> Optional[int]:
        """The round the stored history reaches: its first record's round plus the rounds recorded
        (None when there is no readable history)."""
        data = self.files.read("history.jsonl")
        if data is None:
            return None
        try:
            lines = data.decode().splitlines()
            return (json.loads(lines[0])["round"] if lines else 0) + len(lines)
        except (ValueError, KeyError, TypeError):
            return None


def _adopt(old: Blobs, new: Blobs, new_hash: str) -> bool:
    """Bring a chain stored under its legacy hash (an identity that held machine paths) to its
    path-free hash: its files are copied (state last, so an interrupted copy is redone), and the old
    folder says where they went."""
    if not old.exists("state.pt") or old.exists(_MIGRATED):
        return False
    files = []

    def walk(prefix: str) -> None:
        for name in old.list(prefix):
            key = f"{prefix}/{name}" if prefix else name
            if old.read(key) is None:
                walk(key)
            else:
                files.append(key)

    walk("")
    for key in sorted(files, key=lambda k: (k in ("state.pt", "history.jsonl"), k)):
        if key == "computing" or key.startswith("lease/"):
            continue
        data = old.read(key)
        if data is not None:
            new.write(key, data)
    old.write(_MIGRATED, json.dumps({"hash": new_hash}).encode())
    print(f"prunelab: {old.root} was stored under a hash that held a data path; it now lives in {new.root}",
          file=sys.stderr)
    return True
