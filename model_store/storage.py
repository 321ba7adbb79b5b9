"""Where the store's bytes live: one small interface, two implementations.

Keys are '/'-separated paths relative to the store root (`conv/3/manifest.json`). Everything
above this module (publishing, verification, aliases, the trainer, the service) talks to a
`Storage` and never knows whether it is a local directory or an S3 bucket.

The interface has exactly the primitives the publishing protocol needs and both backends can
give atomically:

* `create(key, data)`: write only if the key does not exist (S3 `If-None-Match: *`,
  locally a hard link, which fails if the name is taken) - claims version numbers;
* `replace(key, data, etag)`: write only if the key still has `etag` (S3 `If-Match`, locally
  compare-and-rename under an flock) - alias updates never lose a concurrent one;
* `put(key, data)`: an atomic whole-object write (readers see the old or the new bytes);
* `get`, `get_with_etag`, `list`, `delete`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

TMP_MARK = ".tmp-"  # temporary files of an interrupted local write contain this; `gc` removes old ones


class StorageError(Exception):
    """The storage itself failed (unreachable, denied, misconfigured): not a missing key."""


class KeyNotFound(LookupError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # unix time
    etag: str


class Storage(Protocol):
    url: str  # what to show people: a directory or s3://bucket/prefix

    def get(self, key: str) -> bytes: ...
    def get_with_etag(self, key: str) -> tuple[bytes, str]: ...
    def put(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def replace(self, key: str, data: bytes, etag: str | None) -> bool: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def init(self) -> None: ...


def open_storage(location: str | os.PathLike) -> Storage:
    """`s3://bucket/prefix` -> S3Storage (endpoint and credentials from the AWS variables); anything else is a directory."""
    text = os.fspath(location)
    if text.startswith("s3://"):
        from model_store.s3 import S3Storage  # boto3 is only imported when an S3 store is used

        return S3Storage.from_url(text)
    return LocalStorage(Path(text))


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A directory. Files follow the umask (a service running as another user can read them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"invalid store key {key!r}")
        return self.root.joinpath(*parts)

    def _write_temp(self, path: Path, data: bytes) -> Path:
        """Durably write `data` next to `path` under a temporary name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{secrets.token_hex(4)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise KeyNotFound(key) from None

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _etag(data)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)  # atomic and exclusive: fails if the name exists
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return True

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def replace(self, key: str, data: bytes, etag: str | None) -> bool:
        if etag is None:
            return self.create(key, data)
        path = self._path(key)
        with self._locked(path.parent):
            try:
                current = _etag(path.read_bytes())
            except FileNotFoundError:
                return False
            if current != etag:
                return False
            self.put(key, data)
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        found = []
        for dirpath, _, filenames in os.walk(base):
            for filename in filenames:
                path = Path(dirpath) / filename
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed while we walked
                    continue
                key = path.relative_to(self.root).as_posix()
                found.append(ObjectInfo(key, st.st_size, st.st_mtime, f"{st.st_mtime_ns}-{st.st_size}"))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Empty directories left behind (a removed version) go too, up to the root.
        parent = path.parent
        while parent != self.root and parent.is_dir():
            try:
                parent.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    break
                raise
            parent = parent.parent

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
