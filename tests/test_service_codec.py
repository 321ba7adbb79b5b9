"""The service's image codec and settings, without HTTP."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_support import png_bytes, small_inputs

from service import Settings
from service.codec import decode_image, encode_png
from service.errors import ApiError


def decode_error(data: bytes, size: int = 8) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_image(data, size, item=3, max_bytes=64 * 1024)
    assert caught.value.item == 3
    return caught.value


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which carries one tiny row (a bomb's header)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b"")


def test_rgb_png_decodes_exactly(real_images):
    image = small_inputs(real_images)[0]
    decoded = decode_image(png_bytes(image), 8, item=0)
    assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, image.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1"])
def test_other_modes_become_rgb_like_pillow_converts_them(real_images, mode):
    image = small_inputs(real_images)[1]
    data = png_bytes(image, mode)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decode_image(data, 8, item=0), expected)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 500).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, "PNG")  # a real 16-bit greyscale PNG
    decoded = decode_image(buffer.getvalue(), 8, item=0)
    assert np.array_equal(decoded[:, :, 0], (grey16 >> 8).astype(np.uint8))
    assert np.array_equal(decoded[:, :, 0], decoded[:, :, 2])


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_other_formats_decode_like_pillow(real_images, fmt):
    data = png_bytes(small_inputs(real_images)[2], fmt=fmt)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decode_image(data, 8, item=0), expected)


def test_bad_inputs_are_refused_with_a_code(real_images):
    good = png_bytes(small_inputs(real_images)[0])
    assert decode_error(b"").code == "empty_image"
    assert decode_error(b"not an image at all").code == "unsupported_image"
    assert decode_error(png_bytes(small_inputs(real_images)[0], fmt="GIF")).code == "unsupported_image"
    assert decode_error(good[: len(good) // 2]).code == "corrupt_image"
    assert decode_error(good[:20]).code == "corrupt_image"
    assert decode_error(b"x" * (64 * 1024 + 1)).code == "image_too_large"
    wrong = decode_error(png_bytes(np.zeros((8, 9, 3), np.uint8)))
    assert (wrong.status, wrong.code) == (422, "wrong_size") and "9x8" in wrong.message


def test_huge_declared_dimensions_are_refused_from_the_header():
    for width, height in [(100_000, 100_000), (2048, 2048), (1_000_000, 1)]:
        error = decode_error(png_with_declared_size(width, height))
        assert (error.status, error.code) == (413, "dimensions_too_large"), (width, height, error.message)


@pytest.mark.parametrize("level", [0, 1, 9])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_encode_png_roundtrips_exactly_through_pillow(level, as_tensor):
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image[:, 16:] = 7  # a flat half, so deflate has something to shrink
    png = encode_png(image if as_tensor else image.numpy(), level)
    with Image.open(io.BytesIO(png)) as decoded:
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (32, 32))
        assert np.array_equal(np.asarray(decoded), image.permute(1, 2, 0).numpy())
    assert (len(png) > 3 * 32 * 32) == (level == 0)  # stored at level 0, deflated above


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UPGRADER_STORE", str(tmp_path))
    monkeypatch.setenv("UPGRADER_API_KEYS", " k1, k2 ,,")
    monkeypatch.setenv("UPGRADER_MAX_BATCH_IMAGES", "16")
    monkeypatch.setenv("UPGRADER_ADMIN_TOKEN", "")
    settings = Settings()
    assert settings.store == str(tmp_path) and settings.max_batch_images == 16 and settings.max_wait_ms == 2.0
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert settings.admin_token is None and "k1" not in repr(settings)
    with pytest.raises(ValueError, match="max_queue_images"):
        Settings(max_queue_images=8, max_images_per_request=16)


def test_default_workers_two_on_a_multicore_cpu_one_on_cuda_or_one_core(monkeypatch, tmp_path):
    from service.__main__ import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_workers(Settings(store=tmp_path, device="cpu")) == 2
    assert default_workers(Settings(store=tmp_path, device="cuda")) == 1  # the setting alone decides; no GPU needed
    assert Settings(store=tmp_path, workers=2).inference_threads() == 1 and Settings(store=tmp_path).inference_threads() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert default_workers(Settings(store=tmp_path, device="cpu")) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert Settings(store=tmp_path, workers=3).inference_threads() == 5 and Settings(store=tmp_path).inference_threads() == 15
