"""`ReceiveWatcher`: the HTTP side of ClientGone (service.runtime.cancellation), from ASGI's `http.disconnect`.

HTTP/1.1 has no other way to say "cancel" than closing the connection, and ASGI tells the app so: once a
request's body is read, `receive()` returns `http.disconnect` when the connection closes (uvicorn, as the
ASGI spec has it; Starlette's `Request.is_disconnected` asks the same). The watcher waits for that message
in a task started once something has waited on the request for `WATCH_AFTER_S`.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Receive

from service.runtime.cancellation import ClientGone

# A request whose work is done within this long is never watched: a watcher is a task per request (~15 us of the
# event loop, 5% of a small request's cost at 32 clients), and what it would drop is a few milliseconds of work.
# A request that waits longer (under load or overload, where dropping matters) is watched from then on, and a
# client that left meanwhile is seen at once.
WATCH_AFTER_S = 0.05


class ReceiveWatcher(ClientGone):
    """For a request whose body has been read: fires when `receive()` says the client disconnected."""

    __slots__ = ("_receive", "_watcher", "_timer")

    def __init__(self, receive: Receive) -> None:
        super().__init__()
        self._receive = receive  # the request's receive, its body read: its next message is the disconnect
        self._watcher: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None  # starts the watcher

    def watching(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start_watching)

    def close(self) -> None:
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
