"""Where the result store's files live: a local directory, or a bucket (`s3://`, `gs://`) through fsspec.

The store needs five operations from either: read a whole file, write one atomically (readers see the
old content or the new, never a part), create one only if absent (the lease's primitive, see
`prunelab.lease`), list a folder, delete. A local write goes through a temporary name and a rename;
an object store's PUT is already all-or-nothing (a multipart upload appears only when completed), so
an upload cut short leaves the previous object. Conditional create is `link(2)` of a complete
temporary file on POSIX (atomic on NFS too) and `If-None-Match: *` on S3 (`ifGenerationMatch=0` on
GCS), both through fsspec's `pipe_file(mode="create")`. Endpoint and credentials come from each
SDK's standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...; `GOOGLE_APPLICATION_CREDENTIALS`).
"""

from __future__ import annotations

import abc
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError
from .files import atomic_write

# the fsspec implementation each scheme needs, and the extra that installs it
BACKENDS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "memory": ("fsspec", "")}


def is_uri(root: Union[str, Path]) -> bool:
    """True for a URI with a scheme (`s3://bucket/prefix`), not a local path."""
    return "://" in str(root) and not str(root).startswith("file://")


def local_path(root: Union[str, Path]) -> Path:
    return Path(str(root)[len("file://"):] if str(root).startswith("file://") else root).expanduser()


class Blobs(abc.ABC):
    """Files under one root, addressed by keys relative to it (`chains/<hash>/state.pt`): the interface
    `LocalBlobs` and `RemoteBlobs` implement."""

    root: str

    @abc.abstractmethod
    def describe(self, key: str) -> str:
        """The file's full name, for messages."""

    @abc.abstractmethod
    def read(self, key: str) -> Optional[bytes]:
        """The whole file, or None when there is none."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Replace the file atomically."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write the file only if there is none; True when this call created it."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True when the file is there."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the file if there is one."""

    @abc.abstractmethod
    def list(self, folder: str) -> list[str]:
        """Names of the files and folders directly in `folder` (empty when there is none), sorted."""

    def copy(self, src: str, dst: str) -> None:
        data = self.read(src)
        if data is not None:
            self.write(dst, data)

    @abc.abstractmethod
    def sub(self, folder: str) -> "Blobs":
        """The same storage rooted at `folder`."""


class LocalBlobs(Blobs):
    def __init__(self, root: Union[str, Path]):
        self.path = local_path(root)
        self.root = str(self.path)

    def file(self, key: str) -> Path:
        return self.path / key

    def describe(self, key: str) -> str:
        return str(self.file(key))

    def read(self, key):
        try:
            return self.file(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write(self, key, data):
        atomic_write(self.file(key), data)

    def create(self, key, data):
        path = self.file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.new-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # fails if the name exists; the file appears complete or not at all
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key):
        return self.file(key).exists()

    def delete(self, key):
        self.file(key).unlink(missing_ok=True)

    def list(self, folder):
        d = self.file(folder)
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def copy(self, src, dst):
        # a second name for the same file, then an atomic rename onto `dst`: no reader ever misses
        # `src`, and two writers racing (a lease taken over) each leave a whole file
        tmp = self.file(dst).with_name(f".{self.file(dst).name}.{uuid.uuid4().hex}")
        try:
            os.link(self.file(src), tmp)
        except FileNotFoundError:
            return
        except OSError:  # a file system without hard links
            return super().copy(src, dst)
        os.replace(tmp, self.file(dst))

    def sub(self, folder):
        return LocalBlobs(self.file(folder))


_filesystems: dict[tuple, object] = {}
# what an fsspec file system reads from the environment when it is made: a change (a test pointing
# AWS_ENDPOINT_URL at another server) makes a new one
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_MAX_ATTEMPTS",
        "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")


def _filesystem(scheme: str):
    """One fsspec file system per scheme, process and relevant environment, listing caches off
    (other nodes write the same prefixes)."""
    import fsspec  # the local store never needs it

    key = (scheme, os.getpid(), tuple(os.environ.get(k) for k in _ENV))
    if key not in _filesystems:
        _filesystems[key] = fsspec.filesystem(scheme, use_listings_cache=False, skip_instance_cache=True)
    return _filesystems[key]


class RemoteBlobs(Blobs):
    """A bucket through fsspec."""

    def __init__(self, root: str):
        scheme = root.split("://", 1)[0]
        package, extra = BACKENDS.get(scheme, (None, None))
        if package is None:
            raise ConfigError("--storage-path", f"{root}: the result store does not know the scheme {scheme}://",
                              "use a local path, s3://bucket/prefix or gs://bucket/prefix")
        try:
            self.fs = _filesystem(scheme)
        except ImportError:
            raise ConfigError("--storage-path", f"{root} needs the {package} package",
                              f"pip install 'prunelab[{extra}]' (or {package})") from None
        self.root = root.rstrip("/")
        self.scheme = scheme
        self.base = self.fs._strip_protocol(self.root)

    def _p(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def describe(self, key):
        return f"{self.scheme}://{self._p(key)}"

    def read(self, key):
        try:
            return self.fs.cat_file(self._p(key))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def write(self, key, data):
        self.fs.pipe_file(self._p(key), data)

    def create(self, key, data):
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")
            return True
        except FileExistsError:  # 412: the name exists
            return False
        except OSError as e:
            if "ConditionalRequestConflict" in str(e) or "409" in str(e):
                return False  # S3: another conditional create of the name is in flight
            raise

    def exists(self, key):
        return bool(self.fs.exists(self._p(key)))

    def delete(self, key):
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            pass

    def list(self, folder):
        try:
            entries = self.fs.ls(self._p(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        prefix = self._p(folder).rstrip("/") + "/"
        return sorted({e[len(prefix):].split("/")[0] for e in entries if e.startswith(prefix)} - {""})

    def copy(self, src, dst):
        try:
            self.fs.copy(self._p(src), self._p(dst))
        except FileNotFoundError:
            pass

    def sub(self, folder):
        return RemoteBlobs(self.describe(folder))


def open_root(root: Union[str, Path]) -> Blobs:
    """The storage at `root`: a local path (or file:// URI), or a bucket URI."""
    return RemoteBlobs(str(root)) if is_uri(root) else LocalBlobs(root)


def join(root: Union[str, Path], *parts: str) -> str:
    """`root` (path or URI) with `parts` appended."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_uri(root) else str(Path(local_path(root), *parts))
