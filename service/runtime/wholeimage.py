"""Whole-image inference for models that take any size (photo_residual): one forward per image, or large tiles.

A fully convolutional model computes each output pixel from a fixed window of input pixels around it: its
receptive radius (`service.runtime.upscaler.receptive_radius`, from the model's convolutions; `Upscaler.halo`). So an image need not be cut into 8x8
tiles and blended (service.runtime.tiling): it runs whole, and the result is exactly the model's whole-image forward.

Memory is what bounds a forward: photo_residual 64x8 keeps a few 64-channel feature maps of the input's size
alive, about 1-2 KB per input pixel. `max_forward_pixels` (UPGRADER_MAX_FORWARD_PIXELS) caps the input pixels
of one forward pass (all images of a batch together, times the ensemble's views). An image within it is one
forward; a larger one is cut into windows of at most that many pixels, every window overlapping its
neighbours by twice the halo (the receptive radius). Each output pixel is taken from the window in which it
lies at least a halo from any edge the image does not share, so it sees exactly the input pixels it sees in
the whole image: the stitched result equals the whole-image forward up to float rounding (different tile
sizes may sum in another order), with no blending. All windows of one image have the same shape (the last
window in a row or column is moved back to end at the image's edge), so they batch together.

Fairness: the windows of an image queue as one bulk job on the model's `Batcher`, which puts images of one
shape in a batch (as many as fit in the pixel budget) and takes the shape of the oldest request that is
not bulk when one is waiting. So a small photo arriving while a large one computes waits for one
window's forward, not for the whole large image.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
from service.runtime.batching import Batcher
from service.runtime.cancellation import ClientGone

SCALE = 4


@dataclass(frozen=True)
class Span:
    """One window along an axis: input [start, start + size), of which output rows/columns [keep_from, keep_to) are kept."""

    start: int
    keep_from: int
    keep_to: int


def spans(length: int, window: int, halo: int) -> list[Span]:
    """Windows of `window` pixels covering `length`, overlapping by at least 2 * halo; each kept part is at least
    `halo` from the window's edges that are not the image's. One window when the image fits."""
    if length <= window:
        return [Span(0, 0, length)]
    step = window - 2 * halo
    if step < 1:
        raise ValueError(f"a window of {window} pixels leaves nothing inside a halo of {halo}")
    starts = list(range(0, length - window, step)) + [length - window]
    bounds = [0] + [(b + a + window) // 2 for a, b in zip(starts, starts[1:], strict=False)] + [length]  # mid-overlap
    return [Span(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


@dataclass(frozen=True)
class Plan:
    height: int
    width: int
    rows: list[Span]
    cols: list[Span]
    window: tuple[int, int]  # (height, width) of every window

    @property
    def tiles(self) -> int:
        return len(self.rows) * len(self.cols)


def window_side(max_forward_pixels: int, ensemble: int, halo: int) -> int:
    """The side of the square windows a large image is cut into: as many pixels as one forward may take (the
    ensemble's views counted), and never less than four halos, so most of a window is kept."""
    return max(math.isqrt(max_forward_pixels // ensemble), 4 * halo)


def balanced_window(length: int, side: int, halo: int) -> int:
    """The window along an axis of `length`: the whole axis when it fits in `side`, else the smallest window that covers
    it in as few windows of at most `side` as possible (1024 pixels, side 512, halo 19: three windows of 367, not three
    of 512, which would compute 1.8x the image instead of 1.2x)."""
    if length <= side:
        return length
    count = math.ceil((length - 2 * halo) / (side - 2 * halo))
    return math.ceil((length - 2 * halo) / count) + 2 * halo


def plan(height: int, width: int, max_forward_pixels: int, ensemble: int, halo: int) -> Plan:
    """Whole when height x width (x ensemble) fits in `max_forward_pixels`, else windows of at most window_side a side."""
    if height * width * ensemble <= max_forward_pixels:
        return Plan(height, width, [Span(0, 0, height)], [Span(0, 0, width)], (height, width))
    side = window_side(max_forward_pixels, ensemble, halo)
    window = (balanced_window(height, side, halo), balanced_window(width, side, halo))
    return Plan(height, width, spans(height, window[0], halo), spans(width, window[1], halo), window)


def cut(image: np.ndarray, p: Plan) -> np.ndarray:
    """uint8 3 x H x W -> uint8 windows N x 3 x h x w, row-major."""
    h, w = p.window
    return np.stack([image[:, r.start : r.start + h, c.start : c.start + w] for r in p.rows for c in p.cols])


def stitch(outputs: np.ndarray, p: Plan) -> np.ndarray:
    """uint8 N x 3 x 4h x 4w window outputs -> uint8 3 x 4H x 4W: each window's kept part pasted in place."""
    if p.tiles == 1:
        return outputs[0]
    result = np.empty((outputs.shape[1], p.height * SCALE, p.width * SCALE), np.uint8)
    tiles = iter(outputs)
    for r in p.rows:
        for c in p.cols:
            tile = next(tiles)
            top, left = (r.keep_from - r.start) * SCALE, (c.keep_from - c.start) * SCALE
            rows, cols = (r.keep_to - r.keep_from) * SCALE, (c.keep_to - c.keep_from) * SCALE
            result[:, r.keep_from * SCALE : r.keep_to * SCALE, c.keep_from * SCALE : c.keep_to * SCALE] = \
                tile[:, top : top + rows, left : left + cols]
    return result


@dataclass
class WholeResult:
    images: list[np.ndarray]  # uint8 3 x 4H x 4W per input image
    tiles: int  # forward-pass windows, all images together (one per image that fits the budget)
    batch_size: int
    queue_s: float
    inference_s: float


async def upscale_whole(batcher: Batcher, images: list[np.ndarray], ensemble: int, timeout_s: float, max_forward_pixels: int,
                        halo: int, gone: ClientGone | None = None) -> WholeResult:
    """uint8 3 x H x W images -> their 4x upscales by an any-size model: each image one job on `batcher` (its windows,
    when it is larger than a forward may take: a bulk job)."""
    started = time.perf_counter()
    plans = [plan(image.shape[1], image.shape[2], max_forward_pixels, ensemble, halo) for image in images]
    windows = [cut(image, p) if p.tiles > 1 else image[None] for image, p in zip(images, plans, strict=True)]
    deadline = started + timeout_s
    tasks = [asyncio.ensure_future(batcher.submit(w, ensemble, deadline - time.perf_counter(), bulk=len(w) > 1, png=False, gone=gone))
             for w in windows]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()  # the other images' queued windows are dropped (Batcher.submit)
        raise
    finished = time.perf_counter()
    first_start = min(started + r.queue_s for r in results)  # the earliest any of them started (submitted at `started`)
    def paste() -> list[np.ndarray]:
        return [stitch(r.images, p) for r, p in zip(results, plans, strict=True)]

    # Pasting a large image's windows is tens of milliseconds of copying: off the event loop.
    stitched = await asyncio.to_thread(paste) if any(p.tiles > 1 for p in plans) else paste()
    return WholeResult(stitched, sum(p.tiles for p in plans), max(r.batch_size for r in results), first_start - started,
                       finished - first_start)
