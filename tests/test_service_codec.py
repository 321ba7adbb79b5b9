"""The service's image codec and settings, without HTTP."""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_support import png_bytes, small_inputs

from service import Settings
from service.runtime import codec
from service.runtime.codec import decode_image, encode_png
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


def pillow_rgb(data: bytes) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except Exception:  # noqa: BLE001 - any refusal: the codec must refuse it too
        return None


def test_pngs_decode_through_libpng_and_corrupt_ones_are_judged_as_pillow_judges_them(real_images):
    """8-bit PNGs go through libpng (codec._decode_png, GIL released); every truncation and 400 random byte
    flips of a real PNG are accepted with Pillow's pixels or refused with a 4xx, as Pillow accepts or refuses them."""
    good = png_bytes(small_inputs(real_images)[0])
    assert codec.png_decoder() == "torchcodec"  # what the service logs at start-up
    assert np.array_equal(codec._decode_png(good, 8), pillow_rgb(good))  # the fast path, not the fallback
    assert codec._decode_png(png_bytes(np.zeros((8, 9, 3), np.uint8)), 8) is None  # wrong size: Pillow's path names it
    rng = random.Random(0)
    cases = [good[:n] for n in range(len(good))]
    for _ in range(400):
        flipped = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        cases.append(bytes(flipped))
    fast = 0
    for data in cases:
        expected = pillow_rgb(data)
        fast += codec._decode_png(data, 8) is not None
        try:
            decoded = decode_image(data, 8, item=5, max_bytes=64 * 1024)
        except ApiError as error:
            assert 400 <= error.status < 500 and error.item == 5
            assert expected is None or expected.shape != (8, 8, 3), f"refused ({error.code}) what Pillow decodes"
        else:
            assert expected is not None and np.array_equal(decoded, expected)
    assert fast > 10  # the corrupt-but-decodable cases also took the libpng path


def test_without_torchcodec_every_png_is_decoded_by_pillow(real_images, tmp_path):
    """Where TorchCodec does not load (not installed, or built for another torch), PIL decodes everything, the same pixels."""
    good = png_bytes(small_inputs(real_images)[0])
    (tmp_path / "good.png").write_bytes(good)
    script = (
        "import sys; sys.modules['torchcodec'] = None\n"  # `import torchcodec` now raises ImportError
        "import numpy as np; from pathlib import Path\n"
        "from service.runtime import codec\n"
        f"data = Path({str(tmp_path / 'good.png')!r}).read_bytes()\n"
        "assert codec._libpng() is None and codec._decode_png(data, 8) is None and codec.png_decoder() == 'pil'\n"
        "np.save(sys.argv[1], codec.decode_image(data, 8, 0))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.npy")], check=True, cwd=Path(__file__).parents[1])
    assert np.array_equal(np.load(tmp_path / "out.npy"), decode_image(good, 8, item=0))


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
    import service.__main__
    import service.settings
    from service.__main__ import default_workers

    def cpus(count: int) -> None:
        for module in (service.__main__, service.settings):
            monkeypatch.setattr(module, "usable_cpus", lambda: count)

    cpus(2)
    assert default_workers(Settings(store=tmp_path, device="cpu")) == 2
    assert default_workers(Settings(store=tmp_path, device="cuda")) == 1  # the setting alone decides; no GPU needed
    assert Settings(store=tmp_path, workers=2).inference_threads() == 1 and Settings(store=tmp_path).inference_threads() == 1
    cpus(1)
    assert default_workers(Settings(store=tmp_path, device="cpu")) == 1
    cpus(16)
    assert Settings(store=tmp_path, workers=3).inference_threads() == 5 and Settings(store=tmp_path).inference_threads() == 15


def test_usable_cpus_follow_the_affinity_mask_and_the_cgroup_quota(tmp_path):
    """A process pinned to one CPU (as a container's cpuset pins it) counts one, whatever the host has; a quota caps it."""
    import subprocess
    import sys

    from upgrader.cpus import cpu_quota

    pinned = subprocess.run([sys.executable, "-c", "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                             "from upgrader.cpus import usable_cpus; print(usable_cpus(), os.cpu_count())"],
                            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert int(pinned[0]) == 1 and int(pinned[1]) == os.cpu_count()
    v2, v1 = tmp_path / "cpu.max", tmp_path / "v1"
    v1.mkdir()
    v2.write_text("150000 100000\n")
    assert cpu_quota(v2, v1) == 1.5  # a pod's limits.cpu of 1.5: two threads' worth, rounded up
    v2.write_text("max 100000\n")
    assert cpu_quota(v2, v1) is None
    v2.unlink()
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v2, v1) is None  # cgroup v1 without a quota
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpu_quota(v2, v1) == 3.0
