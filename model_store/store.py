"""A versioned model store whose directory layout is its API.

    <root>/<model>/<version>/weights.safetensors   the weights (never pickled)
    <root>/<model>/<version>/manifest.json         what the weights are and how they were made
    <root>/<model>/<version>/*.png                 pictures for humans (loss curve, samples)
    <root>/<model>/aliases.json                    {"stable": 3, ...}; "latest" is implicit
    <root>/<model>/.lock                           flock serialising version numbers and aliases

A version directory appears in one atomic rename, complete and fsynced, so a
reader never sees half a version. Directories whose name is not an integer
(e.g. `.publish-*` leftovers of a crashed publisher) are ignored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from upgrader.architectures import build_model

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"
LATEST = "latest"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "store"


class StoreError(Exception):
    """Base class of every model store error."""


class ModelNotFound(StoreError, LookupError):
    pass


class VersionNotFound(StoreError, LookupError):
    pass


class IntegrityError(StoreError):
    """An artifact is missing, truncated, tampered with or does not fit its architecture."""


def default_root() -> Path:
    return Path(os.environ.get("UPGRADER_STORE") or _DEFAULT_ROOT)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '_', '.', '-' (max 64)")
    return value


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """The one place the trainer writes and the service reads."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ---- layout -----------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.root / _check_name("model name", name)

    def version_dir(self, name: str, version: int | str = LATEST) -> Path:
        return self.model_dir(name) / str(self.resolve(name, version))

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield model_dir
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- reading ----------------------------------------------------------------
    def models(self) -> list[str]:
        """Names of models with at least one complete version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Complete versions of a model, ascending (empty if the model is unknown)."""
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file())

    def aliases(self, name: str) -> dict[str, int]:
        """Explicit aliases plus the implicit `latest`."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found in store {self.root}")
        path = self.model_dir(name) / ALIASES_FILE
        stored = json.loads(path.read_text()) if path.is_file() else {}
        return {LATEST: versions[-1], **{k: int(v) for k, v in sorted(stored.items())}}

    def resolve(self, name: str, version: int | str = LATEST) -> int:
        """An integer, a numeric string or an alias -> an existing version number."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found in store {self.root}")
        if isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
            number = int(version)
            if number not in versions:
                raise VersionNotFound(f"model {name!r} has no version {number} (versions: {versions})")
            return number
        aliases = self.aliases(name)
        if version not in aliases:
            raise VersionNotFound(f"model {name!r} has no alias {version!r} (aliases: {sorted(aliases)})")
        return aliases[version]

    def manifest(self, name: str, version: int | str = LATEST) -> dict:
        path = self.version_dir(name, version) / MANIFEST_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"cannot read manifest {path}: {exc}") from exc

    def verify(self, name: str, version: int | str = LATEST) -> dict:
        """Check every artifact against the checksums in the manifest; return the manifest."""
        vdir = self.version_dir(name, version)
        manifest = self.manifest(name, version)
        for filename, expected in manifest.get("files", {}).items():
            path = vdir / filename
            if not path.is_file():
                raise IntegrityError(f"{path} is missing")
            if sha256_file(path) != expected:
                raise IntegrityError(f"{path} does not match its sha256 in the manifest")
        return manifest

    def load_state_dict(self, name: str, version: int | str = LATEST) -> tuple[dict[str, torch.Tensor], dict]:
        """Read and checksum the weights (from the same bytes that are parsed); never unpickles."""
        vdir = self.version_dir(name, version)
        manifest = self.manifest(name, version)
        path = vdir / WEIGHTS_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing") from None
        if sha256_bytes(data) != manifest.get("weights_sha256"):
            raise IntegrityError(f"{path} does not match its sha256 in the manifest (truncated or tampered)")
        try:
            state_dict = load_safetensors_bytes(data)
        except Exception as exc:  # safetensors raises its own error types
            raise IntegrityError(f"{path} is not a valid safetensors file: {exc}") from exc
        return state_dict, manifest

    def load(self, name: str, version: int | str = LATEST, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
        """Rebuild the architecture named in the manifest, load verified weights, eval mode, on `device`."""
        state_dict, manifest = self.load_state_dict(name, version)
        arch = manifest["architecture"]
        model = build_model(arch["name"], **arch.get("params", {}))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            path = self.version_dir(name, version) / WEIGHTS_FILE
            raise IntegrityError(f"{path} does not fit architecture {arch['name']!r}: {exc}") from exc
        return model.to(device).eval(), manifest

    # ---- writing ----------------------------------------------------------------
    def publish(
        self,
        name: str,
        state_dict: Mapping[str, torch.Tensor],
        manifest: Mapping,
        files: Mapping[str, bytes] | None = None,
    ) -> int:
        """Write a new version atomically and return its number.

        `manifest` is the caller's metadata; the store adds name, version, created_at,
        weights_sha256 and a sha256 for every file. `files` are extra artifacts
        (e.g. "loss_curve.png") written next to the weights.
        """
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=model_dir))
        try:
            weights = save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
            blobs = {WEIGHTS_FILE: weights, **(files or {})}
            for filename, data in blobs.items():
                if filename == MANIFEST_FILE or "/" in filename or filename.startswith("."):
                    raise ValueError(f"invalid artifact file name {filename!r}")
                _write_durably(tmp / filename, data)
            with self._locked(name):
                existing = self.versions(name)
                version = (existing[-1] if existing else 0) + 1
                full = {
                    **manifest,
                    "name": name,
                    "version": version,
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "weights_sha256": sha256_bytes(weights),
                    "files": {filename: sha256_bytes(data) for filename, data in blobs.items()},
                }
                _write_durably(tmp / MANIFEST_FILE, json.dumps(full, indent=2, sort_keys=True).encode())
                _fsync_dir(tmp)
                os.rename(tmp, model_dir / str(version))
                _fsync_dir(model_dir)
            return version
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def set_alias(self, name: str, alias: str, version: int | str) -> int:
        """Point `alias` (e.g. "stable") at a version; returns the version number."""
        _check_name("alias", alias)
        if alias == LATEST or alias.isdigit():
            raise ValueError(f"alias {alias!r} is reserved")
        with self._locked(name) as model_dir:
            number = self.resolve(name, version)
            path = model_dir / ALIASES_FILE
            aliases = json.loads(path.read_text()) if path.is_file() else {}
            aliases[alias] = number
            tmp = model_dir / f".{ALIASES_FILE}.tmp"
            _write_durably(tmp, json.dumps(aliases, indent=2, sort_keys=True).encode())
            os.replace(tmp, path)
            _fsync_dir(model_dir)
        return number
