"""Admission: which inference requests are served, decided before their images are read or decoded.

The costly part of a request (reading, parsing and decoding its images) happens only while it holds its
share of `max_active_images` per worker. Up to `max_waiting_requests` more wait in line, their bodies
unread (a connection and a task, no bytes buffered beyond the socket's); past that a request is refused
with 503 + Retry-After (gRPC: UNAVAILABLE with `retry-after`) at once, for microseconds of work. So under
overload the worker keeps serving at its peak rate instead of spending it on requests that are refused
after decoding (`bench/overload.py`). One `Admission` per worker is shared by every transport: `POST
/upscale` and `/v2/.../infer` (service.http.admission, from their headers) and gRPC `ModelInfer`
(service.grpc.interceptors, from the message's size).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from service.errors import ApiError, unavailable
from service.runtime.cancellation import ClientGone, ClientLeft

log = logging.getLogger("service.runtime.admission")


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
        self.logged_at, self.unlogged = -1e9, 0  # a herd of refusals is logged at most once a second

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

    def weight(self, content_length: str | int | None, max_images: int) -> int:
        """Images a body of `content_length` bytes may hold (no length: as many as a request may carry), at most the budget."""
        if isinstance(content_length, str):
            content_length = int(content_length) if content_length.isdigit() else None
        estimate = -(-content_length // self.BYTES_PER_IMAGE) if content_length is not None else max_images
        return max(1, min(estimate, max_images, self.budget))

    def weigh(self, images: int) -> int:
        """The weight of a request whose image count is known (a gRPC message's batch dimension)."""
        return max(1, min(images, self.budget))

    def full(self) -> bool:
        """A new request would have to wait, and the line is full: it would be refused (AdmissionMiddleware refuses it from its headers).

        Requests still arriving count as taking their weight of the budget or, those that did not fit, a place in line."""
        waiting = len(self._line) + self.arriving_to_wait
        return waiting >= self.max_waiting and (waiting > 0 or self.in_use + self.arriving_weight >= self.budget)

    def refuse_now(self) -> ApiError:
        """The refusal of a request that arrives while admission is full, logged at most once a second (with how many since)."""
        busy = self.busy()
        now = time.monotonic()
        if now - self.logged_at < 1.0:
            self.unlogged += 1
        else:
            log.warning("request refused", extra={"reason": "overloaded", "busy": busy, "since_last_line": self.unlogged})
            self.logged_at, self.unlogged = now, 0
        return self.refuse(busy)

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

    def slot(self, weight: int, wait_s: float, gone: ClientGone | None = None, arrival: tuple[int, bool] | None = None) -> Slot:
        """`async with` it to hold `weight` images of the budget for the block; wait in line at most `wait_s` (then 503),
        or 503 at once if the line is full.

        A request let in from its headers (`arrive`) passes its `arrival`, which stops counting as arriving
        here and gives its weight. A request whose client leaves while it waits (`gone` fires) leaves the
        line with ClientLeft."""
        return Slot(self, weight, wait_s, gone, arrival)

    async def take(self, weight: int, wait_s: float, gone: ClientGone | None) -> None:
        """Take `weight` of the budget: at once when there is room and nobody waits, else in line (Slot's entry)."""
        if not self._line and self.in_use + weight <= self.budget:
            self.in_use += weight
            return
        if len(self._line) >= self.max_waiting:
            raise self.refuse(self.busy())
        granted = asyncio.get_running_loop().create_future()
        entry = (weight, granted)
        self._line.append(entry)
        left = granted.cancel  # the client left: `await granted` raises CancelledError, turned into ClientLeft below
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
                raise ClientLeft() from None
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

    def give_back(self, weight: int) -> None:
        self.in_use -= weight
        self._wake()


class Slot:
    """One request's share of an Admission's budget, held for an `async with` block (a plain class: entering and
    leaving cost what the bookkeeping costs, once per inference request)."""

    __slots__ = ("admission", "weight", "wait_s", "gone", "arrival")

    def __init__(self, admission: Admission, weight: int, wait_s: float, gone: ClientGone | None, arrival: tuple[int, bool] | None):
        self.admission, self.weight, self.wait_s, self.gone, self.arrival = admission, weight, wait_s, gone, arrival

    async def __aenter__(self) -> None:
        if self.arrival is not None:
            self.admission.arrived(self.arrival)
            self.weight = self.arrival[0]
        await self.admission.take(self.weight, self.wait_s, self.gone)

    async def __aexit__(self, *exc) -> None:
        self.admission.give_back(self.weight)
