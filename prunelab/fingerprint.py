"""Content fingerprints of data on disk, so that a chain's identity never holds a machine's path.

The same CIFAR-10 under `/home/me/data` on a laptop and `/mnt/datasets` on a cluster is one data set:
a chain's hash names it by the data set's name and the fingerprint of the files its loader reads
(the folders `catalog.DATASETS[name].layout` names under the root: relative path, size and sha256
of each file). Hashing is done once per machine: the result is cached under the prunelab cache,
keyed by the listing (real path, relative paths, sizes, modification times), so a file that changes
is hashed again and an untouched tree costs one directory walk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from .catalog import DATASETS
from .files import atomic_write, cache_dir

_memo: dict[str, str] = {}  # listing key -> fingerprint, for this process


def _cache_file() -> Path:
    return cache_dir() / "fingerprints.json"


def _files(folders: list[Path]) -> list[Path]:
    out = []
    for folder in folders:
        if folder.is_file():
            out.append(folder)
        elif folder.is_dir():
            out.extend(sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")))
    return out


def _digest(base: Path, files: list[Path]) -> str:
    """Names relative to `base` as listed (a file may be a link to anywhere: its name under the root
    counts, not where it points), with each file's size and content hash."""
    h = hashlib.sha256()
    for p in files:
        f = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                f.update(block)
        h.update(f"{p.relative_to(base).as_posix()}\0{p.stat().st_size}\0{f.hexdigest()}\n".encode())
    return h.hexdigest()[:16]


def _fingerprint(base: Path, folders: list[Path]) -> Optional[str]:
    files = _files(folders)
    if not files:
        return None
    listing = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    if key in _memo:
        return _memo[key]
    try:
        cache = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = _digest(base, files)
        try:
            atomic_write(_cache_file(), json.dumps(cache).encode())
        except OSError:
            pass  # an unwritable cache only means hashing again next time
    _memo[key] = cache[key]
    return cache[key]


def dataset_fingerprint(name: str, root: str) -> Optional[str]:
    """The fingerprint of data set `name` under `root`, or None when its files are not there."""
    facts = DATASETS.get(name)
    base = Path(root).expanduser()
    folders = [base / sub for sub in facts.layout] if facts and facts.layout else [base]
    return _fingerprint(base, folders)


def file_fingerprint(path: str) -> Optional[str]:
    """The fingerprint of one file (an IDC `data.pt`, or the file of a folder given in its place), or
    None when it is not there."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "data.pt"
    return _fingerprint(p.parent, [p]) if p.is_file() else None


def clear_memo() -> None:
    """Forget this process's fingerprints (tests that change files within one mtime tick)."""
    _memo.clear()
