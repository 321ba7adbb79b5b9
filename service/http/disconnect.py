"""ClientGone: fires once when a request's client has left, so the work it still waits for is dropped.

A client that gives up (a timeout, a cut load) leaves work behind it: images queued for a batch, a place
in the admission line. Computing answers nobody reads takes the CPU from the requests that arrive next
(`bench/overload.py --settle-s 0`). HTTP/1.1 has no other way to say "cancel" than closing the
connection, and ASGI tells the app so: once a request's body is read, `receive()` returns
`http.disconnect` when the connection closes (uvicorn, as the ASGI spec has it; Starlette's
`Request.is_disconnected` asks the same). `ClientGone.after_body(receive)` waits for that message in a
task started once something has waited on it for `WATCH_AFTER_S`; the admission line and the batcher
register what to drop while a request waits. An answer already being computed (a running batch) is
finished and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Receive

# A request whose work is done within this long is never watched: a watcher is a task per request (~15 us of the
# event loop, 5% of a small request's cost at 32 clients), and what it would drop is a few milliseconds of work.
# A request that waits longer (under load or overload, where dropping matters) is watched from then on, and a
# client that left meanwhile is seen at once.
WATCH_AFTER_S = 0.05


class ClientGone:
    """Fires its callbacks once, when the client has left (or at once for a callback added after that)."""

    __slots__ = ("fired", "_callbacks", "_receive", "_watcher", "_timer")

    def __init__(self, receive: Receive | None = None) -> None:
        self.fired = False
        self._callbacks: set = set()
        self._receive = receive  # the request's receive, its body read: its next message is the disconnect
        self._watcher: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None  # starts the watcher

    @classmethod
    def after_body(cls, receive: Receive) -> ClientGone:
        """For a request whose body has been read: fires when `receive()` says the client disconnected."""
        return cls(receive)

    def add(self, callback) -> None:
        """Call `callback()` when the client leaves (at once if it has)."""
        if self.fired:
            callback()
            return
        self._callbacks.add(callback)
        if self._timer is None and self._receive is not None:
            self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start_watching)

    def discard(self, callback) -> None:
        self._callbacks.discard(callback)

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            callbacks, self._callbacks = self._callbacks, set()
            for callback in callbacks:
                callback()

    def close(self) -> None:
        """The request is over: stop watching."""
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _start_watching(self) -> None:
        if not self.fired and self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        with contextlib.suppress(Exception):
            message = await self._receive()
            # After the answer went out the server says the same; by then nothing is registered to drop.
            if message.get("type") == "http.disconnect":
                self.fire()
