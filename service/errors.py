"""One error shape for every failure: {"error": {"code", "message", "item"}}.

Except under /v2 (the Open Inference Protocol), where the protocol fixes the shape to
`{"error": "<message>"}` (what tritonclient reads): the same errors, said in the protocol's form.

`ApiError` is raised anywhere in the service; the handlers below also turn FastAPI's
validation errors, Starlette's HTTP errors (unknown route, wrong method) and, as a last
resort, unexpected exceptions into the same shape, so a client never sees HTML or a
bare traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.runtime.cancellation import ClientLeft

log = logging.getLogger("service.errors")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, item: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.item, self.headers = status, code, message, item, headers

    def response(self, path: str = "") -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.item, self.headers, path)


def error_response(status: int, code: str, message: str, item: int | None = None, headers: dict[str, str] | None = None,
                   path: str = "") -> JSONResponse:
    if is_protocol_path(path):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return JSONResponse({"error": {"code": code, "message": message, "item": item}}, status_code=status, headers=headers)


def validation_message(error: dict) -> tuple[str, str]:
    """One pydantic validation error -> (where, what): its location dotted (`query.ensemble`, `inputs.0.shape`) and its message.

    Every place that validates client input with pydantic names the problem this way."""
    return ".".join(str(part) for part in error.get("loc", ())), error.get("msg", "invalid request")


ECHO_LIMIT = 100  # characters of client input repeated in an error message (a 65 KB URL gets a short answer)


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """Client input as quoted in an error message: repr'd, and cut to `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


PROTOCOL_PREFIX = "/v2"


def is_protocol_path(path: str) -> bool:
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")


def unavailable(code: str, message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after_s)})


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def validation_error_response(errors, path: str) -> JSONResponse:
    """A parameter that failed validation: 422, or 400 under /v2 as the protocol says."""
    where, what = validation_message(errors[0] if errors else {})  # e.g. query.ensemble: every location names its part
    status = 400 if is_protocol_path(path) else 422
    return error_response(status, "invalid_parameter", f"{where}: {what}", path=path)


def client_gone_response(path: str) -> JSONResponse:
    # The client left (or a body deadline closed its connection): nobody reads this answer.
    log.info("client disconnected before its request was read", extra={"path": path[:100]})
    return error_response(400, "client_disconnected", "the client disconnected before sending its whole body")


def unexpected_error_response(method: str, path: str, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", method, path[:100], exc_info=exc)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the service log", path=path)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc.errors(), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = f"no route {request.method} {echo(request.url.path)}" if exc.status_code == 404 else str(exc.detail)[:500]
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None), path=request.url.path)

    @app.exception_handler(ClientDisconnect)
    @app.exception_handler(ClientLeft)
    async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
        return client_gone_response(request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(request.method, request.url.path, exc)
