"""Structured JSON logs, one object per line, each carrying the request id of the request it belongs to."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import sys
import threading
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Generated ids: a random per-process prefix and a counter (unique, and ~10x cheaper than uuid4).
_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName", "color_message"}
log = logging.getLogger("service.access")
_access_handler: BatchedStreamHandler | None = None  # the access log's handler, once configure_logging has set it


def valid_request_id(given: str) -> bool:
    """A client's X-Request-ID is kept (and logged) only if it is short and plain."""
    return bool(_VALID_ID.match(given))


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


class JsonFormatter(logging.Formatter):
    _second, _stamp = -1, ""  # the last whole second formatted, and its text: most lines share it

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # tells the workers apart (UPGRADER_WORKERS > 1)
        }
        if (rid := request_id.get()) is not None:
            entry["request_id"] = rid
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def access_line(self, method: str, path: str, status: int, ms: float, created: float) -> str:
        """The line `format` writes for log_access's record, built directly: a third of the cost (~3 against ~11 µs
        through Logger.info, LogRecord and format), on the event loop once per request."""
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        rid = request_id.get()
        rid_field = "" if rid is None else f', "request_id": {json.dumps(rid)}'
        return (f'{{"ts": "{self._stamp}.{int((created - second) * 1000):03d}Z", "level": "INFO", "logger": "{log.name}", '
                f'"message": "request", "pid": {os.getpid()}{rid_field}, "method": {json.dumps(method)}, "path": {json.dumps(path)}, '
                f'"status": {status}, "ms": {ms!r}}}')


class BatchedStreamHandler(logging.StreamHandler):
    """A StreamHandler that writes its lines in batches: every `interval_s` (from a thread of its own),
    every `max_lines` lines, and at once from WARNING up; whatever is left at exit is written by logging's atexit flush.

    For the access log: one write (a syscall, during which the event loop gives the GIL to the
    inference thread and then waits to get it back) per request cost the event loop ~8% of its
    requests per second at 32 clients (`bench/bench_service.py`); lines reach the log
    at most `interval_s` late, each with its own timestamp.
    """

    def __init__(self, stream, interval_s: float = 0.2, max_lines: int = 512) -> None:
        super().__init__(stream)
        self.interval_s, self.max_lines = interval_s, max_lines
        self.lines: list[str] = []
        threading.Thread(target=self._flush_every_interval, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record), record.levelno >= logging.WARNING)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise into the caller
            self.handleError(record)

    def add(self, line: str, urgent: bool = False) -> None:
        with self.lock:
            self.lines.append(line)
            full = len(self.lines) >= self.max_lines
        if full or urgent:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if self.lines:
                self.stream.write("\n".join(self.lines) + "\n")
                self.lines.clear()
            super().flush()

    def _flush_every_interval(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.flush()


def configure_logging(level: str) -> None:
    # Nothing here logs threads or multiprocessing names: the logging HOWTO's "Optimization" switches.
    # (The access log's line, one per request, is built without a LogRecord: log_access.)
    logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("service", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    global _access_handler
    batched = _access_handler = BatchedStreamHandler(sys.stderr)  # one line per request: written in batches
    batched.setFormatter(JsonFormatter())
    log.handlers[:] = [batched]
    log.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # the middleware below logs every request, with its id


def log_access(method: str, path: str, status: int, started: float) -> None:
    """The access line of one request (RequestContextMiddleware's).

    While the access logger is as configure_logging left it (its one batched handler, no filters), the line goes
    straight to that handler; otherwise (a test's capturing handler, say) through logging as usual."""
    ms = round((time.perf_counter() - started) * 1000, 2)
    handler = _access_handler
    if (handler is not None and len(log.handlers) == 1 and log.handlers[0] is handler and not log.filters and not handler.filters
            and not log.disabled and log.isEnabledFor(logging.INFO)):
        handler.add(handler.formatter.access_line(method, path, status, ms, time.time()))  # type: ignore[union-attr]
        return
    log.info("request", extra={"method": method, "path": path, "status": status, "ms": ms})


def flush_access_log() -> None:
    """Write the access lines still batched. At shutdown: uvicorn ends a worker by re-raising SIGTERM, so logging's atexit flush never runs."""
    for handler in log.handlers:
        handler.flush()


class RequestContextMiddleware:
    """X-Request-ID in (if sane) or a new one, on the response and on every log line; one access log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if valid_request_id(given) else new_request_id()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_access(scope["method"], scope["path"], status, started)
            request_id.reset(token)
