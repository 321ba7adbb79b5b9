"""Local copies of a remote store's artifacts (the service's model cache).

Committed versions never change, so a file once downloaded and verified can be kept; it is
re-verified against the manifest's sha256 every time it is read, and a copy that fails is simply
downloaded again. Writes are atomic (temporary file + rename), so several worker processes may
share one cache directory.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("model_store.cache")


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except OSError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only cache costs a download next time, never a failed load
            log.warning("cannot write to the model cache", extra={"key": key, "cache": str(self.root), "reason": str(exc)})
