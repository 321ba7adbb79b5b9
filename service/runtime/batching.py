"""Dynamic batching: many concurrent requests -> few large forward passes.

Per loaded (model, version) one `Batcher`:

* `submit` puts a request's images on a queue bounded in *images*; a request that does
  not fit is refused at once (503), so overload shows up as refusals, not latency.
* the batcher task takes images from the head of the queue, splitting a large request
  across batches; requests asking for a different ensemble size wait for the next batch
  (they cannot share a forward pass). When it runs a batch depends on what was waiting
  when the worker thread last became free (the way Triton forms a batch when an
  instance frees up):
  - nothing: the service is quiet, and the first request to arrive runs at once (with
    whatever arrived in the same event-loop turn) instead of waiting out a window
    with nobody to batch with;
  - work was queued: the service is loaded, and the batch grows until it has
    `max_batch_images` or its oldest image has waited `max_wait_ms`;
  - and, for a model whose forward pass has a large fixed cost (`fixed_cost_s`, measured
    when it is loaded: resnet18 reads its 56 MB of weights once per pass, ~6.5 ms on one
    core, against ~0.5 ms an image), the batch also waits for the clients just answered
    to come back with their next request: closed-loop clients otherwise split into two
    groups that alternate half batches, each paying the fixed cost. Idling w ms to merge
    saves the fixed cost, so it waits only while the time the clients of a batch take to
    all come back (learnt online, `turnaround_s`) is shorter than the fixed cost, and at
    most that long (capped at `max_wait_ms`): resnet18 waits, conv (~0.15 ms) does not.
  With `idle_dispatch=False` every batch grows the first way (a fixed window, as before).
* each batch runs on the batcher's own worker thread (torch releases the GIL) while
  the event loop keeps parsing requests and forming the next batch;
* tiles of a large image (`bulk` jobs, see service.runtime.tiling) take at most `BULK_SHARE` of a
  batch while other images wait, so a small request queued behind a large image rides in the
  next batch instead of after all of its tiles;
* images of different shapes cannot share a forward pass either: a model that takes any size
  (photo_residual, see service.runtime.wholeimage) gets whole images and large tiles, and a batch holds
  images of one shape only, as many as its `batch_limit` allows (a pixel budget per forward).
  The batch takes the shape and ensemble size of the oldest request that is not bulk, when one
  waits: a small image is never held behind the tiles of a large one of another shape, and the
  large one's tiles run one forward at a time in between;
* outputs are routed back by (request, offset), so each request gets exactly its own
  images, in order, however they were split and merged.
* a request that will not take its answer (its client left, its deadline passed, its awaiting
  task was cancelled) is dropped from the queue: its images still waiting are never computed
  (counted in `upgrader_images_dropped_total{reason}`).

Everything but the forward pass runs on the event loop, so the queue needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import ApiError, unavailable
from service.runtime.cancellation import ClientGone, ClientLeft
from service.observability import tracing
from service.observability.metrics import Metrics
from service.runtime.priority import lower_this_thread
from service.runtime.upscaler import BatchOutput

log = logging.getLogger("service.runtime.batching")

RunBatch = Callable[[np.ndarray, int, list[bool]], BatchOutput]  # images, ensemble, which outputs to PNG-encode
BatchLimit = Callable[[tuple[int, ...], int], int]  # (image shape C x H x W, ensemble) -> most images in one batch
# Most of a batch that bulk jobs (tiles of large images) take while other images are queued; the
# rest of the batch goes to those first. With nothing else waiting, bulk jobs fill whole batches.
BULK_SHARE = 0.5


@dataclass
class Job:
    """One request's images and where its outputs go."""

    images: np.ndarray  # uint8 N x 3 x 8 x 8 (any N x 3 x H x W for an any-size model)
    ensemble: int
    future: asyncio.Future
    bulk: bool = False  # tiles of a large image: capped to BULK_SHARE of a batch while others wait
    png: bool = True  # its outputs are PNG-encoded on the worker thread (false: pixels only)
    enqueued_at: float = field(default_factory=time.perf_counter)
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first index, outputs) per slice computed
    pngs: list[bytes | None] = field(default_factory=list)
    remaining: int = 0
    started_at: float | None = None
    inference_s: float = 0.0
    batch_size: int = 0
    abandoned: str = ""  # why its answer is no longer wanted (client_gone, deadline, cancelled, failed): its queued images are dropped
    span_context: object = None  # the request's server span, which the batch spans link to (tracing on)

    def __post_init__(self) -> None:
        n = len(self.images)
        self.pngs, self.remaining = [None] * n, n

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        """What a batch's images must share: the ensemble size and the image shape."""
        return self.ensemble, self.images.shape[1:]

    def client_left(self) -> None:
        """The request's connection closed (ClientGone): its images still queued are dropped."""
        if not self.future.done():
            self.abandoned = "client_gone"
            self.future.set_exception(ClientLeft())

    def outputs(self) -> np.ndarray:
        chunks = [chunk for _, chunk in sorted(self.chunks, key=lambda c: c[0])]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


@dataclass
class JobResult:
    images: np.ndarray  # uint8 N x 3 x 32 x 32
    pngs: list[bytes | None]  # None when the job asked for pixels only
    batch_size: int  # the largest batch this request's images rode in
    queue_s: float  # enqueue -> its first batch started
    inference_s: float  # wall time of the batches it rode in


@dataclass
class _Slice:
    job: Job
    start: int
    stop: int


class Batcher:
    def __init__(self, label: str, run_batch: RunBatch, *, max_batch_images: int, max_wait_ms: float,
                 max_queue_images: int, retry_after_s: int, metrics: Metrics, model: str, version: int, idle_dispatch: bool = True,
                 fixed_cost_s: float = 0.0, batch_limit: BatchLimit | None = None, tracer=None):
        self.label, self.run_batch = label, run_batch
        self.tracer = tracer  # None: tracing off (service.observability.tracing)
        self.batch_limit = batch_limit  # None: max_batch_images of any shape (8x8 models see one shape)
        # How long the next batch may wait for the images just answered to come back (see the module's docstring).
        self.regroup_s = min(fixed_cost_s, max_wait_ms / 1000)
        self.turnaround_s: float | None = None  # moving average of a batch's delivery -> as many images arrived again (None: not seen yet, so try)
        self.regroup_waits = 0  # batches that waited for the clients just answered
        self._answered = 0  # images in the last batch delivered: the clients that may be about to send again
        self._returned = 0  # images arrived since then
        self._delivered_at: float | None = None  # when that batch was delivered, until as many images arrived
        self.max_batch_images, self.max_wait_s, self.max_queue_images = max_batch_images, max_wait_ms / 1000, max_queue_images
        self.retry_after_s, self.metrics, self._version_labels = retry_after_s, metrics, (model, str(version))
        self.idle_dispatch = idle_dispatch
        # Metric children looked up once: labels() takes a lock and a dict lookup on every call.
        self._queue_gauge = metrics.queue_images.labels(*self._version_labels)
        self._batch_sizes = metrics.batch_size.labels(model)
        self._batch_seconds = metrics.inference_seconds.labels(model)
        self._dropped = {reason: metrics.images_dropped.labels(model, reason) for reason in ("client_gone", "deadline", "cancelled", "failed")}
        self._queue: deque[_Slice] = deque()
        self.queued_images = 0
        self._arrived = asyncio.Event()  # the queue is no longer empty
        self._batch_full = asyncio.Event()  # _wake_at images are queued (or closing): stop waiting for more
        self._wake_at = max_batch_images
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{label}", initializer=lower_this_thread)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{label}")

    # ---- request side -------------------------------------------------------------
    def has_room(self, images: int = 1) -> bool:
        """Whether `images` more would be queued now: the router asks before it reads a body (submit still decides)."""
        return not self._closing and self.queued_images + images <= self.max_queue_images

    async def submit(self, images: np.ndarray, ensemble: int, timeout_s: float, bulk: bool = False, png: bool = True,
                     gone: ClientGone | None = None) -> JobResult:
        """The upscales of `images`; raises ClientLeft (nothing computed from then on) if `gone` fires first."""
        n = len(images)
        if gone is not None and gone.fired:
            raise ClientLeft()
        if self._closing:
            raise unavailable("shutting_down", f"{self.label} is shutting down", self.retry_after_s)
        if self.queued_images + n > self.max_queue_images:
            raise unavailable("queue_full", f"{self.label} queue is full ({self.queued_images} of {self.max_queue_images} images waiting)", self.retry_after_s)
        loop = asyncio.get_running_loop()
        job = Job(images, ensemble, loop.create_future(), bulk, png)
        if self.tracer is not None:
            job.span_context = tracing.current_span_context()
        if self._delivered_at is not None:
            self._returned += n
            if self._returned >= self._answered:
                self._learn_turnaround(job.enqueued_at - self._delivered_at)
        self._queue.append(_Slice(job, 0, n))
        self._queued_changed(n)
        self._queue_gauge.set(self.queued_images)
        self._arrived.set()
        if self.queued_images >= self._wake_at:
            self._batch_full.set()
        expiry = loop.call_later(timeout_s, self._expire, job, timeout_s)
        if gone is not None:
            gone.add(job.client_left)
        try:
            return await job.future
        finally:
            expiry.cancel()
            if gone is not None:
                gone.discard(job.client_left)
            if not job.future.done() or job.future.cancelled():  # the awaiting task was cancelled (shutdown, a failed sibling tile chunk)
                job.abandoned = "cancelled"
                job.future.cancel()

    def _expire(self, job: Job, timeout_s: float) -> None:
        if not job.future.done():
            job.abandoned = "deadline"  # its queued slices are dropped, not computed
            job.future.set_exception(ApiError(504, "deadline_exceeded", f"{len(job.images)} image(s) not inferred within "
                                              f"{timeout_s:g}s on {self.label}"))

    def _learn_turnaround(self, seconds: float) -> None:
        self.turnaround_s = seconds if self.turnaround_s is None else 0.8 * self.turnaround_s + 0.2 * seconds
        self._delivered_at = None

    def _queued_changed(self, delta: int) -> None:
        # The gauge is set on arrival (submit) and once per batch formed (_run), not per slice taken:
        # with several workers each set is a locked write to a shared file.
        self.queued_images += delta

    # ---- batcher side -------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        arrived_idle = False  # the queue was empty when the worker became free: dispatch what arrives at once
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                arrived_idle = self.idle_dispatch
                continue
            if not arrived_idle:
                await self._gather_more()
            arrived_idle = False
            batch = self._take_batch()
            self._queue_gauge.set(self.queued_images)
            if not batch:
                continue
            images = np.concatenate([s.job.images[s.start : s.stop] for s in batch]) if len(batch) > 1 else batch[0].job.images[batch[0].start : batch[0].stop]
            started = time.perf_counter()
            for s in batch:
                s.job.started_at = s.job.started_at or started
            span = self._batch_span(batch, len(images), started) if self.tracer is not None else None
            try:
                png = [s.job.png for s in batch for _ in range(s.stop - s.start)]
                output = await loop.run_in_executor(self._executor, self.run_batch, images, batch[0].job.ensemble, png)
            except Exception as exc:  # a model failure fails the requests in this batch, not the service
                log.exception("batch of %d images failed on %s", len(images), self.label)
                if span is not None:
                    span.record_exception(exc)
                    span.end()
                for s in batch:
                    s.job.abandoned = "failed"  # the rest of its images are not computed either
                    if not s.job.future.done():
                        s.job.future.set_exception(unavailable("inference_failed", f"inference failed on {self.label}: {exc}", self.retry_after_s))
                continue
            self._deliver(batch, output, time.perf_counter() - started)
            if span is not None:
                span.end()

    def _batch_span(self, batch: list[_Slice], images: int, started: float):
        """The span of one forward, linked to the server span of every request whose images ride it."""
        from opentelemetry.trace import Link

        links = [Link(s.job.span_context, {"upgrader.images": s.stop - s.start,
                                           "upgrader.queue_wait_ms": round((started - s.job.enqueued_at) * 1000, 3)})
                 for s in batch if s.job.span_context is not None]
        model, version = self._version_labels
        return self.tracer.start_span("batch forward", links=links, attributes={
            "upgrader.model": model, "upgrader.version": int(version), "upgrader.batch_size": images,
            "upgrader.requests": len(batch), "upgrader.ensemble": batch[0].job.ensemble,
            "upgrader.queue_wait_ms": round((started - min(s.job.enqueued_at for s in batch)) * 1000, 3)})

    def window(self, now: float, oldest: float) -> tuple[int, float, bool]:
        """-> (images to wait for, until when, whether that waits for the clients just answered), the worker being free at `now`.

        While the oldest queued image (queued at `oldest`) is within max_wait_ms: a full batch. After that,
        the images queued plus those just answered, for `regroup_s`, when they come back faster than that."""
        coming = max(0, self._answered - self._returned) if self._delivered_at is not None else 0
        fast = self.turnaround_s is None or self.turnaround_s < self.regroup_s
        regroup = self.regroup_s if coming and fast else 0.0
        young_until = oldest + self.max_wait_s
        if now < young_until:
            return self.max_batch_images, max(young_until, now + regroup), False
        return min(self.max_batch_images, self.queued_images + coming), now + regroup, regroup > 0

    async def _gather_more(self) -> None:
        """Wait until `window`'s images are queued or its time is up (one timer, not one wake-up per arrival)."""
        now = time.perf_counter()
        target, deadline, regrouping = self.window(now, self._queue[0].job.enqueued_at)
        if self.queued_images >= target or deadline <= now or self._closing:
            return
        self.regroup_waits += regrouping
        self._wake_at = target
        self._batch_full.clear()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_full.wait(), deadline - now)
        finally:
            self._wake_at = self.max_batch_images

    def _take_batch(self) -> list[_Slice]:
        """Up to max_batch_images images (batch_limit's) of one ensemble size and shape, oldest first; splits the last
        slice if needed. The ensemble size and shape are the oldest non-bulk slice's, else the oldest slice's.

        Bulk slices take at most BULK_SHARE of the batch on the first pass, so the images queued
        behind them get the rest; whatever room is left then goes to the bulk slices passed over.
        """
        batch: list[_Slice] = []
        waiting = [s for s in self._queue if not s.job.abandoned]
        key = next((s.job.key for s in waiting if not s.job.bulk), waiting[0].job.key if waiting else None)
        room = self.max_batch_images if self.batch_limit is None or key is None else self.batch_limit(key[1], key[0])
        bulk_room = max(1, int(room * BULK_SHARE))
        skipped: list[_Slice] = []  # other ensemble sizes, and bulk slices over their share: back on the queue, in order

        def take(s: _Slice, limit: int) -> _Slice | None:
            """Put up to `limit` images of `s` in the batch; returns the rest of `s` (or None)."""
            nonlocal room
            count = min(limit, s.stop - s.start)
            batch.append(_Slice(s.job, s.start, s.start + count))
            room -= count
            self._queued_changed(-count)
            return _Slice(s.job, s.start + count, s.stop) if s.start + count < s.stop else None

        while self._queue and room:
            s = self._queue.popleft()
            if s.job.abandoned:
                self._queued_changed(-(s.stop - s.start))
                self._dropped[s.job.abandoned].inc(s.stop - s.start)
                continue
            if s.job.key != key or (s.job.bulk and not bulk_room):
                skipped.append(s)
                continue
            limit = min(room, bulk_room) if s.job.bulk else room
            before = room
            rest = take(s, limit)
            if s.job.bulk:
                bulk_room -= before - room
            if rest is not None:
                if s.job.bulk and not bulk_room:
                    skipped.append(rest)
                else:
                    self._queue.appendleft(rest)
        # Nothing else is waiting: the bulk slices passed over fill the rest of the batch.
        for i, s in enumerate(skipped):
            if not room:
                break
            if s.job.bulk and s.job.key == key and not s.job.abandoned:
                skipped[i] = take(s, room)
        self._queue.extendleft(reversed([s for s in skipped if s is not None]))
        return batch

    def _deliver(self, batch: list[_Slice], output: BatchOutput, seconds: float) -> None:
        size = len(output.pngs)
        now = time.perf_counter()
        if self._delivered_at is not None and self.regroup_s:  # the last batch's clients were not all back by now: slow ones
            self._learn_turnaround(max(now - self._delivered_at, 2 * self.regroup_s))
        self._answered, self._returned, self._delivered_at = size, 0, now
        self._batch_sizes.observe(size)
        self._batch_seconds.observe(seconds)
        offset = 0
        for s in batch:
            job, count = s.job, s.stop - s.start
            job.chunks.append((s.start, output.images[offset : offset + count]))
            job.pngs[s.start : s.stop] = output.pngs[offset : offset + count]
            offset += count
            job.remaining -= count
            job.inference_s += seconds
            job.batch_size = max(job.batch_size, size)
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(JobResult(job.outputs(), job.pngs, job.batch_size,
                                                job.started_at - job.enqueued_at, job.inference_s))

    # ---- shutdown -----------------------------------------------------------------
    async def close(self) -> None:
        """Refuse new work, finish everything queued, stop the worker thread."""
        self._closing = True
        self._arrived.set()
        self._batch_full.set()
        await self._task
        self._executor.shutdown(wait=True)
        self.metrics.forget_version(*self._version_labels)
