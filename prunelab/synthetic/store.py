"""A content-addressed store of synthetic sets: distilled once, reused by every later request.

Layout: `<root>/<key>/data.pt` (IDC's format, `[images, labels]`, so IDC tools read it too) and
`<root>/<key>/meta.json` (the key's inputs, sizes, timing and the sha256 of data.pt). The key is a
hash of (source data set hparams, method, ipc, factor, seed, budget, code version). Files are written
under a temporary name in the same directory and renamed, meta.json last, so a reader sees either a
complete entry or none; a lock file keeps two processes from distilling the same key at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .. import catalog, checkpoint
from ..data import ImageData, cache_dir
from ..errors import CorruptFileError
from ..files import atomic_write


class CorruptSyntheticSetError(CorruptFileError):
    """A stored synthetic set failed its checksum or could not be read."""


def default_root() -> Path:
    return cache_dir() / "synthetic"


def make_key(spec: dict) -> str:
    """Content hash of a synthetic set's defining inputs (`spec` must be JSON-ready)."""
    blob = json.dumps({"code_version": catalog.SYNTHETIC_CODE_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SyntheticStore:
    """Synthetic sets under `root` (default: `cache_dir()/synthetic`), one directory per key."""

    def __init__(self, root: Union[str, Path, None] = None):
        self.root = Path(root).expanduser() if root else default_root()

    def dir(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.dir(key) / "meta.json").is_file()

    def meta(self, key: str) -> dict:
        p = self.dir(key) / "meta.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise CorruptSyntheticSetError(f"{p}: unreadable metadata ({e}); delete {p.parent} to rebuild it") from None

    def put(self, key: str, data: ImageData, meta: dict) -> dict:
        """Store `data` (its x, y) under `key`; returns the metadata written."""
        d = self.dir(key)
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save([data.x.detach().cpu().float().contiguous(), data.y.detach().cpu().long()], buf)
        payload = buf.getvalue()
        full = {**meta, "key": key, "code_version": catalog.SYNTHETIC_CODE_VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                "bytes": len(payload), "shape": list(data.x.shape), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(d / "data.pt", payload)
        atomic_write(d / "meta.json", json.dumps(full, indent=2, sort_keys=True).encode())
        return full

    def load_tensors(self, key: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(images, labels, meta) of a stored set, verified against its checksum."""
        meta = self.meta(key)
        p = self.dir(key) / "data.pt"
        try:
            payload = p.read_bytes()
        except OSError as e:
            raise CorruptSyntheticSetError(f"{p}: cannot read ({e}); delete {p.parent} to rebuild it") from None
        if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
            raise CorruptSyntheticSetError(
                f"{p}: checksum mismatch ({len(payload)} bytes, expected {meta.get('bytes')}): the file is "
                f"truncated or corrupted; delete {p.parent} to rebuild it")
        x, y = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        return x, y, meta

    def load(self, key: str, like: ImageData) -> ImageData:
        """A stored set as ImageData with `like`'s normalization (still encoded if factor > 1)."""
        x, y, meta = self.load_tensors(key)
        return like.with_images(x, y, name=meta.get("name", key), meta={**meta, "decoded": False})

    @contextmanager
    def _lock(self, key: str):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{key}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- a distillation part-way (under the key's lock) ------------------------------------------
    def _partial_path(self, key: str) -> Path:
        return self.root / f".{key}.partial.pt"

    def save_partial(self, key: str, payload: dict) -> None:
        """A distillation's state part-way (see `distill.Progress`), checksummed; replaced by the next."""
        checkpoint.save(self._partial_path(key), payload)

    def load_partial(self, key: str, log: Optional[Callable[[str], None]] = None) -> Optional[dict]:
        """The stored state part-way, or None (none, or a damaged one, reported through `log`: the
        distillation starts over)."""
        return checkpoint.load(self._partial_path(key), log, "the distillation starts over")

    def get_or_create(self, spec: dict, like: ImageData, make: Callable[..., ImageData],
                      log: Optional[Callable[[str], None]] = None, resumable: bool = False) -> ImageData:
        """The set for `spec`: loaded if stored, else made by `make()` once, stored, and returned.
        With `resumable`, `make(resume=..., checkpoint=...)` gets the state a killed earlier attempt
        stored part-way (or None) and a function storing such states."""
        key = make_key(spec)
        with self._lock(key):
            if not self.has(key):
                t0 = time.perf_counter()
                if resumable:
                    data = make(resume=self.load_partial(key, log),
                                checkpoint=lambda payload: self.save_partial(key, payload))
                else:
                    data = make()
                seconds = time.perf_counter() - t0
                meta = {**data.meta, "spec": spec, "seconds": round(seconds, 3), "name": data.name,
                        "num_classes": data.num_classes}
                self.put(key, data, meta)
                self._partial_path(key).unlink(missing_ok=True)
                if log:
                    log(f"stored synthetic set {key} in {self.dir(key)} ({seconds:.1f} s)")
        return self.load(key, like)

    def list(self) -> list[dict]:
        """Metadata of every complete entry, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and (d / "meta.json").is_file():
                try:
                    out.append(self.meta(d.name))
                except CorruptSyntheticSetError as e:
                    out.append({"key": d.name, "error": str(e)})
        return sorted(out, key=lambda m: m.get("created", ""))
