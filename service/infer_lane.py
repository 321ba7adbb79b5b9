"""POST /v2/models/{name}[/versions/{version}]/infer answered by the HTTP protocol itself, with no ASGI request cycle.

tritonclient and perf_analyzer send one small request per inference, so what each request costs
the event loop outside the model decides the throughput. Measured under perf_analyzer, 128 clients,
conv, with the inference replaced by zeros (`bench/bench_triton.py`): through
uvicorn's request cycle, the ASGI layers and service.fastlane a request cost ~0.16 ms of CPU; a
protocol that answers from its callbacks costs ~0.04 ms. So the guarded protocol (service.server)
hands these requests to this lane: it collects the body in the parser's callbacks, runs the same
`run_infer` the FastAPI route runs (same batcher, limits, metrics, API keys, errors in the protocol's
`{"error": ...}` form), and writes the answer as one block of bytes, with the request id and access
log line every other request gets (service.logs.RequestContextMiddleware).

Only plain requests take it: no query string, HTTP/1.1 keep-alive, a Content-Length within the body
limit, no `Expect: 100-continue`, and nothing else in flight on the connection. Every other request
to these paths goes the ASGI way (service.fastlane), which answers it the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from http import HTTPStatus

from starlette.datastructures import State
from starlette.requests import ClientDisconnect

from model_store import LATEST
from service.deps import check_api_key
from service.errors import ApiError
from service.logs import log_access, new_request_id, request_id, valid_request_id
from service.routers.inference import InferAnswer, run_infer

errors_log = logging.getLogger("service.errors")

# The paths of service.routers.inference's infer routes, in plain ASCII (a name needing %-escapes goes the ASGI way).
INFER_PATH = re.compile(rb"/v2/models/([A-Za-z0-9_.-]+)(?:/versions/([A-Za-z0-9][A-Za-z0-9_.-]{0,63}))?/infer")


def http_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool = True) -> bytes:
    """A whole HTTP/1.1 answer as bytes (Content-Length framed)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
             *(name + b": " + value + b"\r\n" for name, value in headers),
             b"content-length: %d\r\n" % len(body), b"" if keep_alive else b"connection: close\r\n", b"\r\n"]
    return b"".join([*lines, body])


class InferRequest:
    """One request in the lane; it stands where uvicorn keeps a request's cycle (the protocol reads the flags below)."""

    response_started = response_complete = disconnected = False
    gone = None  # the connection's ClientGone (service.limits), set by the protocol

    def __init__(self, name: str, version: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.name, self.version, self.headers = name, version, headers
        self.keep_alive = True  # uvicorn's shutdown sets it False: the connection closes after the answer
        self.message_event = asyncio.Event()  # uvicorn sets it when the connection is lost; nobody waits on it here
        self.chunks: list[bytes] = []
        self.received_at = time.perf_counter()

    @classmethod
    def take(cls, url: bytes, headers: list[tuple[bytes, bytes]], max_body_bytes: int) -> InferRequest | None:
        """The lane's request for POST `url`, or None when it must go the ASGI way (see the module's docstring)."""
        match = INFER_PATH.fullmatch(url)
        if match is None:
            return None
        length = next((value for name, value in headers if name == b"content-length"), None)
        if length is None or not length.isdigit() or int(length) > max_body_bytes:
            return None
        return cls(match[1].decode(), match[2].decode() if match[2] else LATEST, headers)


async def answer(request: InferRequest, state: State, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The whole HTTP answer to `request`, whose body is complete; logs the access line as the ASGI path does."""
    header_values = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
    given = header_values.get("x-request-id", "")
    rid = given if valid_request_id(given) else new_request_id()
    token = request_id.set(rid)
    path = f"/v2/models/{request.name}/infer" if request.version == LATEST else f"/v2/models/{request.name}/versions/{request.version}/infer"
    try:
        try:
            check_api_key(state.settings, header_values.get("authorization"), header_values.get("x-api-key"))
            result: InferAnswer = await run_infer(state, request.name, request.version, header_values.get, _body_of(request), request.gone)
            status, body, headers = 200, result.body, [(b"content-type", result.media_type.encode())]
            if result.header_length is not None:
                headers.append((b"inference-header-content-length", str(result.header_length).encode()))
        except ApiError as exc:
            status, body, headers = _error(exc.status, exc.message, exc.headers)
        except ClientDisconnect:  # the client left while its images waited: nobody reads an answer
            status, body, headers = 499, b"", []
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 in the protocol's shape, with the traceback in the log
            errors_log.error("unhandled error on POST %s", path, exc_info=exc)
            status, body, headers = _error(500, f"internal error ({type(exc).__name__}); see the service log", None)
        log_access("POST", path, status, request.received_at)
    finally:
        request_id.reset(token)
    if status == 499:
        return b""  # the connection is closed: no answer goes out
    return http_response(status, [*default_headers, *headers, (b"x-request-id", rid.encode())], body, request.keep_alive)


def _body_of(request: InferRequest) -> Callable:
    async def read() -> bytes:
        return request.chunks[0] if len(request.chunks) == 1 else b"".join(request.chunks)
    return read


def _error(status: int, message: str, headers: dict[str, str] | None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    extra = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    return status, json.dumps({"error": message}).encode(), [(b"content-type", b"application/json"), *extra]
