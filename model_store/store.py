"""A versioned model store whose layout is its API, on a local directory or S3.

    <store>/<model>/<version>/.claim                the version number, taken (first write)
    <store>/<model>/<version>/weights.safetensors   the weights (never pickled)
    <store>/<model>/<version>/*.png                 pictures for humans (loss curve, samples)
    <store>/<model>/<version>/manifest.json         what the weights are, sha256 of every file (last write)
    <store>/<model>/aliases.json                    {"stable": 3, ...}; "latest" is implicit

Publishing needs no rename, so it is the same on a directory and on object storage:
1. claim a version number with a create-if-absent write of `.claim` (two publishers never get
   the same number: the loser's create fails and it tries the next number);
2. upload the artifacts;
3. write `manifest.json` last: the commit point. A version exists for readers only once its
   manifest does, and the manifest holds the sha256 of every file, so a reader only ever sees
   complete, verifiable versions. A publisher killed before step 3 leaves an invisible claim
   that `gc` removes after a grace period.
Alias changes are compare-and-swap writes (ETag), retried, so concurrent promotions never lose one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from model_store.cache import ArtifactCache
from model_store.storage import TMP_MARK, KeyNotFound, LocalStorage, ObjectInfo, Storage, StorageError, open_storage
from upgrader.architectures import build_model

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"
CLAIM_FILE = ".claim"
LATEST = "latest"
GC_GRACE_S = 3600.0  # a claim younger than this may belong to a publisher still uploading
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")  # ASCII digits only: "²".isdigit() is True, int("²") fails
_DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "store"


class StoreError(Exception):
    """Base class of every model store error."""


class ModelNotFound(StoreError, LookupError):
    pass


class VersionNotFound(StoreError, LookupError):
    pass


class IntegrityError(StoreError):
    """An artifact is missing, truncated, tampered with or does not fit its architecture."""


class StoreUnavailable(StoreError):
    """The storage itself failed (unreachable, denied): nothing is known about the model."""


def default_location() -> str:
    return os.environ.get("UPGRADER_STORE") or str(_DEFAULT_ROOT)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '_', '.', '-' (max 64)")
    return value


def parse_version(text: str) -> int | None:
    """'3' -> 3; anything but canonical ASCII digits (an alias, '²', '03') -> None."""
    return int(text) if _VERSION_RE.match(text) else None


@dataclass
class StoreScan:
    """What one listing of the store says: committed versions per model, and each aliases file's tag."""

    versions: dict[str, list[int]] = field(default_factory=dict)
    aliases_tags: dict[str, str] = field(default_factory=dict)


def _parse_manifest(key: str, data: bytes) -> dict:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise IntegrityError(f"cannot read {key}: {exc}") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"cannot read {key}: not a JSON object")
    return manifest


def _scan(objects: list[ObjectInfo]) -> StoreScan:
    scan = StoreScan()
    for obj in objects:
        parts = obj.key.split("/")
        if not _NAME_RE.match(parts[0]):
            continue
        if len(parts) == 3 and parts[2] == MANIFEST_FILE and (number := parse_version(parts[1])) is not None:
            scan.versions.setdefault(parts[0], []).append(number)
        elif len(parts) == 2 and parts[1] == ALIASES_FILE:
            scan.aliases_tags[parts[0]] = obj.etag
    scan.versions = {name: sorted(v) for name, v in sorted(scan.versions.items())}
    return scan


def _check_fits(where: str, state_dict: Mapping[str, torch.Tensor], manifest: dict) -> torch.nn.Module:
    """The architecture the manifest names, built with the weights loaded (IntegrityError if they do not fit)."""
    arch = manifest["architecture"]
    model = build_model(arch["name"], **arch.get("params", {}))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise IntegrityError(f"{where}/{WEIGHTS_FILE} does not fit architecture {arch['name']!r}: {exc}") from exc
    return model


class ModelStore:
    """The one place the trainer writes and the service reads.

    `location` is a directory or `s3://bucket/prefix`. `cache_dir`, for a remote store, keeps
    verified local copies of the versions read (versions are immutable once committed), so a
    restart does not download them again; they are re-verified every time they are loaded.
    """

    def __init__(self, location: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 storage: Storage | None = None) -> None:
        self.storage = storage or open_storage(location if location is not None else default_location())
        self.url = self.storage.url
        remote = not isinstance(self.storage, LocalStorage)
        self.cache = ArtifactCache(Path(cache_dir)) if cache_dir is not None and remote else None
        self._aliases: dict[str, tuple[str, dict[str, int]]] = {}  # name -> (listing tag, stored aliases)

    def __repr__(self) -> str:
        return f"ModelStore({self.url!r})"

    @property
    def root(self) -> Path:
        """The directory of a local store."""
        if not isinstance(self.storage, LocalStorage):
            raise TypeError(f"store {self.url} is not a local directory")
        return self.storage.root

    # ---- storage calls, with the store's errors -------------------------------------
    def _list(self, prefix: str = "") -> list[ObjectInfo]:
        try:
            return self.storage.list(prefix)
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from None

    def _get(self, key: str) -> bytes:
        try:
            return self.storage.get(key)
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from None

    # ---- reading ----------------------------------------------------------------
    def scan(self) -> StoreScan:
        """Every model's committed versions, from one listing of the store."""
        return _scan(self._list())

    def models(self) -> list[str]:
        """Names of models with at least one complete version, sorted."""
        return list(self.scan().versions)

    def versions(self, name: str) -> list[int]:
        """Complete versions of a model, ascending (empty if the model is unknown)."""
        return _scan(self._list(f"{_check_name('model name', name)}/")).versions.get(name, [])

    def stored_aliases(self, name: str, tag: str | None) -> dict[str, int]:
        """A model's explicit aliases; `tag` is its aliases file's tag in a listing (`scan()`): re-read only when it changed."""
        if tag is None:
            return {}
        cached = self._aliases.get(name)
        if cached and cached[0] == tag:
            return dict(cached[1])
        key = f"{name}/{ALIASES_FILE}"
        try:
            stored = json.loads(self._get(key))
            aliases = {str(k): int(v) for k, v in stored.items()}
        except KeyNotFound:
            aliases = {}
        except (ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{key} is not a JSON object of alias -> version: {exc}") from None
        self._aliases[name] = (tag, aliases)
        return dict(aliases)

    def index(self, name: str) -> tuple[list[int], dict[str, int]]:
        """(complete versions, aliases with the implicit latest) of one model, from one listing."""
        scan = _scan(self._list(f"{_check_name('model name', name)}/"))
        versions = scan.versions.get(name, [])
        if not versions:
            raise ModelNotFound(f"model {name!r} not found in the store")
        return versions, {LATEST: versions[-1], **dict(sorted(self.stored_aliases(name, scan.aliases_tags.get(name)).items()))}

    def aliases(self, name: str) -> dict[str, int]:
        """Explicit aliases plus the implicit `latest`."""
        return self.index(name)[1]

    def resolve(self, name: str, version: int | str = LATEST) -> int:
        """An integer, a string of ASCII digits or an alias -> an existing version number."""
        versions, aliases = self.index(name)
        number = version if isinstance(version, int) else parse_version(version)
        if number is not None:
            if number not in versions:
                raise VersionNotFound(f"model {name!r} has no version {number} (versions: {versions})")
            return number
        if version not in aliases:
            raise VersionNotFound(f"model {name!r} has no alias {version!r} (aliases: {sorted(aliases)})")
        return aliases[version]

    def _artifact(self, name: str, number: int, filename: str, sha256: str | None) -> bytes:
        """A version's file, checked against its sha256; from the local cache when it holds a good copy."""
        key = f"{name}/{number}/{filename}"
        if self.cache is not None:
            cached = self.cache.read(key)
            if cached is not None and sha256 is not None and sha256_bytes(cached) == sha256:
                return cached
        try:
            data = self._get(key)
        except KeyNotFound:
            raise IntegrityError(f"{key} is missing") from None
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise IntegrityError(f"{key} does not match its sha256 in the manifest (truncated or tampered)")
        if self.cache is not None:
            self.cache.write(key, data)
        return data

    def _number(self, name: str, version: int | str) -> int:
        """A version number to read; an int is taken as it is (reading its manifest proves it exists)."""
        return version if isinstance(version, int) else self.resolve(name, version)

    def manifest(self, name: str, version: int | str = LATEST) -> dict:
        number = self._number(name, version)
        key = f"{name}/{number}/{MANIFEST_FILE}"
        if self.cache is not None and (cached := self.cache.read(key)) is not None:
            with contextlib.suppress(IntegrityError):  # a damaged cached copy: read the store's
                return _parse_manifest(key, cached)
        try:
            data = self._get(key)
        except KeyNotFound:
            self.resolve(name, number)  # raises ModelNotFound / VersionNotFound
            raise IntegrityError(f"{key} is missing") from None
        manifest = _parse_manifest(key, data)
        if self.cache is not None:
            self.cache.write(key, data)
        return manifest

    def verify(self, name: str, version: int | str = LATEST) -> dict:
        """Check every artifact against the checksums in the manifest; return the manifest."""
        number = self._number(name, version)
        manifest = self.manifest(name, number)
        for filename, expected in manifest.get("files", {}).items():
            self._artifact(name, number, filename, expected)
        return manifest

    def read_file(self, name: str, version: int | str, filename: str) -> bytes:
        """One artifact of a version (e.g. samples.png), verified against the manifest."""
        number = self._number(name, version)
        expected = self.manifest(name, number).get("files", {}).get(filename)
        if expected is None:
            raise IntegrityError(f"{name}/{number} has no {filename}")
        return self._artifact(name, number, filename, expected)

    def load_state_dict(self, name: str, version: int | str = LATEST) -> tuple[dict[str, torch.Tensor], dict]:
        """Read and checksum the weights (from the same bytes that are parsed); never unpickles."""
        number = self._number(name, version)
        manifest = self.manifest(name, number)
        data = self._artifact(name, number, WEIGHTS_FILE, manifest.get("weights_sha256") or "missing")
        try:
            state_dict = load_safetensors_bytes(data)
        except Exception as exc:  # safetensors raises its own error types
            raise IntegrityError(f"{name}/{number}/{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
        return state_dict, manifest

    def load(self, name: str, version: int | str = LATEST, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
        """Rebuild the architecture named in the manifest, load verified weights, eval mode, on `device`."""
        state_dict, manifest = self.load_state_dict(name, version)
        return _check_fits(f"{name}/{manifest['version']}", state_dict, manifest).to(device).eval(), manifest

    # ---- writing ----------------------------------------------------------------
    def _claim(self, name: str) -> int:
        """Take the next free version number with a create-if-absent write."""
        taken = {parse_version(obj.key.split("/")[1]) for obj in self._list(f"{name}/") if obj.key.count("/") >= 2}
        number = max((n for n in taken if n is not None), default=0) + 1
        claim = json.dumps({"claimed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "host": socket.gethostname(), "pid": os.getpid()}).encode()
        while not self._write(self.storage.create, f"{name}/{number}/{CLAIM_FILE}", claim):
            number += 1  # another publisher took it between our listing and our write
        return number

    def _write(self, method, key: str, *args) -> bool | None:
        try:
            return method(key, *args)
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from None

    def publish(
        self,
        name: str,
        state_dict: Mapping[str, torch.Tensor],
        manifest: Mapping,
        files: Mapping[str, bytes] | None = None,
    ) -> int:
        """Write a new version and return its number (claim, upload, then the manifest as the commit).

        `manifest` is the caller's metadata; the store adds name, version, created_at,
        weights_sha256 and a sha256 for every file. `files` are extra artifacts
        (e.g. "loss_curve.png") written next to the weights.
        """
        _check_name("model name", name)
        weights = save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})
        blobs = {WEIGHTS_FILE: weights, **(files or {})}
        for filename in blobs:
            if filename == MANIFEST_FILE or "/" in filename or filename.startswith(".") or TMP_MARK in filename:
                raise ValueError(f"invalid artifact file name {filename!r}")
        version = self._claim(name)
        for filename, data in blobs.items():
            self._write(self.storage.put, f"{name}/{version}/{filename}", data)
        full = {
            **manifest,
            "name": name,
            "version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "weights_sha256": sha256_bytes(weights),
            "files": {filename: sha256_bytes(data) for filename, data in blobs.items()},
        }
        committed = json.dumps(full, indent=2, sort_keys=True).encode()
        if not self._write(self.storage.create, f"{name}/{version}/{MANIFEST_FILE}", committed):
            raise StoreError(f"{name}/{version} was committed by someone else (its claim was garbage-collected mid-publish?)")
        return version

    def copy_from(self, source: ModelStore, name: str, version: int | str = LATEST, as_name: str | None = None) -> tuple[int, bool]:
        """Copy one version of `source` into this store as a new version of `as_name` (default `name`): (version, copied).

        Promotion between stores (a run's directory to the shared store, a directory to S3), as MLflow's
        registry copies a version: every artifact is checked against the source's manifest and the weights
        must fit their architecture before anything is written; the copy is published like any version
        (its own number, manifest last), keeps the source's metadata, and records where it came from
        (`copied_from`). The weights' bytes, and so `weights_sha256`, are the source's. Idempotent: where
        `as_name` already has a version with the same artifacts (every sha256 equal), that version is
        returned with copied=False and nothing is written, so a deployment may seed a store at every start.
        """
        number = source._number(name, version)
        state_dict, manifest = source.load_state_dict(name, number)  # each read below checks its sha256
        files = {f: source.read_file(name, number, f) for f in manifest.get("files", {}) if f != WEIGHTS_FILE}
        _check_fits(f"{name}/{number}", state_dict, manifest)
        target = as_name or name
        if target in self.models():
            for existing in self.versions(target):
                if self.manifest(target, existing).get("files") == manifest.get("files"):
                    return existing, False
        added_by_publish = {"name", "version", "created_at", "weights_sha256", "files"}
        metadata = {k: v for k, v in manifest.items() if k not in added_by_publish}
        metadata["copied_from"] = {"store": source.url, "name": name, "version": number,
                                   "created_at": manifest.get("created_at"), "weights_sha256": manifest.get("weights_sha256")}
        copied = self.publish(target, state_dict, metadata, files)
        written = self.manifest(target, copied)["weights_sha256"]
        if written != manifest.get("weights_sha256"):
            raise IntegrityError(f"{target}/{copied}: the copy's weights hash {written} differs from "
                                 f"{name}/{number}'s {manifest.get('weights_sha256')}")
        return copied, True

    def set_alias(self, name: str, alias: str, version: int | str) -> int:
        """Point `alias` (e.g. "stable") at a version with a compare-and-swap; returns the version number."""
        _check_name("alias", alias)
        if alias == LATEST or alias.isdigit():
            raise ValueError(f"alias {alias!r} is reserved")
        number = self.resolve(name, version)
        key = f"{name}/{ALIASES_FILE}"
        for attempt in range(50):
            try:
                data, etag = self.storage.get_with_etag(key)
                aliases = json.loads(data)
            except KeyNotFound:
                aliases, etag = {}, None
            except StorageError as exc:
                raise StoreUnavailable(str(exc)) from None
            except ValueError as exc:
                raise IntegrityError(f"{key} is not valid JSON: {exc}") from None
            aliases[alias] = number
            if self._write(self.storage.replace, key, json.dumps(aliases, indent=2, sort_keys=True).encode(), etag):
                return number
            time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))  # lost the race: read the winner's and retry
        raise StoreError(f"could not update {key}: 50 concurrent updates won over this one")

    # ---- housekeeping -------------------------------------------------------------
    def gc(self, grace_s: float = GC_GRACE_S, dry_run: bool = False) -> list[str]:
        """Remove claimed-but-never-committed versions and stale temporary files older than `grace_s`.

        Returns the keys removed (or that would be, with dry_run). Committed versions are never touched.
        """
        objects = self._list()
        now = time.time()
        by_version: dict[tuple[str, str], list[ObjectInfo]] = {}
        doomed: list[str] = []
        for obj in objects:
            parts = obj.key.split("/")
            stale = now - obj.modified > grace_s
            if TMP_MARK in parts[-1] or any(part.startswith(".publish-") for part in parts):
                if stale:  # an interrupted local write, or a directory left by the old rename-based publisher
                    doomed.append(obj.key)
            elif len(parts) >= 3 and parse_version(parts[1]) is not None:
                by_version.setdefault((parts[0], parts[1]), []).append(obj)
        for files in by_version.values():
            committed = any(o.key.endswith(f"/{MANIFEST_FILE}") and o.key.count("/") == 2 for o in files)
            if not committed and all(now - o.modified > grace_s for o in files):
                doomed += [o.key for o in files]
        if not dry_run:
            for key in doomed:
                self._write(self.storage.delete, key)
        return doomed

    def init(self) -> None:
        """Create the store (the directory, or the bucket) if it does not exist."""
        try:
            self.storage.init()
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from None
