"""The HTTP server side of a worker: uvicorn, with the connection limits uvicorn lacks.

uvicorn times out idle keep-alive connections, but a client that sends its headers or body a byte
at a time (slowloris) holds a connection, a parser and a request task forever, and there is no cap
on open connections. Every connection starts at service.front_door's protocol, which answers plain
overload refusals itself and hands anything else to `GuardedHttpToolsProtocol`: uvicorn's httptools
protocol (the one `http="auto"` picks) with, per connection:

* a header deadline: the headers must be complete `header_timeout_s` after the connection opens
  or after the first byte of the next keep-alive request; else 408 and close;
* a body deadline: the whole body must have arrived `body_timeout_s` after the headers; else 408
  (or, if the answer already went out, just close) and the request sees a disconnect (both deadlines
  are checked by one sweep over the worker's connections, a quarter of the shorter timeout apart at
  most every 0.5 s, not by timers armed and cancelled on every request);
* one send per answer: uvicorn writes an answer's head and body with two `transport.write` calls, so
  two send() syscalls, two TCP segments (TCP_NODELAY) and two wake-ups of the client. The head is
  held until the body's write and both go out together (`CoalescingTransport`);
* a connection cap: a connection beyond `max_connections` open on this worker gets 503 and is
  closed before anything is parsed (by the front door, which every connection passes);
* the inference lane: a plain POST /v2/.../infer is answered by the protocol itself, from its
  parser callbacks (service.infer_lane), without uvicorn's request cycle or the ASGI layers;
* a client that leaves is let go: when a connection closes, its `ClientGone` fires (service.limits)
  and the requests on it still waiting (for a place in line, or for a batch) are dropped, not
  computed for nobody (POST /upscale and /v2 .../infer, in the inference lane or not);
* admission: while the worker's admission budget and line are full (service.limits.Admission),
  POST /upscale is answered 503 + Retry-After from its headers, without entering the app. On a
  connection still at the front door (the common case under overload: new clients, and clients
  refused before) the door writes it; here it is written straight to the socket with no request
  cycle or task when nothing else is in flight on the connection, else by `Refusal.app` in a cycle
  of its own, queued behind the one in flight so answers keep their order. Either way its body is
  read and dropped, and the connection stays open.

Each trigger is counted in `upgrader_connections_refused_total{reason}` and logged (at most one line
per reason per second, with how many happened since the last line).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import uvicorn
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.front_door import front_door
from service.infer_lane import InferRequest, http_response
from service.infer_lane import answer as infer_answer
from service.limits import ARRIVAL, CLIENT_GONE, Admission, ClientGone
from service.logs import new_request_id
from service.metrics import UNKNOWN_MODEL, Metrics
from service.settings import Settings

log = logging.getLogger("service.server")

REASONS = ("too_many_connections", "header_timeout", "body_timeout")
ADMITTED_PATH = b"/upscale"  # the requests that take an admission slot (service.limits.Admission)


def error_answer(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error answer in the service's JSON shape that closes the connection, written straight to the socket (no request cycle exists)."""
    body = json.dumps({"error": {"code": code, "message": message, "item": None}}).encode()
    extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    return http_response(status, [(b"content-type", b"application/json"), *extra], body, keep_alive=False)


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


class Refusal:
    """The 503 + Retry-After of a request refused for overload: counted, logged at most once a second, its body and headers built here.

    Under overload most requests are refusals, and each one's cost is taken from the requests being
    served (bench/overload.py), so none of them enters the app: `raw` is written to the socket by the
    protocol itself, `app` is the same answer for a request that must wait its turn in a request cycle.
    """

    def __init__(self, admission: Admission, metrics: Metrics, settings: Settings) -> None:
        self.admission = admission
        self.counter = metrics.requests.labels(UNKNOWN_MODEL, "503")
        self.note = _RateLimitedLog("request refused")
        self.retry_after = str(settings.retry_after_s).encode()
        # In a herd every refusal has the same body (the worker's state does not change between them) and
        # the same headers but its request id: both are built once and reused while they hold
        # (json.dumps and the header lines were ~10% of a worker's time per refused connection).
        self._busy, self._body = "", b""
        self._framed: tuple = (None, None, False, b"", b"")  # (default headers, body, keep-alive, head up to the id, the rest)

    def body(self) -> tuple[bytes, bytes]:
        """-> (JSON body, request id), counting and logging the refusal."""
        self.counter.inc()
        busy = self.admission.busy()
        self.note("overloaded", busy=busy)
        if busy != self._busy:
            self._busy = busy
            self._body = json.dumps({"error": {"code": "overloaded", "message": f"{busy}; retry later", "item": None}}).encode()
        return self._body, new_request_id().encode()

    def headers(self, request_id: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"application/json"), (b"retry-after", self.retry_after), (b"x-request-id", request_id)]

    def raw(self, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
        """The whole answer as bytes, with uvicorn's default headers (date, server) as its own answers have.

        uvicorn replaces its default-headers list once a second (the date): the framing around the
        request id is rebuilt when the list, the body or keep-alive changes."""
        body, request_id = self.body()
        headers, framed_body, framed_keep_alive, head, rest = self._framed
        if headers is not default_headers or framed_body is not body or framed_keep_alive != keep_alive:
            marker = b"\0request-id\0"
            whole = http_response(503, [*default_headers, *self.headers(marker)], body, keep_alive)
            head, _, rest = whole.partition(marker)
            self._framed = (default_headers, body, keep_alive, head, rest)
        return b"".join((head, request_id, rest))

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, request_id = self.body()
        headers = [*self.headers(request_id), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class CoalescingTransport:
    """A transport that holds a write until the next one, so an answer's head and body leave as one writev.

    uvicorn writes the head, then the body at once (in the same task step): the body's write sends both
    (uvloop's writelines). A head whose body is not written in the same event-loop turn (a streamed answer)
    leaves at the end of the turn. `send` writes whole answers at once (the protocol's own). Everything
    but writing and close is the wrapped transport's; close() sends what is held first."""

    __slots__ = ("_transport", "_loop", "_pending", "is_closing", "pause_reading", "resume_reading")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []
        # Called on every request: bound once here rather than found through __getattr__ each time.
        self.is_closing, self.pause_reading, self.resume_reading = transport.is_closing, transport.pause_reading, transport.resume_reading

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if len(self._pending) == 1:
            self._loop.call_soon(self.flush)  # held: the body is on its way
        else:
            self.flush()

    def send(self, data: bytes) -> None:
        """`data` now (after anything held): a whole answer."""
        self._pending.append(data)
        self.flush()

    def flush(self) -> None:
        if self._pending:
            if not self._transport.is_closing():
                self._transport.writelines(self._pending)
            self._pending = []

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class _Answered:
    """Stands where uvicorn keeps a request's cycle, for a request answered from its headers by the protocol.

    It is finished (`response_complete`), so uvicorn drops the request's body as it arrives and starts
    the next request on the connection as usual (after this one's, whose answer is already written)."""

    response_started = response_complete = True
    disconnected = False

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.message_event = asyncio.Event()


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


def guarded_protocol(state: State) -> type[asyncio.Protocol]:
    """The protocol for the app whose `state` it is: service.front_door's, which refuses overload itself and hands
    every other request's connection to uvicorn's httptools protocol with header/body deadlines, admission and the
    inference lane (GuardedHttpToolsProtocol below)."""
    settings: Settings = state.settings
    metrics: Metrics = state.metrics
    admission: Admission = state.admission
    refused = {reason: metrics.connections_refused.labels(reason) for reason in REASONS}
    note = _RateLimitedLog("connection refused")
    refusal = Refusal(admission, metrics, settings)
    arriving = arriving_app(admission)
    retry_after = str(settings.retry_after_s)
    # The header and body deadlines are checked by one sweep per worker every `tick` seconds, over all its
    # connections, instead of a timer armed and cancelled twice per request (~6% of the event loop's samples
    # at c = 128 on conv): a deadline fires up to `tick` late.
    tick = min(0.5, max(0.01, min(settings.header_timeout_s, settings.body_timeout_s) / 4))
    swept: list[asyncio.AbstractEventLoop] = []  # the loop the sweep runs on (a server's; tests start several)

    def sweep(loop: asyncio.AbstractEventLoop, connections: set) -> None:
        now = loop.time()
        for protocol in list(connections):
            if isinstance(protocol, (GuardedHttpToolsProtocol, FrontDoor)):
                protocol.check_deadlines(now)
        loop.call_later(tick, sweep, loop, connections)

    def watch(loop: asyncio.AbstractEventLoop, connections: set) -> None:
        """Start the sweep on the first connection's loop."""
        if loop not in swept:
            swept[:] = [loop]
            loop.call_later(tick, sweep, loop, connections)

    def too_many(transport: asyncio.Transport, open_count: int) -> None:
        refused["too_many_connections"].inc()
        note("too_many_connections", open=open_count, limit=settings.max_connections)
        transport.write(error_answer(503, "too_many_connections", f"this worker has {settings.max_connections} connections open; retry later",
                                     {"retry-after": retry_after}))
        transport.close()

    def timed_out(reason: str, transport: asyncio.Transport, answered: bool, **fields) -> None:
        """A connection past its header or body deadline: 408 (unless its answer already went out), counted, logged, closed."""
        if transport.is_closing():
            return
        refused[reason].inc()
        timeout_s = settings.header_timeout_s if reason == "header_timeout" else settings.body_timeout_s
        note(reason, timeout_s=timeout_s, **fields)
        if not answered:
            what = "headers" if reason == "header_timeout" else "body"
            transport.write(error_answer(408, reason, f"request {what} not received within {timeout_s:g}s"))
        transport.close()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_deadline: float | None = None  # loop.time() by which the headers must be in
        _body_deadline: float | None = None  # ... and the body

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            """Handed over by the front door (which counted the connection against the cap)."""
            super().connection_made(transport)
            self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
            self.gone = ClientGone()  # fired when the connection closes: its requests' waiting work is dropped
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self.gone.fire()

        def carry_header_deadline(self, deadline: float | None) -> None:
            """The head being read began at the front door: its clock started there."""
            if deadline is not None:
                self._header_deadline = deadline

        # ---- deadlines ------------------------------------------------------------
        def check_deadlines(self, now: float) -> None:
            if self._header_deadline is not None and now >= self._header_deadline:
                self._header_timeout()
            if self._body_deadline is not None and now >= self._body_deadline:
                self._body_timeout()

        def _arm_header_timer(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.time() + settings.header_timeout_s

        def _header_timeout(self) -> None:
            self._header_deadline = None
            timed_out("header_timeout", self.transport, False, client=self.client)

        def _body_timeout(self) -> None:
            self._body_deadline = None
            cycle = self.cycle
            if self.transport.is_closing() or cycle is None:
                return
            if self.flow.read_paused and not cycle.response_complete:
                # We stopped reading (the app has not asked for more yet, e.g. while the request waits for
                # admission): the client is not the slow one. Its clock restarts when it can send again.
                self._body_deadline = self.loop.time() + settings.body_timeout_s
                return
            # The app's next receive() returns http.disconnect; what it sends from now on is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            timed_out("body_timeout", self.transport, cycle.response_started, client=self.client, path=self.scope.get("path", "")[:100])

        # ---- parser callbacks -----------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()  # a keep-alive connection's next request: its clock starts at its first byte

        def on_headers_complete(self) -> None:
            self._header_deadline = None
            post = self.parser.get_method() == b"POST"
            if post:
                self.scope[CLIENT_GONE] = self.gone  # read by the /upscale and /v2 infer routes (and Admission.slot)
            if post and self.url.partition(b"?")[0] == ADMITTED_PATH:
                if admission.full():
                    if self.cycle is None or self.cycle.response_complete:
                        self._refuse_now()
                    else:  # an answer is still being made on this connection: this one goes out after it
                        self._run_instead(refusal.app)
                else:
                    weight = admission.weight(dict(self.headers).get(b"content-length", b"").decode("latin-1"), settings.max_images_per_request)
                    self.scope[ARRIVAL] = admission.arrive(weight)  # the route's admission takes it over (service.routers.upscale)
                    self._run_instead(arriving(self.app))
            elif (post and self._plain()
                  and (request := InferRequest.take(self.url, self.headers, settings.max_body_bytes)) is not None):
                self.cycle = request  # type: ignore[assignment]  # service.infer_lane serves it from on_message_complete
                request.gone = self.gone
                self._arm_body_timer()
            else:
                super().on_headers_complete()

        def _plain(self) -> bool:
            """Nothing in flight on the connection, HTTP/1.1 keep-alive and no Expect: a request the protocol may answer itself."""
            return ((self.cycle is None or self.cycle.response_complete) and self.parser.get_http_version() == "1.1"
                    and self.parser.should_keep_alive() and not self.expect_100_continue)

        def _refuse_now(self) -> None:
            """The 503 written at once, with no request cycle or task: the protocol's whole cost of a refusal.

            A client that waits for `100 Continue` never sends its body after a final answer, so its
            connection is closed (as is one whose request asked for that)."""
            keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive() and not self.expect_100_continue
            self.transport.send(refusal.raw(self.server_state.default_headers, keep_alive))
            self.cycle = _Answered(keep_alive)  # type: ignore[assignment]
            if keep_alive:
                self._arm_body_timer()  # the rest of the body is dropped as it comes; on_message_complete ends the request
            else:
                self.server_state.total_requests += 1
                self.transport.close()

        async def _answer(self, request: InferRequest) -> None:
            data = await infer_answer(request, state, self.server_state.default_headers)
            request.response_started = request.response_complete = True
            if self.transport.is_closing():  # the client left, or the connection was closed meanwhile
                return
            self.transport.send(data)
            if request.keep_alive:
                self.on_response_complete()  # as uvicorn after an answer: count it, resume reading, start a pipelined request
            else:
                self.server_state.total_requests += 1
                self.transport.close()

        def _run_instead(self, app: ASGIApp) -> None:
            """super().on_headers_complete(), with this one request cycle running `app`."""
            own, self.app = self.app, app
            try:
                super().on_headers_complete()
            finally:
                self.app = own
            self._arm_body_timer()

        def _arm_body_timer(self) -> None:
            if self._body_deadline is None and not self.transport.is_closing():
                self._body_deadline = self.loop.time() + settings.body_timeout_s

        def on_body(self, body: bytes) -> None:
            if isinstance(self.cycle, InferRequest):
                self.cycle.chunks.append(body)  # at most Content-Length bytes, within the body limit (InferRequest.take)
            else:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._body_deadline = None
            if isinstance(self.cycle, InferRequest):
                task = self.loop.create_task(self._answer(self.cycle))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)  # uvicorn's shutdown waits for it
                return
            if isinstance(self.cycle, _Answered) and not self.transport.is_closing():
                # A request answered from its headers is over once its body is in: as uvicorn after an
                # answer, count it and arm the keep-alive timer (the body's arrival had disarmed it).
                self.on_response_complete()
            super().on_message_complete()

    FrontDoor = front_door(GuardedHttpToolsProtocol, refusal, admission, settings, watch, too_many, timed_out)
    return FrontDoor


def uvicorn_config(app, host: str, port: int, **options) -> uvicorn.Config:
    """uvicorn.Config for the app built by create_app, with the guarded protocol and its settings."""
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(app.state), **options)
