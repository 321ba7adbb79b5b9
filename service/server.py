"""The HTTP server side of a worker: uvicorn, with the connection limits uvicorn lacks.

uvicorn times out idle keep-alive connections, but a client that sends its headers or body a byte
at a time (slowloris) holds a connection, a parser and a request task forever, and there is no cap
on open connections. `guarded_protocol` subclasses uvicorn's httptools protocol (the one `http="auto"`
picks) and adds, per connection:

* a header deadline: the headers must be complete `header_timeout_s` after the connection opens
  or after the first byte of the next keep-alive request; else 408 and close;
* a body deadline: the whole body must have arrived `body_timeout_s` after the headers; else 408
  (or, if the answer already went out, just close) and the request sees a disconnect;
* a connection cap: a connection beyond `max_connections` open on this worker gets 503 and is
  closed before anything is parsed;
* admission: while the worker's admission budget and line are full (service.limits.Admission),
  POST /upscale is answered 503 + Retry-After from its headers, by `refusal_app`, without entering
  the app (its body is read and dropped by uvicorn, the connection stays open).

Each trigger is counted in `upgrader_connections_refused_total{reason}` and logged (at most one line
per reason per second, with how many happened since the last line).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.limits import ARRIVAL, Admission
from service.logs import new_request_id
from service.metrics import UNKNOWN_MODEL, Metrics
from service.settings import Settings

log = logging.getLogger("service.server")

REASONS = ("too_many_connections", "header_timeout", "body_timeout")
ADMITTED_PATH = b"/upscale"  # the requests that take an admission slot (service.limits.Admission)


def raw_response(status: int, reason: str, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error answer in the service's JSON shape, written straight to the socket (no request cycle exists)."""
    body = json.dumps({"error": {"code": code, "message": message, "item": None}}).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}", "connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _RateLimitedLog:
    def __init__(self, message: str) -> None:
        self.message = message
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, reason: str, **fields) -> None:
        now = time.monotonic()
        if now - self.last.get(reason, -1e9) < 1.0:
            self.suppressed[reason] = self.suppressed.get(reason, 0) + 1
            return
        self.last[reason] = now
        log.warning(self.message, extra={"reason": reason, "since_last_line": self.suppressed.get(reason, 0), **fields})
        self.suppressed[reason] = 0


def refusal_app(admission: Admission, metrics: Metrics, settings: Settings) -> ASGIApp:
    """The ASGI app a request refused for overload gets instead of the service: a 503 from prepared bytes.

    It runs in uvicorn's own request cycle (which reads and drops the body, and keeps the connection
    alive), but skips every layer of the app: under overload most requests are refusals, and each
    one's cost is taken from the requests being served (bench/overload.py).
    """
    refused = metrics.requests.labels(UNKNOWN_MODEL, "503")
    note = _RateLimitedLog("request refused")
    retry_after = str(settings.retry_after_s).encode()

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        refused.inc()
        busy = admission.busy()
        note("overloaded", busy=busy)
        body = json.dumps({"error": {"code": "overloaded", "message": f"{busy}; retry later", "item": None}}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry_after), (b"x-request-id", new_request_id().encode())]})
        await send({"type": "http.response.body", "body": body})

    return refuse


def arriving_app(admission: Admission):
    def arriving(app: ASGIApp) -> ASGIApp:
        """`app`, making sure a request let in from its headers stops counting as arriving even if it never reaches its route."""
        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await app(scope, receive, send)
            finally:
                if (arrival := scope.pop(ARRIVAL, None)) is not None:
                    admission.arrived(arrival)
        return run
    return arriving


def guarded_protocol(settings: Settings, metrics: Metrics, admission: Admission) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with header/body deadlines, a connection cap and admission from `settings`."""
    refused = {reason: metrics.connections_refused.labels(reason) for reason in REASONS}
    note = _RateLimitedLog("connection refused")
    overloaded = refusal_app(admission, metrics, settings)
    arriving = arriving_app(admission)
    retry_after = str(settings.retry_after_s)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                refused["too_many_connections"].inc()
                note("too_many_connections", open=len(self.connections), limit=settings.max_connections)
                transport.write(raw_response(503, "Service Unavailable", "too_many_connections",
                                             f"this worker has {settings.max_connections} connections open; retry later",
                                             {"retry-after": retry_after}))
                transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        # ---- deadlines ------------------------------------------------------------
        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(settings.header_timeout_s, self._header_timeout)

        def _cancel_timers(self) -> None:
            for timer in (self._header_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._body_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            refused["header_timeout"].inc()
            note("header_timeout", client=self.client, timeout_s=settings.header_timeout_s)
            self.transport.write(raw_response(408, "Request Timeout", "header_timeout",
                                              f"request headers not received within {settings.header_timeout_s:g}s"))
            self.transport.close()

        def _body_timeout(self) -> None:
            self._body_timer = None
            cycle = self.cycle
            if self.transport.is_closing() or cycle is None:
                return
            if self.flow.read_paused and not cycle.response_complete:
                # We stopped reading (the app has not asked for more yet, e.g. while the request waits for
                # admission): the client is not the slow one. Its clock restarts when it can send again.
                self._body_timer = self.loop.call_later(settings.body_timeout_s, self._body_timeout)
                return
            refused["body_timeout"].inc()
            note("body_timeout", client=self.client, timeout_s=settings.body_timeout_s, path=self.scope.get("path", "")[:100])
            if not cycle.response_started:
                self.transport.write(raw_response(408, "Request Timeout", "body_timeout",
                                                  f"request body not received within {settings.body_timeout_s:g}s"))
            # The app's next receive() returns http.disconnect; what it sends from now on is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.close()

        # ---- parser callbacks -----------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()  # a keep-alive connection's next request: its clock starts at its first byte

        def on_headers_complete(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if self.parser.get_method() == b"POST" and self.url.partition(b"?")[0] == ADMITTED_PATH:
                if admission.full():
                    self._run_instead(overloaded)  # a prepared 503 instead of the service
                else:
                    weight = admission.weight(dict(self.headers).get(b"content-length", b"").decode("latin-1"), settings.max_images_per_request)
                    self.scope[ARRIVAL] = admission.arrive(weight)  # the route's admission takes it over (service.routers.upscale)
                    self._run_instead(arriving(self.app))
            else:
                super().on_headers_complete()

        def _run_instead(self, app: ASGIApp) -> None:
            """super().on_headers_complete(), with this one request cycle running `app`."""
            own, self.app = self.app, app
            try:
                super().on_headers_complete()
            finally:
                self.app = own
            if self._body_timer is None and not self.transport.is_closing():
                self._body_timer = self.loop.call_later(settings.body_timeout_s, self._body_timeout)

        def on_message_complete(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_message_complete()

    return GuardedHttpToolsProtocol


def uvicorn_config(app, host: str, port: int, **options) -> uvicorn.Config:
    """uvicorn.Config for the app built by create_app, with the guarded protocol and its settings."""
    settings: Settings = app.state.settings
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(settings, app.state.metrics, app.state.admission), **options)
