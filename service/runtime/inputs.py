"""What a photo has been through before it reached the service, and so which version of a photo model answers it.

A photo model trained on clean bicubic inputs is the best answer for a clean photo, and one trained on a chain
of blur, noise and JPEG (`trainer.photo --degradation realistic`) the best for a JPEG or a noisy photo, each
worse on the other kind (docs/training.md). When the serving version of a model is a `realistic` one and the
model has a `clean` alias, a request that names no version (`latest`) is answered by the clean version if every
image in it is judged clean, and by the serving version otherwise:

* a JPEG is judged by its own quantization tables: the IJG quality they were scaled from (`jpeg_quality`);
  below `CLEAN_JPEG_QUALITY` it carries compression artefacts;
* any other image by an estimate of its noise (`noise_sigma`: Immerkær's fast estimate on the luma, in its
  flattest blocks): above `CLEAN_NOISE_SIGMA` levels it is noisy.

The thresholds are chosen on the held-out sr-natural photographs (`bench/bench_photo_degraded.py --sets heldout`),
never on the test sets. A request that names a version or another alias gets that version, as always.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

import numpy as np

from model_store import LATEST
from service.runtime.priority import off_loop

CLEAN_ALIAS = "clean"
REALISTIC = "realistic-x4"  # the `degradation` of a version trained on the realistic chain
CLEAN_JPEG_QUALITY = 95  # a JPEG of at least this quality is judged clean
# Estimated noise (8-bit levels) at or below which a lossless image is judged clean. On the 30 held-out sr-natural
# photographs reduced x4: clean ones read a median of 0.9 (7 of them, textured all over, above 2.5); with Gaussian
# noise of 3 levels every one reads at least 2.6, of 5 levels at least 4.3.
CLEAN_NOISE_SIGMA = 2.5

# The IJG (libjpeg) luminance quantization table at quality 50, row-major: what `quality` scales.
IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)


def ijg_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg (and Pillow) writes for `quality` 1-100."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((IJG_LUMINANCE * scale + 50) // 100, 1, 255)


_TABLES = np.stack([ijg_table(q) for q in range(1, 101)])


def jpeg_quality(quantization: dict | None) -> int | None:
    """The IJG quality whose luminance table is nearest a JPEG's own (Pillow's `Image.quantization`); None if not a JPEG."""
    if not quantization or 0 not in quantization:
        return None
    table = np.asarray(list(quantization[0])[:64], dtype=np.int64)
    if table.size != 64:
        return None
    return int(np.argmin(np.abs(_TABLES - table).sum(axis=1))) + 1


_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
NOISE_BLOCK, NOISE_PERCENTILE = 8, 5
# What the blocks' 5th percentile reads, as a share of the true sigma, on pure Gaussian noise (tests/test_inputs.py).
PERCENTILE_SHARE = 0.73


def channel_noise(channel: np.ndarray) -> float:
    """Immerkær's estimate on one channel, block by block, read at the blocks' 5th percentile."""
    height, width = channel.shape
    if height < 3 or width < 3:
        return 0.0
    response = np.abs(sum(_LAPLACE[i, j] * channel[i : height - 2 + i, j : width - 2 + j] for i in range(3) for j in range(3)))
    rows, cols = response.shape[0] // NOISE_BLOCK, response.shape[1] // NOISE_BLOCK
    if rows and cols:
        blocks = response[: rows * NOISE_BLOCK, : cols * NOISE_BLOCK].reshape(rows, NOISE_BLOCK, cols, NOISE_BLOCK).mean(axis=(1, 3))
        return float(np.percentile(blocks, NOISE_PERCENTILE)) / PERCENTILE_SHARE
    return float(response.mean())


def noise_sigma(rgb: np.ndarray) -> float:
    """An estimate of the additive noise (8-bit levels, per channel) in uint8 3 x H x W (or H x W x 3).

    Immerkær's estimator (the mean absolute response to a mask that cancels planes and edges, scaled so that Gaussian
    noise of sigma s reads s), per channel, taken per 8x8 block and read at the blocks' 5th percentile: over a whole
    photograph the estimate follows its texture as much as its noise, while its flattest blocks show the noise alone.
    The mean over the three channels."""
    pixels = rgb if rgb.shape[0] == 3 and rgb.ndim == 3 and rgb.shape[-1] != 3 else np.moveaxis(rgb, -1, 0)
    scale = math.sqrt(math.pi / 2) / 6
    return scale * float(np.mean([channel_noise(channel.astype(np.float64)) for channel in pixels]))


def looks_clean(image: np.ndarray, quality: int | None) -> bool:
    """One decoded photo (uint8 3 x H x W) and its JPEG quality if it was a JPEG: clean, or carrying JPEG or noise."""
    if quality is not None:
        return quality >= CLEAN_JPEG_QUALITY
    return noise_sigma(image) <= CLEAN_NOISE_SIGMA


def routes_inputs(served) -> bool:
    """Whether `served` (a serving version trained on realistic inputs) hands clean photos to its model's `clean` alias."""
    return served.any_size and served.manifest.get("degradation") == REALISTIC


@contextlib.asynccontextmanager
async def version_for(manager, served, version: str, images: list[np.ndarray], qualities: list[int | None]) -> AsyncIterator:
    """The version that answers these photos: `served`, or its model's `clean` alias when `version` is `latest`, the
    serving version is a realistic one and every photo is judged clean."""
    state = manager.models.get(served.name)
    if version != LATEST or not routes_inputs(served) or state is None or CLEAN_ALIAS not in state.aliases:
        yield served
        return
    # The noise estimate reads every pixel (tens of milliseconds for a large photo): off the event loop.
    clean = await off_loop(lambda: all(looks_clean(image, quality) for image, quality in zip(images, qualities, strict=True)))
    if not clean:
        yield served
        return
    async with manager.lease(served.name, CLEAN_ALIAS) as clean:
        yield clean
