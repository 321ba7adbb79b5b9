"""Admission: which upscale requests are served, decided from their headers before a body is read.

The costly part of an upscale request (reading, parsing and decoding its images) happens only while it
holds its share of `max_active_images` per worker. Up to `max_waiting_requests` more wait in line, their
body unread (a connection and a task, no bytes buffered beyond the socket's); past that a request is
refused with 503 + Retry-After at once by `AdmissionMiddleware`, an ASGI middleware in the app's stack,
for microseconds of work. So under overload the worker keeps serving at its peak rate instead of spending
it on requests that are refused after decoding (`bench/overload.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError, error_response, unavailable
from service.http.disconnect import ClientGone
from service.observability.metrics import UNKNOWN_MODEL, Metrics

log = logging.getLogger("service.http.admission")

ADMITTED_PATH = "/upscale"  # the requests that take an admission slot
ARRIVAL = "upgrader.arrival"  # ASGI scope key: the weight a request was let in with, until its route takes it over


class Admission:
    """A budget of images at work per worker (FIFO line of `max_waiting` beyond it); the rest refused before any work.

    A request's cost is its image count, estimated before its body is read from Content-Length (one
    image per `BYTES_PER_IMAGE`; an 8x8 PNG in a multipart part or as base64 JSON takes more, so the
    estimate errs high). So many small requests share the budget (and the batches) as freely as
    before, while a few 64-image requests fill it.
    """

    BYTES_PER_IMAGE = 300

    def __init__(self, max_images: int, max_waiting: int, retry_after_s: int) -> None:
        self.budget, self.max_waiting, self.retry_after_s = max_images, max_waiting, retry_after_s
        self.in_use = 0
        self._line: deque[tuple[int, asyncio.Future]] = deque()
        # Requests let in from their headers (AdmissionMiddleware) whose route has not taken its slot or its
        # place in line yet: a burst of requests read in one event-loop turn is let in before any of them
        # runs, so without counting these the first burst of an overload would all be let in.
        self.arriving, self.arriving_weight, self.arriving_to_wait = 0, 0, 0

    def arrive(self, weight: int) -> tuple[int, bool]:
        """Count a request let in with `weight`; -> what `arrived` takes back (its weight, and whether it will wait in line)."""
        waits = self.in_use + self.arriving_weight + weight > self.budget
        self.arriving += 1
        self.arriving_weight += weight
        self.arriving_to_wait += waits
        return weight, waits

    def arrived(self, arrival: tuple[int, bool]) -> None:
        """The request counted by `arrive` reached its route (or ended before it)."""
        weight, waits = arrival
        self.arriving -= 1
        self.arriving_weight -= weight
        self.arriving_to_wait -= waits

    @property
    def waiting(self) -> int:
        return len(self._line)

    def weight(self, content_length: str | None, max_images: int) -> int:
        """Images a body of `content_length` bytes may hold (no length: as many as a request may carry), at most the budget."""
        estimate = -(-int(content_length) // self.BYTES_PER_IMAGE) if content_length and content_length.isdigit() else max_images
        return max(1, min(estimate, max_images, self.budget))

    def full(self) -> bool:
        """A new request would have to wait, and the line is full: it would be refused (AdmissionMiddleware refuses it from its headers).

        Requests still arriving count as taking their weight of the budget or, those that did not fit, a place in line."""
        waiting = len(self._line) + self.arriving_to_wait
        return waiting >= self.max_waiting and (waiting > 0 or self.in_use + self.arriving_weight >= self.budget)

    def refuse(self, why: str) -> ApiError:
        return unavailable("overloaded", f"{why}; retry later", self.retry_after_s)

    def busy(self) -> str:
        return f"{self.in_use} of {self.budget} images at work and {len(self._line)} requests waiting on this worker"

    def _wake(self) -> None:
        while self._line and self.in_use + self._line[0][0] <= self.budget:
            weight, granted = self._line.popleft()
            if not granted.done():
                self.in_use += weight
                granted.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self, scope: dict, content_length: str | None, max_images: int, wait_s: float,
                   gone: ClientGone | None = None) -> AsyncIterator[None]:
        """Hold the request's share of the budget for the block; wait in line at most `wait_s` (then 503), or 503 at once if the line is full.

        The share is the one the request was let in with from its headers (`AdmissionMiddleware`), which stops
        counting as arriving here, or else estimated now from its Content-Length. A request whose client
        leaves while it waits (`gone` fires) leaves the line with ClientDisconnect."""
        if (arrival := scope.pop(ARRIVAL, None)) is not None:
            self.arrived(arrival)
            weight = arrival[0]
        else:
            weight = self.weight(content_length, max_images)
        if not self._line and self.in_use + weight <= self.budget:
            self.in_use += weight
        else:
            if len(self._line) >= self.max_waiting:
                raise self.refuse(self.busy())
            granted = asyncio.get_running_loop().create_future()
            entry = (weight, granted)
            self._line.append(entry)
            left = granted.cancel  # the client left: `await granted` raises CancelledError, turned into ClientDisconnect below
            if gone is not None:
                gone.add(left)
            try:
                async with asyncio.timeout(wait_s):
                    await granted
            except BaseException as exc:  # timed out, cancelled or the client left: leave the line, or give back what was granted meanwhile
                if gone is not None and gone.fired and isinstance(exc, asyncio.CancelledError) and granted.cancelled():
                    with contextlib.suppress(ValueError):
                        self._line.remove(entry)
                    self._wake()
                    raise ClientDisconnect() from None
                if granted.done() and not granted.cancelled():
                    self.in_use -= weight
                    self._wake()
                else:
                    granted.cancel()
                    with contextlib.suppress(ValueError):
                        self._line.remove(entry)
                    self._wake()
                if isinstance(exc, TimeoutError):
                    raise self.refuse(f"no room within {wait_s:.3g}s ({self.busy()})") from None
                raise
            finally:
                if gone is not None:
                    gone.discard(left)
        try:
            yield
        finally:
            self.in_use -= weight
            self._wake()


class AdmissionMiddleware:
    """POST /upscale: 503 + Retry-After from its headers while admission is full; else counted as arriving until its route takes a slot.

    The refusal is answered here, before routing, dependencies or the body: under overload most requests are
    refusals, and each one's cost is taken from the requests being served. Its body is left unread (the
    server drops it and keeps the connection)."""

    def __init__(self, app: ASGIApp, admission: Admission, metrics: Metrics, max_images_per_request: int) -> None:
        self.app, self.admission, self.max_images = app, admission, max_images_per_request
        self.metrics = metrics
        self.refused = None  # the 503 counter, looked up at the first refusal (no zero series before one)
        self.logged_at, self.unlogged = -1e9, 0  # a herd is logged at most once a second, with how many since

    def note(self, busy: str) -> None:
        now = time.monotonic()
        if now - self.logged_at < 1.0:
            self.unlogged += 1
            return
        log.warning("request refused", extra={"reason": "overloaded", "busy": busy, "since_last_line": self.unlogged})
        self.logged_at, self.unlogged = now, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != ADMITTED_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        admission = self.admission
        if admission.full():
            if self.refused is None:
                self.refused = self.metrics.requests.labels(UNKNOWN_MODEL, "503")
            self.refused.inc()
            self.note(busy := admission.busy())
            exc = admission.refuse(busy)
            headers = exc.headers
            if Headers(scope=scope).get("expect", "").lower() == "100-continue":
                # The client waits for 100 Continue before its body and never sends it after a final answer: close.
                headers = {**headers, "Connection": "close"}
            return await error_response(exc.status, exc.code, exc.message, headers=headers)(scope, receive, send)
        arrival = scope[ARRIVAL] = admission.arrive(admission.weight(Headers(scope=scope).get("content-length"), self.max_images))
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.pop(ARRIVAL, None) is not None:  # it ended before its route took a slot (401, 404, 422, ...)
                admission.arrived(arrival)
