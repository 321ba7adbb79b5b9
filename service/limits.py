"""Limits on what a request may cost: body size (checked while the body streams in) and admission.

Admission decides *before a body is read* whether a request is served: the costly part of an
upscale request (reading, parsing and decoding 64 images) happens only for requests that hold one of
`max_active_requests` slots per worker. Up to `max_waiting_requests` more wait in line, their body
unread (a connection and a task, no bytes buffered beyond the socket's); past that a request is
refused with 503 + Retry-After at once, for microseconds of work. So under overload the worker keeps
serving at its peak rate instead of spending it on requests that are refused after decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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
            return await error_response(exc.status, exc.code, exc.message)(scope, receive, send)
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


class Admission:
    """`max_active` requests at work, `max_waiting` in line (FIFO); the rest refused before any work."""

    def __init__(self, max_active: int, max_waiting: int, retry_after_s: int) -> None:
        self.max_active, self.max_waiting, self.retry_after_s = max_active, max_waiting, retry_after_s
        self.active = 0
        self._line: asyncio.Semaphore | None = None  # made on first use: it belongs to the serving loop
        self.waiting = 0

    def full(self) -> bool:
        """Every slot taken and the line full: a new request would be refused."""
        return self.active >= self.max_active and self.waiting >= self.max_waiting

    def refuse(self, why: str) -> ApiError:
        return unavailable("overloaded", f"{why}; retry later", self.retry_after_s)

    @contextlib.asynccontextmanager
    async def slot(self, wait_s: float) -> AsyncIterator[None]:
        """Hold one active slot for the block; wait in line at most `wait_s` (then 503), or 503 at once if the line is full."""
        if self._line is None:
            self._line = asyncio.Semaphore(self.max_active)
        if self._line.locked():
            if self.waiting >= self.max_waiting:
                raise self.refuse(f"{self.active} requests at work and {self.waiting} waiting on this worker")
            self.waiting += 1
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a semaphore acquired as it times out.
                async with asyncio.timeout(wait_s):
                    await self._line.acquire()
            except TimeoutError:
                raise self.refuse(f"no slot freed within {wait_s:.3g}s") from None
            finally:
                self.waiting -= 1
        else:
            await self._line.acquire()  # free: returns at once
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._line.release()


class AdmissionMiddleware:
    """The cheapest refusal: while the worker is full, POST `path` gets 503 before routing, dependencies or the body.

    The route takes the slot itself (Admission.slot); this only spares a request that would be
    refused there the ~0.5 ms of routing and validation, which under a flood of clients is most of
    the worker's CPU.
    """

    def __init__(self, app: ASGIApp, admission: Admission, path: str, on_refusal) -> None:
        self.app, self.admission, self.path, self.on_refusal = app, admission, path, on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "POST" and self.admission.full():
            exc = self.admission.refuse(f"{self.admission.active} requests at work and {self.admission.waiting} waiting on this worker")
            self.on_refusal()
            return await exc.response()(scope, receive, send)
        await self.app(scope, receive, send)
