"""Atomic file writes (readers see the old file or the new one, never a part of it) and checksummed
frames (a truncated or corrupted file is detected, never loaded silently)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

from .errors import CorruptFileError


def atomic_write(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per host, process and thread: writers of one shared store never share a temporary file
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def frame(magic: bytes, payload: bytes) -> bytes:
    """`magic` (one line naming the format), the payload's sha256, then the payload."""
    return magic + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def unframe(magic: bytes, data: bytes, source: str) -> bytes:
    """The payload of a `frame`, checked; CorruptFileError naming `source` if anything is off."""
    if not data.startswith(magic):
        raise CorruptFileError(f"{source}: not a {magic.decode().strip()} file (bad header)")
    digest, _, payload = data[len(magic):].partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptFileError(f"{source}: checksum mismatch (truncated or corrupted file)")
    return payload


def cache_dir() -> Path:
    """Where prunelab keeps derived files (decoded ImageNet-10, synthetic sets, data fingerprints)."""
    return Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab")).expanduser()
