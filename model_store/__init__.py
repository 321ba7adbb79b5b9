"""Versioned, verifiable model artifacts: the trainer publishes here, the service reads here."""

from model_store.store import (
    LATEST,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    IntegrityError,
    ModelNotFound,
    ModelStore,
    StoreError,
    StoreUnavailable,
    VersionNotFound,
    default_location,
    parse_version,
)

__all__ = [
    "LATEST",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "IntegrityError",
    "ModelNotFound",
    "ModelStore",
    "StoreError",
    "StoreUnavailable",
    "VersionNotFound",
    "default_location",
    "parse_version",
]
