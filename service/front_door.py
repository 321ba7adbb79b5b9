"""The first protocol of every connection: overload refused from the headers, before uvicorn's protocol exists.

In an overload herd (bench/overload.py: 512 clients connecting at once) most new connections carry
one POST /upscale that is refused. Through uvicorn's protocol each cost the worker's event loop
~160 us: building the protocol and its parser, two address lookups, a Python callback per header,
the refusal, then the body's callbacks. Hundreds arrive in the same few milliseconds, so the last
ones waited for all of that (`bench/overload.py`; docs/serving.md).

`FrontDoor` reads a connection's requests itself while they are plain refusals: the head is cut at
the blank line by bytes.find and checked by one regex and a loop over its lines; if admission is
full it writes `Refusal.raw` and drops the announced body by counting bytes, keeping the connection
(and its deadlines) as the guarded protocol would. Anything else (another path or method, admission
not full, HTTP/1.0, chunked bodies, Expect, upgrades, odd header syntax) is handed over untouched:
the guarded uvicorn protocol (service.server) takes the transport and the bytes read so far, and
keeps the connection from then on. So httptools still parses every request that gets served.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from service.limits import Admission
from service.settings import Settings

HEAD_LIMIT = 16 * 1024  # a head longer than this is not a plain refusal: handed over (httptools decides)
_REFUSABLE_LINE = re.compile(rb"POST /upscale(?:\?[^ \r\n]*)? HTTP/1\.1")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110); anything else: handed over
_HAND_OVER = (b"transfer-encoding", b"expect", b"upgrade")


def refusable(head: bytes) -> tuple[int, bool] | None:
    """(Content-Length, keep-alive) of a plain `POST /upscale HTTP/1.1` head (without its blank line), or None."""
    request_line, _, fields = head.partition(b"\r\n")
    if not _REFUSABLE_LINE.fullmatch(request_line):
        return None
    length, keep_alive = None, True
    for line in fields.split(b"\r\n") if fields else ():
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return None
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit():  # two lengths (a smuggling attempt) or not a number
                return None
            length = int(value)
        elif name in _HAND_OVER:
            return None
        elif name == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            keep_alive = b"close" not in tokens
    return None if length is None else (length, keep_alive)


def front_door(inner: type[asyncio.Protocol], refusal, admission: Admission, settings: Settings,
               watch: Callable[[asyncio.AbstractEventLoop, set], None],
               too_many: Callable[[asyncio.Transport, int], None],
               timed_out: Callable[..., None]) -> type[asyncio.Protocol]:
    """The protocol class uvicorn builds for each connection: refusals here, the rest to `inner` (service.server).

    `watch` starts the worker's deadline sweep, `too_many` refuses a connection over the cap, `timed_out`
    answers (or just closes, when the answer already went out) a connection past its header or body deadline."""

    class FrontDoor(asyncio.Protocol):
        def __init__(self, config, server_state, app_state, _loop: asyncio.AbstractEventLoop | None = None) -> None:
            self.handover = {"config": config, "server_state": server_state, "app_state": app_state, "_loop": _loop}
            self.server_state = server_state
            self.connections: set = server_state.connections
            self.loop = _loop or asyncio.get_event_loop()
            self.keep_alive_s = config.timeout_keep_alive
            self.transport: asyncio.Transport | None = None
            self.buffer = bytearray()  # the request being read (appended in place: a head may come a byte at a time)
            self.dropping = 0  # bytes of a refused request's body still to come, read and dropped
            self.header_deadline: float | None = None  # loop.time() by which the head being read must be complete
            self.body_deadline: float | None = None  # ... the refused body dropped
            self.idle_deadline: float | None = None  # ... the next request begun (uvicorn's keep-alive timeout)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.connections.add(self)
            self.transport = transport
            watch(self.loop, self.connections)
            if len(self.connections) > settings.max_connections:
                too_many(transport, len(self.connections))
                return
            self.header_deadline = self.loop.time() + settings.header_timeout_s

        def connection_lost(self, exc: Exception | None) -> None:
            self.connections.discard(self)

        def shutdown(self) -> None:
            """uvicorn's graceful shutdown: nothing here is in flight (a refusal is answered at once)."""
            self.transport.close()

        def check_deadlines(self, now: float) -> None:
            """Called by the worker's sweep (service.server)."""
            if self.header_deadline is not None and now >= self.header_deadline:
                self.header_deadline = None
                timed_out("header_timeout", self.transport, False, client=self.transport.get_extra_info("peername"))
            elif self.body_deadline is not None and now >= self.body_deadline:
                self.body_deadline = None
                timed_out("body_timeout", self.transport, True, client=self.transport.get_extra_info("peername"))
            elif self.idle_deadline is not None and now >= self.idle_deadline:
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.dropping:
                if len(data) < self.dropping:
                    self.dropping -= len(data)
                    return
                data, self.dropping = data[self.dropping:], 0
                self.body_deadline, self.idle_deadline = None, self.loop.time() + self.keep_alive_s
                if not data:
                    return
            if self.buffer:  # a head that came in pieces: appended in place, the blank line searched in the new bytes only
                scanned = max(0, len(self.buffer) - 3)
                self.buffer += data
                pending: bytes | bytearray = self.buffer
            else:  # the first bytes of a request: its head's clock starts (as the guarded protocol's)
                self.idle_deadline = None
                if self.header_deadline is None:
                    self.header_deadline = self.loop.time() + settings.header_timeout_s
                scanned, pending = 0, data  # read in place: a refused body is never copied
            start = 0  # where the request being read begins in `pending`
            while (end := pending.find(b"\r\n\r\n", max(scanned, start))) >= 0:
                plain = refusable(bytes(pending[start:end]))
                if plain is None or not admission.full():
                    self.buffer = bytearray(pending[start:])
                    return self.hand_over()
                length, keep_alive = plain
                self.transport.write(refusal.raw(self.server_state.default_headers, keep_alive))
                self.server_state.total_requests += 1
                self.header_deadline = None
                if not keep_alive:
                    self.transport.close()
                    return
                body_start = end + 4
                if len(pending) - body_start < length:
                    self.dropping = length - (len(pending) - body_start)
                    self.buffer = bytearray()
                    self.body_deadline = self.loop.time() + settings.body_timeout_s
                    return
                start = body_start + length
                if start == len(pending):
                    self.buffer = bytearray()
                    self.idle_deadline = self.loop.time() + self.keep_alive_s
                    return
                self.header_deadline = self.loop.time() + settings.header_timeout_s  # a pipelined request
            if start or pending is not self.buffer:
                self.buffer = bytearray(pending[start:])
            if len(self.buffer) > HEAD_LIMIT:
                self.hand_over()

        def hand_over(self) -> None:
            """The connection to the guarded uvicorn protocol, with what has been read of the current request and its head's deadline."""
            protocol = inner(**self.handover)
            self.connections.discard(self)
            self.transport.set_protocol(protocol)
            protocol.connection_made(self.transport)
            protocol.carry_header_deadline(self.header_deadline)
            if self.buffer:
                protocol.data_received(bytes(self.buffer))

    return FrontDoor
