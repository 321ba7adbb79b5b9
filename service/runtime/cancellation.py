"""What the runtime knows of a client that leaves: `ClientGone` fires once, `ClientLeft` is raised.

A client that gives up (a timeout, a cut load, a cancelled gRPC call) leaves work behind it: images
queued for a batch, a place in the admission line. Computing answers nobody reads takes the CPU from the
requests that arrive next (`bench/overload.py --settle-s 0`). The admission line and the batcher register
what to drop on the request's `ClientGone` while it waits; each transport fires it its own way (HTTP:
service.http.disconnect watches ASGI `receive()`; gRPC: the call's done callback when it was cancelled).
An answer already being computed (a running batch) is finished and dropped.
"""

from __future__ import annotations


class ClientLeft(Exception):
    """The request's client went away: nobody reads its answer (counted as 499; no answer is sent)."""


class ClientGone:
    """Fires its callbacks once, when the client has left (or at once for a callback added after that)."""

    __slots__ = ("fired", "_callbacks")

    def __init__(self) -> None:
        self.fired = False
        self._callbacks: set = set()

    def add(self, callback) -> None:
        """Call `callback()` when the client leaves (at once if it has)."""
        if self.fired:
            callback()
            return
        self._callbacks.add(callback)
        self.watching()

    def discard(self, callback) -> None:
        self._callbacks.discard(callback)

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            callbacks, self._callbacks = self._callbacks, set()
            for callback in callbacks:
                callback()

    def watching(self) -> None:
        """Something waits on this request now: a transport that must look for the client's leaving starts here."""

    def close(self) -> None:
        """The request is over: stop watching."""
