"""Several server processes on one port (UPGRADER_WORKERS > 1), each with its own listening socket.

uvicorn's own `workers=N` shares one listening socket, so one accept queue: when many clients
connect at once, whichever worker wakes first accepts most of them, and stays the busy one for as
long as those keep-alive connections last (measured: one worker at 100% while the other idled).
Here every worker binds the port itself with SO_REUSEPORT, and the kernel hashes each new
connection to one of the listening sockets, so the load spreads evenly. A worker listens only after
its models are loaded, so no connection is routed to a worker that cannot serve it yet.

The supervisor forwards SIGINT/SIGTERM to the workers (each drains its queue, see app.lifespan)
and exits when all have, killing any worker still alive `grace_s` later; if one dies on its own,
the others are stopped too and the exit code says so (an orchestrator restarts the service as a whole).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import time

from service.observability.logs import configure_logging
from service.settings import Settings

log = logging.getLogger("service.workers")


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve_worker(host: str, port: int, log_level: str, uvicorn_options: dict) -> None:
    """One worker process: its own SO_REUSEPORT socket, its own app (settings from the environment)."""
    import uvicorn  # here, not at the top: the supervisor importing this module stays without torch

    from service.app import create_app
    from service.server import uvicorn_config

    configure_logging(log_level)
    config = uvicorn_config(create_app(Settings()), host, port, **uvicorn_options)
    uvicorn.Server(config).run(sockets=[listening_socket(host, port)])


def run_workers(count: int, host: str, port: int, log_level: str, uvicorn_options: dict, grace_s: float) -> int:
    """Start `count` workers and wait for them; returns the exit code for the supervisor."""
    listening_socket(host, port).close()  # a port already taken fails here, once, with a clear error
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or event-loop state
    workers = [spawn.Process(target=serve_worker, args=(host, port, log_level, uvicorn_options), name=f"upgrader-worker-{i}")
               for i in range(count)]
    deadline: float | None = None  # set once stopping: after it, workers are killed

    def stop(signum, frame) -> None:
        nonlocal deadline
        deadline = deadline or time.monotonic() + grace_s
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: uvicorn's graceful shutdown in the worker

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.start()
    log.info("workers started", extra={"workers": count, "pids": [w.pid for w in workers], "host": host, "port": port})
    failed = 0
    while any(w.is_alive() for w in workers):
        sentinels = [w.sentinel for w in workers if w.is_alive()]
        # A bounded wait: a signal handler that sets the deadline does not interrupt it (PEP 475 retries).
        multiprocessing.connection.wait(sentinels, 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic())))
        for worker in workers:
            if not worker.is_alive() and worker.exitcode not in (0, -signal.SIGTERM) and deadline is None:
                log.error("worker exited", extra={"pid": worker.pid, "exitcode": worker.exitcode})
                failed = 1
                stop(signal.SIGTERM, None)
        if deadline is not None and time.monotonic() >= deadline:
            for worker in workers:
                if worker.is_alive():
                    log.error("worker did not stop in time; killing it", extra={"pid": worker.pid, "grace_s": grace_s})
                    worker.kill()
                    worker.join()
                    failed = 1
    log.info("workers stopped", extra={"exitcodes": [w.exitcode for w in workers]})
    return failed
