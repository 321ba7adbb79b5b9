"""One owner per port, and several server processes on it (UPGRADER_WORKERS > 1), each with its own listening socket.

uvicorn's own `workers=N` shares one listening socket, so one accept queue: when many clients
connect at once, whichever worker wakes first accepts most of them, and stays the busy one for as
long as those keep-alive connections last (measured: one worker at 100% while the other idled).
Here every worker binds the port itself with SO_REUSEPORT, and the kernel hashes each new
connection to one of the listening sockets, so the load spreads evenly. A worker listens only after
its models are loaded, so no connection is routed to a worker that cannot serve it yet.

SO_REUSEPORT lets any process of the same user join a port, so a second instance started on a port in use
would silently take a share of its connections. `claim_ports` keeps that from happening: before any worker
starts, the supervisor binds each port (HTTP and gRPC) once without SO_REUSEPORT, which fails with "address
already in use" while anything holds it, and then holds a placeholder socket on it for as long as it runs
(SO_REUSEPORT without SO_REUSEADDR, never listening: it takes no connections, its own workers join it, and
another instance's probe fails on it). The same holds with one worker (service.__main__).

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


class PortTaken(RuntimeError):
    """A port this instance would serve on is held by another process."""


def claim_ports(host: str, ports: dict[str, int]) -> list[socket.socket]:
    """{what: port} -> placeholder sockets that keep each port this instance's until closed; PortTaken names the port
    another process holds (port 0 and None are skipped: the kernel picks those)."""
    claimed = []
    for what, port in ports.items():
        if not port:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of an earlier run in TIME_WAIT are no owner
            try:
                probe.bind((host, port))
            except OSError as exc:
                for sock in claimed:
                    sock.close()
                raise PortTaken(f"{what} port {port} on {host} is already in use ({exc.strerror}): another Upgrader or another "
                                f"server listens there; stop it, or choose another port") from None
        placeholder = socket.socket(family, socket.SOCK_STREAM)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        placeholder.bind((host, port))
        claimed.append(placeholder)
    return claimed


def serve_worker(host: str, port: int, log_level: str, uvicorn_options: dict) -> None:
    """One worker process: its own SO_REUSEPORT socket, its own app (settings from the environment)."""
    import uvicorn  # here, not at the top: the supervisor importing this module stays without torch

    from service.app import create_app
    from service.server import uvicorn_config

    configure_logging(log_level)
    app = create_app(Settings())
    app.state.ports_claimed = True  # the supervisor holds the ports: this worker's gRPC server joins them (SO_REUSEPORT)
    config = uvicorn_config(app, host, port, **uvicorn_options)
    uvicorn.Server(config).run(sockets=[listening_socket(host, port)])


def run_workers(count: int, host: str, port: int, log_level: str, uvicorn_options: dict, grace_s: float) -> int:
    """Start `count` workers and wait for them; returns the exit code for the supervisor."""
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
