"""Leases: who is computing a chain or distilling a synthetic set right now, valid on a local disk,
a shared file system and an object store alike.

Why not a lock table in a Ray actor: `prunelab` runs without Ray (the CLI, a laptop, two sweeps on two
clusters sharing one bucket), and the store must stay the one source of truth. Why not one lease file
rewritten on expiry: taking over an expired lease would need a compare-and-swap, which S3 offers only
as `If-Match` on some providers. Conditional create alone (POSIX `link`, S3 `If-None-Match: *`, GCS
`ifGenerationMatch=0`) suffices with generations: a lease is the folder `<name>/`, holding numbered
files `00000000`, `00000001`, ...; the newest one rules. A process takes the lease by creating the
next number when the newest is released or expired; of two processes racing for the same number
exactly one succeeds. The holder renews by rewriting its own file (nobody else writes it) and
releases by marking it released (a release that fails leaves a mark that expires, or, on the same host,
one of a process that has exited or no longer holds it, which counts as free). A holder whose file was superseded (it stalled past the expiry)
learns so at its next renewal (`lost`) and writes nothing more (`runner.run_chain` checks before
every write, then waits for the new holder); the cost is a duplicated computation, never a damaged
store, and every result is written atomically and deterministically anyway.

Expiry compares the holder's clock with the reader's: a mark older than `ttl_s`, or more than `ttl_s`
in the future, is stale, so clocks may disagree by a good part of `ttl_s` (default 120 s, renewed every
30 s). On the holder's own host a file of a process that has exited is stale at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

from .blobs import Blobs

RENEW_S = 30.0
TTL_S = 120.0
POLL_S = 10.0

_held: set[str] = set()  # tokens of the leases this process holds now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


class Lease:
    """The lease `name` (a folder) in `blobs`."""

    def __init__(self, blobs: Blobs, name: str, ttl_s: float = TTL_S, renew_s: float = RENEW_S):
        self.blobs = blobs
        self.name = name.rstrip("/")
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.generation: Optional[int] = None  # the generation this object holds
        self.lost = False

    # ---- reading ----------------------------------------------------------------------------
    def _generations(self) -> list[int]:
        return sorted(int(n) for n in self.blobs.list(self.name) if n.isdigit())

    def _doc(self, gen: int) -> Optional[dict]:
        raw = self.blobs.read(f"{self.name}/{gen:08d}")
        try:
            doc = json.loads(raw) if raw is not None else None
            return doc if isinstance(doc, dict) and {"host", "pid", "token", "renewed"} <= doc.keys() else None
        except ValueError:
            return None

    def _live(self, doc: Optional[dict]) -> bool:
        """True when `doc` is a held, unexpired lease (an unreadable one counts as free)."""
        if doc is None or doc.get("released"):
            return False
        try:
            age = time.time() - float(doc["renewed"])
        except (TypeError, ValueError):
            return False
        if abs(age) >= self.ttl_s:
            return False
        if doc["host"] == self.me["host"]:
            if int(doc["pid"]) == os.getpid():
                return doc["token"] in _held  # else left by this process (its release failed: the store was away)
            if not _alive(int(doc["pid"])):
                return False  # e.g. this trial's own earlier attempt, killed
        return True

    def held_elsewhere(self) -> bool:
        """True while a process other than this object's holder has the lease."""
        gens = self._generations()
        if not gens:
            return False
        doc = self._doc(gens[-1])
        return self._live(doc) and doc["token"] != self.me["token"]

    # ---- taking, renewing, releasing --------------------------------------------------------------
    def _body(self, released: bool = False) -> bytes:
        return json.dumps({**self.me, "renewed": time.time(), "released": released}).encode()

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True when this object holds it now."""
        gens = self._generations()
        if gens and self._live(self._doc(gens[-1])):
            return False
        gen = gens[-1] + 1 if gens else 0
        created = False
        _held.add(self.me["token"])  # before the file exists: a reader in this process must see it held
        try:
            created = self.blobs.create(f"{self.name}/{gen:08d}", self._body())
        finally:
            if not created:
                _held.discard(self.me["token"])
        if not created:
            return False  # another process took this generation first
        self.generation, self.lost = gen, False
        for old in gens[:-1]:  # keep the folder small; the previous one stays as a witness
            with contextlib.suppress(Exception):  # botocore's errors are no OSError
                self.blobs.delete(f"{self.name}/{old:08d}")
        return True

    def renew(self) -> bool:
        """Refresh the holder's mark; False (and `lost`) when another process has taken over."""
        if self.generation is None:
            return False
        if any(g > self.generation for g in self._generations()):
            if not self.lost:
                print(f"prunelab: the lease {self.blobs.describe(self.name)} expired while held and was taken by "
                      "another process; this one writes nothing more under it", file=sys.stderr)
            self.lost = True
            return False
        self.blobs.write(f"{self.name}/{self.generation:08d}", self._body())
        return True

    def release(self) -> None:
        _held.discard(self.me["token"])
        if self.generation is not None and not self.lost:
            with contextlib.suppress(Exception):  # an unreleased lease expires by itself (store away: botocore's errors are no OSError)
                self.blobs.write(f"{self.name}/{self.generation:08d}", self._body(released=True))
        self.generation = None

    @contextlib.contextmanager
    def hold(self, poll_s: float = POLL_S, on_wait=None) -> Iterator["Lease"]:
        """Wait until the lease is free (checking every `poll_s` seconds; `on_wait()` once, when it is
        not), take it, renew it from a background thread while the block runs, release it after."""
        told = False
        while not self.try_acquire():
            if on_wait is not None and not told:
                on_wait()
                told = True
            time.sleep(poll_s)
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(self.renew_s):
                with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                    self.renew()

        beat = threading.Thread(target=renew_until_stopped, name=f"prunelab-lease-{self.name}", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            stop.set()
            beat.join()
            self.release()
