"""Images of any size: cut into 8x8 tiles, upscale every tile through the batcher, stitch the 4x result.

The models only ever see 8x8 inputs, so a W x H image becomes tiles:

* plain (fc, conv, resnet18: models that flatten or pool the whole tile): abutting tiles every
  8 pixels; each 32x32 output is pasted in place. The tiles' borders may show as seams.
* overlapping (fully convolutional models, see `upgrader.architectures.fully_convolutional`):
  a tile every `OVERLAP_STRIDE` = 4 pixels, so every pixel is covered by 2 x 2 tiles; the
  outputs are blended with a tent window that is highest at a tile's centre and falls to
  nearly zero at its edges, where a zero-padded convolution sees least context. Tents on a
  half-tile hop sum to one, so the blend is a weighted average, not a smoothing: flat areas
  stay exactly flat. It costs ~4x the tiles of the plain layout.

Width and height that are not covered exactly are padded by repeating the edge pixels (no
dark border leaks in), and the padding's output is cropped away. An 8x8 image is one tile in
either layout and comes back exactly as without tiling.

`upscale_tiles` feeds the tiles to the same `Batcher` as 8x8 requests, in chunks of one batch
with a few chunks in flight: the queue never holds more of one image than that, tiles of
concurrent requests share forward passes, and small requests queued meanwhile are not stuck
behind thousands of tiles (the batcher also caps a large image's share of each batch).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np

from service.runtime.batching import Batcher
from service.runtime.cancellation import ClientGone
from upgrader.architectures import INPUT_SIZE, OUTPUT_SIZE

TILE = INPUT_SIZE
SCALE = OUTPUT_SIZE // INPUT_SIZE
OVERLAP_STRIDE = TILE // 2  # half a tile: the tent windows of neighbours then sum to one
CHUNKS_IN_FLIGHT = 4  # enough to keep the batcher fed while a chunk's outputs are routed back


@dataclass(frozen=True)
class Layout:
    """Where the tiles of one image are: `rows` x `cols` tiles of 8x8, `stride` input pixels apart."""

    height: int
    width: int
    stride: int
    rows: int
    cols: int

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    @property
    def padded(self) -> tuple[int, int]:
        return TILE + self.stride * (self.rows - 1), TILE + self.stride * (self.cols - 1)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the stitched result."""
        return self.height * SCALE, self.width * SCALE


def layout(height: int, width: int, overlapping: bool) -> Layout:
    stride = OVERLAP_STRIDE if overlapping else TILE

    def count(n: int) -> int:
        return 1 if n <= TILE else 1 + math.ceil((n - TILE) / stride)

    return Layout(height, width, stride, count(height), count(width))


def cut(image: np.ndarray, plan: Layout) -> np.ndarray:
    """uint8 3 x H x W -> uint8 tiles N x 3 x 8 x 8, row-major."""
    padded_h, padded_w = plan.padded
    padded = np.pad(image, ((0, 0), (0, padded_h - plan.height), (0, padded_w - plan.width)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (TILE, TILE), axis=(1, 2))[:, :: plan.stride, :: plan.stride]
    return np.ascontiguousarray(windows.transpose(1, 2, 0, 3, 4).reshape(plan.tiles, 3, TILE, TILE))


def _window(stride: int) -> np.ndarray:
    """Blend weights of one 32x32 output: ones for abutting tiles, a separable tent for overlapping ones."""
    if stride == TILE:
        return np.ones((OUTPUT_SIZE, OUTPUT_SIZE), np.float32)
    half = OUTPUT_SIZE / 2
    tent = 1.0 - np.abs(np.arange(OUTPUT_SIZE, dtype=np.float32) + 0.5 - half) / half  # 1/32 at the edges, never 0
    return np.outer(tent, tent)


def stitch(outputs: np.ndarray, plan: Layout) -> np.ndarray:
    """uint8 N x 3 x 32 x 32 tile outputs -> uint8 3 x 4H x 4W.

    Tiles k = 8 / stride apart in each direction do not overlap, so the k x k classes of tiles are
    each pasted as one block (no per-tile Python loop) and the classes are summed with their weights.
    """
    k = TILE // plan.stride
    out_stride = plan.stride * SCALE
    padded_h, padded_w = (side * SCALE for side in plan.padded)
    window = _window(plan.stride)
    tiles = outputs.reshape(plan.rows, plan.cols, 3, OUTPUT_SIZE, OUTPUT_SIZE).astype(np.float32) * window
    total = np.zeros((3, padded_h, padded_w), np.float32)
    weight = np.zeros((padded_h, padded_w), np.float32)
    for a in range(k):
        for b in range(k):
            block = tiles[a::k, b::k]
            rows, cols = block.shape[:2]
            if not rows or not cols:
                continue
            top, left = a * out_stride, b * out_stride
            h, w = rows * OUTPUT_SIZE, cols * OUTPUT_SIZE
            total[:, top : top + h, left : left + w] += block.transpose(2, 0, 3, 1, 4).reshape(3, h, w)
            weight[top : top + h, left : left + w] += np.tile(window, (rows, cols))
    out_h, out_w = plan.output_size
    result = total[:, :out_h, :out_w] / weight[:out_h, :out_w]
    return np.rint(result).clip(0, 255).astype(np.uint8)


@dataclass
class TiledResult:
    images: list[np.ndarray]  # uint8 3 x 4H x 4W per input image
    tiles: int
    batch_size: int  # the largest batch any of its tiles rode in
    queue_s: float  # first chunk queued -> its first batch started
    inference_s: float  # first batch started -> last chunk's outputs back (batches shared with others included)


async def upscale_tiles(batcher: Batcher, images: list[np.ndarray], overlapping: bool, ensemble: int,
                        timeout_s: float, chunk: int, gone: ClientGone | None = None) -> TiledResult:
    """uint8 3 x H x W images -> their 4x upscales, every tile through `batcher`, `chunk` tiles per job (dropped when `gone` fires)."""
    started = time.perf_counter()
    plans = [layout(image.shape[1], image.shape[2], overlapping) for image in images]
    # Cutting and stitching a large image is milliseconds of numpy: off the event loop (numpy releases the GIL).
    tiles = await asyncio.to_thread(lambda: np.concatenate([cut(image, plan) for image, plan in zip(images, plans, strict=True)]))
    # A request of more than one batch of tiles is bulk: the batcher caps its share of each batch.
    bulk = len(tiles) > chunk
    gate = asyncio.Semaphore(CHUNKS_IN_FLIGHT)
    deadline = started + timeout_s
    first_start = math.inf

    async def run(start: int):
        nonlocal first_start
        async with gate:
            queued = time.perf_counter()
            result = await batcher.submit(tiles[start : start + chunk], ensemble, deadline - queued, bulk=bulk, png=False, gone=gone)
            first_start = min(first_start, queued + result.queue_s)
            return result

    tasks = [asyncio.ensure_future(run(start)) for start in range(0, len(tiles), chunk)]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()  # chunks not yet queued are never queued; queued ones are dropped (Batcher.submit)
        raise
    finished = time.perf_counter()
    outputs = np.concatenate([r.images for r in results]) if len(results) > 1 else results[0].images
    bounds = np.cumsum([0] + [plan.tiles for plan in plans])
    stitched = await asyncio.to_thread(lambda: [stitch(outputs[bounds[i] : bounds[i + 1]], plan) for i, plan in enumerate(plans)])
    return TiledResult(stitched, len(tiles), max(r.batch_size for r in results), first_start - started, finished - first_start)
