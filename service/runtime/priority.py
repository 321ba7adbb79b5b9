"""CPU priority of a worker's helper and inference threads: below its event loop's.

In an overload herd (hundreds of connections and requests arriving at once) the event loop is what
admits or refuses them, while the helper thread (parsing, decoding, answering large requests) and the
inference thread of the requests already admitted compete with it for the same cores. Linux gives each
thread its own nice value: these threads run `UPGRADER_THREAD_NICE` (10) above the loop, so the loop
gets a core first whenever it has work and they get the rest. Measured with bench/overload.py (10-s runs,
2 alternated rounds): the first half second's 437 refusals went from p50 33-41 / p99 98-113 ms to
p50 25-31 / p99 56-75 ms, at the same goodput.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from anyio import to_thread

T = TypeVar("T")
_nice = 0  # set once per worker process by `configure` (the app's lifespan), like its logging
_lowered = threading.local()


def configure(nice: int) -> None:
    global _nice
    _nice = nice


def lower_this_thread() -> None:
    """Raise the calling thread's nice value by the configured amount, once per thread (not Linux, or not allowed: unchanged)."""
    if _nice <= 0 or getattr(_lowered, "done", False):
        return
    _lowered.done = True
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + _nice)
    except (OSError, AttributeError):
        pass


def _lowered_call(fn: Callable[..., T], *args) -> T:
    lower_this_thread()
    return fn(*args)


async def off_loop(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` on the worker's helper thread (anyio's thread pool, whose limiter the app sets to one thread),
    which runs at the lower priority."""
    return await to_thread.run_sync(_lowered_call, fn, *args)
