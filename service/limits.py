"""Limits on what a request may cost: body size (checked while the body streams in) and admission.

Admission decides *before a body is read* whether a request is served: the costly part of an
upscale request (reading, parsing and decoding its images) happens only while it holds its share of
`max_active_images` per worker. Up to `max_waiting_requests` more wait in line, their body unread (a
connection and a task, no bytes buffered beyond the socket's); past that a request is refused with
503 + Retry-After at once, for microseconds of work. So under overload the worker keeps
serving at its peak rate instead of spending it on requests that are refused after decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_response, unavailable


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            exc = body_too_large(self.limit)
            return await error_response(exc.status, exc.code, exc.message, path=scope.get("path", ""))(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise body_too_large(self.limit)  # raised inside the route: answered by the ApiError handler
            return message

        await self.app(scope, counting_receive, send)


ARRIVAL = "upgrader.arrival"  # ASGI scope key: the weight a request was let in with (service.server), until its route takes it over
CLIENT_GONE = "upgrader.client_gone"  # ASGI scope key: the ClientGone of the request's connection (service.server)


class ClientGone:
    """Fires once, when a connection closes: what its requests still wait for (a place in line, queued images) is dropped.

    A client that gives up (a timeout, a cut load) leaves work behind it: images queued for a batch, a
    place in the admission line. Computing answers nobody reads takes the CPU from the requests that
    arrive next: the first clients of an overload found each worker still busy with the abandoned
    requests of the load before it (`bench/overload.py --settle-s 0`). The server's protocol
    (service.server) gives each connection one of these and fires it from `connection_lost`; the
    admission line and the batcher register what to drop while a request waits. HTTP/1.1 has no other
    way to say "cancel"; an answer already being computed (a running batch) is finished and dropped.
    """

    __slots__ = ("fired", "_callbacks")

    def __init__(self) -> None:
        self.fired = False
        self._callbacks: set = set()

    def add(self, callback) -> None:
        """Call `callback()` when the connection closes (at once if it already has)."""
        if self.fired:
            callback()
        else:
            self._callbacks.add(callback)

    def discard(self, callback) -> None:
        self._callbacks.discard(callback)

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            callbacks, self._callbacks = self._callbacks, set()
            for callback in callbacks:
                callback()


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
        # Requests let in from their headers (service.server) whose route has not taken its slot or its
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
        """A new request would have to wait, and the line is full: it would be refused (service.server refuses it from its headers).

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
    async def slot(self, scope: dict, content_length: str | None, max_images: int, wait_s: float) -> AsyncIterator[None]:
        """Hold the request's share of the budget for the block; wait in line at most `wait_s` (then 503), or 503 at once if the line is full.

        The share is the one the request was let in with from its headers (service.server), which stops
        counting as arriving here, or else estimated now from its Content-Length. A request whose client
        leaves while it waits (the scope's ClientGone fires) leaves the line with ClientDisconnect."""
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
            gone: ClientGone | None = scope.get(CLIENT_GONE)
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
