"""Shared fixtures: the real CIFAR-10 copy beside the project, and throwaway stores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("UPGRADER_DATA", PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "test").is_dir():
        pytest.fail(f"CIFAR-10 copy not found at {DATA_DIR} (set UPGRADER_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def real_images(data_dir) -> torch.Tensor:
    """64 real 32x32 test images (8 per class from 8 classes), uint8 N x 3 x 32 x 32."""
    files = []
    for class_dir in sorted((data_dir / "test").iterdir())[:8]:
        files += sorted(class_dir.glob("*.jpg"))[:8]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture()
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")
