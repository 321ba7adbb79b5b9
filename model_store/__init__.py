"""Versioned, verifiable model artifacts: the trainer publishes here, the service reads here."""

from model_store.store import (
    LATEST,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    IntegrityError,
    ModelNotFound,
    ModelStore,
    StoreError,
    VersionNotFound,
    default_root,
)

__all__ = [
    "LATEST",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "IntegrityError",
    "ModelNotFound",
    "ModelStore",
    "StoreError",
    "VersionNotFound",
    "default_root",
]
