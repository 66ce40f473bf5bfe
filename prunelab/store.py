"""The result store: one directory per chain, named by its config hash (see docs/results.md).

It is what makes resume and dedup work: a chain that reached round r is never trained to round r
again, and an evaluation already stored is never recomputed, whichever sweep asks for it. Every file
is written atomically (temporary name in the same directory, then rename), and states, masks and
evaluations carry a checksum: a damaged file is reported by name and never used as if it were good.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional


from . import checkpoint
from .chain import ChainState, CorruptStateError
from .errors import CorruptFileError
from .files import atomic_write
from .hparams import ChainHparams
from .masks import Mask


# A process training a chain marks it every HEARTBEAT_S seconds (`ChainStore.computing`); a mark
# older than STALE_S belongs to a process that is gone.
HEARTBEAT_S = 30.0
STALE_S = 120.0


class ChainStore:
    """Files of one chain under `<root>/chains/<hash>/`."""

    def __init__(self, root, hp: ChainHparams):
        self.root = Path(root)
        self.hp = hp
        self.hash = hp.hash()
        self.dir = self.root / "chains" / self.hash

    # ---- state ------------------------------------------------------------------------------
    def save_state(self, state: ChainState) -> None:
        """Store the state, the mask of its round and the round history; keep the previous state."""
        if not (self.dir / "config.json").exists():
            atomic_write(self.dir / "config.json", json.dumps(self.hp.to_dict(), indent=2).encode())
        state_file = self.dir / "state.pt"
        if state_file.exists():
            os.replace(state_file, self.dir / "state.prev.pt")
        atomic_write(self.mask_path(state.round), state.mask.to_bytes())
        atomic_write(self.dir / "history.jsonl",
                     "".join(json.dumps(h) + "\n" for h in state.history).encode())
        atomic_write(state_file, state.to_bytes())

    def load_state(self, on_corrupt=None) -> Optional[ChainState]:
        """The latest good state, or None. A corrupted latest state is reported through
        `on_corrupt(message)` and the previous one is used instead."""
        for name in ("state.pt", "state.prev.pt"):
            path = self.dir / name
            if not path.exists():
                continue
            try:
                return ChainState.from_bytes(path.read_bytes(), source=str(path))
            except CorruptStateError as e:
                if on_corrupt is None:
                    raise
                on_corrupt(str(e))
        return None

    def mask_path(self, round: int) -> Path:
        return self.dir / "rounds" / f"round_{round:02d}.mask.pt"

    def mask_at(self, round: int, fallback: Optional[ChainState] = None) -> Optional[Mask]:
        """The mask of `round`, or None if the chain has not reached it. A damaged mask file is
        replaced from `fallback` (a state of that round, which holds its mask); without one it
        raises CorruptFileError naming the file."""
        path = self.mask_path(round)
        if not path.exists():
            return None
        try:
            return Mask.load(path)
        except CorruptFileError as e:
            if fallback is None or fallback.round != round:
                raise CorruptFileError(f"{e}; the chain's state no longer holds round {round}: delete "
                                       f"{self.dir} to recompute the chain") from None
            print(f"prunelab: {e}; rewritten from the chain's state", file=sys.stderr)
            atomic_write(path, fallback.mask.to_bytes())
            return fallback.mask

    # ---- mid-round training state ------------------------------------------------------------
    def _partial_path(self) -> Path:
        return self.dir / "round_partial.pt"

    def save_partial(self, round: int, payload: dict) -> None:
        """The training state part-way through `round` (see `prunelab.train.train`), checksummed; one
        per chain, replaced by the next and cleared when the round's state is saved."""
        checkpoint.save(self._partial_path(), {"round": round, "config_hash": self.hash, "payload": payload})

    def load_partial(self, round: int, on_corrupt=None) -> Optional[dict]:
        """The stored training state part-way through `round`, or None (none stored, one of another
        round, or a damaged one, which is reported through `on_corrupt(message)`: the round restarts)."""
        doc = checkpoint.load(self._partial_path(), on_corrupt, "the round restarts from its beginning")
        if doc is None or doc.get("round") != round or doc.get("config_hash") != self.hash:
            return None
        return doc["payload"]

    def clear_partial(self) -> None:
        self._partial_path().unlink(missing_ok=True)

    # ---- evaluations -------------------------------------------------------------------------
    def _eval_path(self, eval_hash: str, round: int) -> Path:
        return self.dir / "evals" / eval_hash / f"round_{round:02d}.json"

    def save_eval(self, eval_hash: str, round: int, result: dict) -> None:
        result = json.loads(json.dumps(result))  # as it will read back (tuples as lists, keys as strings)
        body = json.dumps(result, sort_keys=True)
        doc = {"sha256": hashlib.sha256(body.encode()).hexdigest(), "result": result}
        atomic_write(self._eval_path(eval_hash, round), json.dumps(doc, sort_keys=True).encode())

    def load_eval(self, eval_hash: str, round: int) -> Optional[dict]:
        """A stored evaluation, or None. A damaged one counts as missing (it is recomputed) and is
        reported by name on stderr."""
        path = self._eval_path(eval_hash, round)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if isinstance(doc, dict) and "metrics" in doc and "sha256" not in doc:
                return doc  # written before evaluations carried a checksum
            result = doc["result"]
            if hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest() != doc["sha256"]:
                raise ValueError("checksum mismatch")
        except (ValueError, KeyError, TypeError) as e:
            print(f"prunelab: {path}: damaged evaluation ({type(e).__name__}: {e}); it is computed again",
                  file=sys.stderr)
            return None
        return result

    def complete(self, eval_hash: str, rounds) -> bool:
        """True when the chain reached its last round and every evaluation is stored."""
        state = self.dir / "state.pt"
        history = self.dir / "history.jsonl"
        if not state.exists() or not history.exists():
            return False
        return (self._history_round() >= self.hp.pruning.rounds
                and all(self.load_eval(eval_hash, r) is not None for r in rounds))

    # ---- who is computing it ---------------------------------------------------------------
    @staticmethod
    def _me() -> list[str]:
        return [socket.gethostname(), str(os.getpid())]

    @contextlib.contextmanager
    def computing(self, every_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Mark the chain as being computed by this process, refreshed every `every_s` seconds by a
        background thread while the block runs, so that a trial that needs this chain's mask waits
        for it instead of computing the same chain a second time."""
        path = self.dir / "computing"
        stop = threading.Event()

        def mark() -> None:
            with contextlib.suppress(OSError):  # a missed mark only makes another process wait less
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write(path, " ".join(self._me() + [repr(time.time())]).encode())

        def beat_until_stopped() -> None:
            while not stop.wait(every_s):
                mark()

        mark()  # marked before the block starts
        beat = threading.Thread(target=beat_until_stopped, name=f"prunelab-computing-{self.hash}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with contextlib.suppress(OSError, ValueError):  # never hides the block's own error
                if path.read_text().split()[:2] == self._me():
                    path.unlink()

    def computing_elsewhere(self, stale_s: float = STALE_S) -> bool:
        """True while another live process has marked this chain within the last `stale_s` seconds
        (a mark from a process of this host that has exited, or an unreadable one, does not count)."""
        try:
            host, pid, stamp = (self.dir / "computing").read_text().split()
            age = time.time() - float(stamp)
            pid_n = int(pid)
        except (OSError, ValueError):
            return False
        if [host, pid] == self._me() or abs(age) >= stale_s:  # clocks of other hosts may run ahead
            return False
        if host == socket.gethostname():
            try:
                os.kill(pid_n, 0)
            except ProcessLookupError:
                return False  # e.g. this trial's own earlier attempt, killed
            except OSError:
                pass  # alive, someone else's
        return True

    def progress(self, eval_hash: str, rounds) -> tuple[Optional[int], list[int]]:
        """Cheaply, without reading states or checking checksums: the round the stored state has
        reached (None when no state is stored) and which of `rounds` have a stored evaluation."""
        reached = None
        if (self.dir / "state.pt").exists() or (self.dir / "state.prev.pt").exists():
            try:
                reached = self._history_round() if (self.dir / "history.jsonl").exists() else 0
            except (OSError, ValueError):  # unreadable: estimated as not started
                reached = None
        return reached, [r for r in rounds if self._eval_path(eval_hash, r).exists()]

    def _history_round(self) -> int:
        """The round the stored history reaches: its first record's round plus the rounds recorded."""
        lines = (self.dir / "history.jsonl").read_text().splitlines()
        return (json.loads(lines[0])["round"] if lines else 0) + len(lines)
