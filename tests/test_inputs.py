"""service.runtime.inputs: what a photo has been through (its JPEG quality, its noise), and the version that answers it."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_service_support import LiveServer
from test_service_wholeimage import publish_photo

from model_store import ModelStore
from service.runtime import inputs

NATURAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sr-natural" / "bsd200"


def photo(seed: int = 0, size: int = 96) -> np.ndarray:
    """uint8 H x W x 3: a real photograph's corner when sr-natural is here, else smooth synthetic structure."""
    files = sorted(NATURAL.glob("*.png"))
    if files:
        with Image.open(files[seed % len(files)]) as image:
            return np.asarray(image.convert("RGB"))[:size, :size].copy()
    y, x = np.mgrid[0:size, 0:size] / size
    return (np.stack([np.sin(6 * x + seed), np.cos(5 * y), x * y], axis=-1) * 100 + 128).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("quality", [30, 50, 75, 90, 95, 100])
def test_a_jpegs_quality_is_read_back_from_its_quantization_tables(quality):
    with Image.open(io.BytesIO(encoded(photo(), "JPEG", quality=quality))) as image:
        assert inputs.jpeg_quality(image.quantization) == quality
    assert inputs.jpeg_quality(None) is None and inputs.jpeg_quality({}) is None


@pytest.mark.parametrize("sigma", [3.0, 5.0, 10.0])
def test_the_noise_estimate_follows_added_gaussian_noise(sigma):
    flat = np.full((128, 128, 3), 120, np.uint8)
    assert inputs.noise_sigma(flat) == 0.0
    noisy = (flat + np.random.default_rng(1).normal(0, sigma, flat.shape)).round().clip(0, 255).astype(np.uint8)
    assert inputs.noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    image = photo(2).astype(np.float64)  # on a photograph: its own texture adds a little, the noise adds the rest
    with_noise = (image + np.random.default_rng(2).normal(0, sigma, image.shape)).round().clip(0, 255).astype(np.uint8)
    assert inputs.noise_sigma(with_noise) > inputs.noise_sigma(image.astype(np.uint8)) + sigma / 2


def test_clean_photos_go_to_the_clean_version_and_jpegs_and_noisy_ones_to_the_serving_one(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish_photo(store, seed=0)  # version 1: a clean model
    publish_photo(store, seed=1, degradation=inputs.REALISTIC)  # version 2, serving: one trained on realistic inputs
    store.set_alias("photo", inputs.CLEAN_ALIAS, 1)
    flat = np.full((48, 48, 3), 120, np.uint8)
    flat[:, 24:] = 60  # an edge, no noise
    noisy = (flat + np.random.default_rng(3).normal(0, 6, flat.shape)).round().clip(0, 255).astype(np.uint8)
    with LiveServer(store=store.root, poll_interval_s=60) as live:
        def answered_by(data: bytes, content_type: str, version: str = "latest") -> str:
            response = httpx.post(f"{live.url}/upscale?model=photo&version={version}", content=data, timeout=60,
                                  headers={"content-type": content_type, "accept": "image/png"})
            assert response.status_code == 200, response.text
            return response.headers["x-upgrader-model"]

        assert answered_by(encoded(flat), "image/png") == "photo:1"  # clean: the clean version
        assert answered_by(encoded(flat, "JPEG", quality=98), "image/jpeg") == "photo:1"
        assert answered_by(encoded(flat, "JPEG", quality=75), "image/jpeg") == "photo:2"  # compressed: the realistic one
        assert answered_by(encoded(noisy), "image/png") == "photo:2"  # noisy: the realistic one
        assert answered_by(encoded(flat), "image/png", version="2") == "photo:2"  # a version named is the version served
        model = httpx.get(f"{live.url}/models/photo").json()
        assert "clean photos: version 1 (alias clean)" in model["input_routing"]
