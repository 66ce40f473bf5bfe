"""Fault injection for the reliability tests: `--inject-fault` (or PRUNELAB_FAIL_AT_ROUND) raises, or
kills the worker, in a given round of the chains (tests/reliability/README.md)."""

from __future__ import annotations

import os
import signal
from typing import Optional

from prunelab.blobs import open_root
from prunelab.errors import ConfigError

# The driver reads this variable and carries the fault in each trial's spec: environment variables
# of the driver process do not reach Ray workers that are already running (or on other nodes).
FAIL_ENV = "PRUNELAB_FAIL_AT_ROUND"


def fault_spec(args) -> Optional[dict]:
    """The injected fault from --inject-fault or the PRUNELAB_FAIL_AT_ROUND variable of the driver:
    it travels in each trial's spec, so it reaches workers on any node."""
    raw = args.inject_fault or os.environ.get(FAIL_ENV)
    if not raw:
        return None
    parts = str(raw).split(":")
    try:
        fault = {"round": int(parts[0]), "attempts": int(parts[1]) if len(parts) > 1 and parts[1] else 1,
                 "variant": parts[2] if len(parts) > 2 and parts[2] else None,
                 "kind": parts[3] if len(parts) > 3 and parts[3] else "raise"}
    except ValueError:
        raise ConfigError("--inject-fault", f"{raw!r} is not ROUND[:ATTEMPTS[:VARIANT[:KIND]]]",
                          "e.g. 2 (first attempt fails in round 2) or 1:0:imp (every attempt of imp)") from None
    if fault["kind"] not in ("raise", "kill"):
        raise ConfigError("--inject-fault", f"{raw!r}: unknown kind {fault['kind']!r}", "use raise or kill")
    if fault["round"] < 0 or fault["attempts"] < 0:
        raise ConfigError("--inject-fault", f"{raw!r}: round and attempts must be >= 0", "e.g. 2:1")
    return fault


def fault_hook(spec: dict, round: int):
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
        marks = f"faults/{spec['parent_run_id']}/{spec['key']}"
        store = open_root(spec["store"])
        n = len(store.list(marks))
        attempts = int(fault.get("attempts", 1))
        if attempts and n >= attempts:
            return
        store.write(f"{marks}/{n + 1}", b"")
        if fault.get("kind") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injected in round {round} (fault {n + 1} of {attempts or 'every attempt'})")

    return hit
