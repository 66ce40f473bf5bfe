"""A content-addressed store of synthetic sets: distilled once, reused by every later request.

Layout: `<root>/<key>/data.pt` (IDC's format, `[images, labels]`, so IDC tools read it too) and
`<root>/<key>/meta.json` (the key's inputs, sizes, timing and the sha256 of data.pt). The key is a
hash of (source data set hparams, method, ipc, factor, seed, budget, code version). `root` is a local
folder or a bucket URI (`prunelab.blobs`). Files are written atomically, meta.json last, so a reader
sees either a complete entry or none; a lease (`<key>/lease/`, see `prunelab.lease`) keeps two
processes, on one machine or many, from distilling the same key at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .. import catalog, checkpoint
from ..blobs import Blobs, is_uri, open_root
from ..data import ImageData
from ..errors import CorruptFileError
from ..files import cache_dir
from ..lease import Lease

ENV = "PRUNELAB_SYNTHETIC_STORE"  # the store's root when none is given (a sweep sets it to its storage)


class CorruptSyntheticSetError(CorruptFileError):
    """A stored synthetic set failed its checksum or could not be read."""


def default_root() -> Union[str, Path]:
    return os.environ.get(ENV) or cache_dir() / "synthetic"


def make_key(spec: dict) -> str:
    """Content hash of a synthetic set's defining inputs (`spec` must be JSON-ready)."""
    blob = json.dumps({"code_version": catalog.SYNTHETIC_CODE_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SyntheticStore:
    """Synthetic sets under `root` (default: $PRUNELAB_SYNTHETIC_STORE, else `cache_dir()/synthetic`),
    one folder per key."""

    def __init__(self, root: Union[str, Path, None] = None):
        root = root or default_root()
        self.root = str(root) if is_uri(root) else Path(root).expanduser()
        self.files: Blobs = open_root(self.root)

    def dir(self, key: str) -> Union[str, Path]:
        """The entry's folder: a path for a local store, a URI for a bucket."""
        return self.root / key if isinstance(self.root, Path) else self.files.describe(key)

    def has(self, key: str) -> bool:
        return self.files.exists(f"{key}/meta.json")

    def meta(self, key: str) -> dict:
        name = self.files.describe(f"{key}/meta.json")
        try:
            data = self.files.read(f"{key}/meta.json")
            if data is None:
                raise OSError("no such file")
            return json.loads(data)
        except (OSError, ValueError) as e:
            raise CorruptSyntheticSetError(f"{name}: unreadable metadata ({e}); delete {self.dir(key)} to rebuild it") from None

    def put(self, key: str, data: ImageData, meta: dict) -> dict:
        """Store `data` (its x, y) under `key`; returns the metadata written."""
        buf = io.BytesIO()
        torch.save([data.x.detach().cpu().float().contiguous(), data.y.detach().cpu().long()], buf)
        payload = buf.getvalue()
        full = {**meta, "key": key, "code_version": catalog.SYNTHETIC_CODE_VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                "bytes": len(payload), "shape": list(data.x.shape), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.files.write(f"{key}/data.pt", payload)
        self.files.write(f"{key}/meta.json", json.dumps(full, indent=2, sort_keys=True).encode())
        return full

    def load_tensors(self, key: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(images, labels, meta) of a stored set, verified against its checksum."""
        meta = self.meta(key)
        name = self.files.describe(f"{key}/data.pt")
        try:
            payload = self.files.read(f"{key}/data.pt")
            if payload is None:
                raise OSError("no such file")
        except OSError as e:
            raise CorruptSyntheticSetError(f"{name}: cannot read ({e}); delete {self.dir(key)} to rebuild it") from None
        if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
            raise CorruptSyntheticSetError(
                f"{name}: checksum mismatch ({len(payload)} bytes, expected {meta.get('bytes')}): the file is "
                f"truncated or corrupted; delete {self.dir(key)} to rebuild it")
        x, y = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        return x, y, meta

    def load(self, key: str, like: ImageData) -> ImageData:
        """A stored set as ImageData with `like`'s normalization (still encoded if factor > 1)."""
        x, y, meta = self.load_tensors(key)
        return like.with_images(x, y, name=meta.get("name", key), meta={**meta, "decoded": False})

    # ---- a distillation part-way (under the key's lease) ------------------------------------------
    def save_partial(self, key: str, payload: dict) -> None:
        """A distillation's state part-way (see `distill.Progress`), checksummed; replaced by the next."""
        checkpoint.save(self.files, f"{key}/partial.pt", payload)

    def load_partial(self, key: str, log: Optional[Callable[[str], None]] = None) -> Optional[dict]:
        """The stored state part-way, or None (none, or a damaged one, reported through `log`: the
        distillation starts over)."""
        return checkpoint.load(self.files, f"{key}/partial.pt", log, "the distillation starts over")

    def _adopt(self, key: str, aliases: Sequence[dict]) -> None:
        """Copy an entry stored under an older key of the same set (one whose spec held a data path)."""
        for spec in aliases:
            old = make_key(spec)
            if old != key and self.has(old):
                meta = self.meta(old)
                data = self.files.read(f"{old}/data.pt")
                if data is None or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                    continue
                self.files.write(f"{key}/data.pt", data)
                self.files.write(f"{key}/meta.json", json.dumps({**meta, "key": key, "adopted_from": old},
                                                                indent=2, sort_keys=True).encode())
                return

    def get_or_create(self, spec: dict, like: ImageData, make: Callable[..., ImageData],
                      log: Optional[Callable[[str], None]] = None, resumable: bool = False,
                      aliases: Sequence[dict] = ()) -> ImageData:
        """The set for `spec`: loaded if stored (or stored under the key of one of `aliases`, older
        specs of the same set), else made by `make()` once, stored, and returned. With `resumable`,
        `make(resume=..., checkpoint=...)` gets the state a killed earlier attempt stored part-way
        (or None) and a function storing such states."""
        key = make_key(spec)
        if not self.has(key):
            with Lease(self.files, f"{key}/lease").hold(
                    on_wait=lambda: log and log(f"synthetic set {key} is being made by another process; waiting")):
                if not self.has(key):
                    self._adopt(key, aliases)
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
                    self.files.delete(f"{key}/partial.pt")
                    if log:
                        log(f"stored synthetic set {key} in {self.dir(key)} ({seconds:.1f} s)")
        return self.load(key, like)

    def list(self) -> list[dict]:
        """Metadata of every complete entry, oldest first."""
        out = []
        for name in self.files.list(""):
            if self.files.exists(f"{name}/meta.json"):
                try:
                    out.append(self.meta(name))
                except CorruptSyntheticSetError as e:
                    out.append({"key": name, "error": str(e)})
        return sorted(out, key=lambda m: m.get("created", ""))
