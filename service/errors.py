"""One error shape for every failure: {"error": {"code", "message", "item"}}.

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

log = logging.getLogger("service.errors")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, item: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.item, self.headers = status, code, message, item, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.item, self.headers)


def error_response(status: int, code: str, message: str, item: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "item": item}}, status_code=status, headers=headers)


ECHO_LIMIT = 100  # characters of client input repeated in an error message (a 65 KB URL gets a short answer)


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """Client input as quoted in an error message: repr'd, and cut to `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def unavailable(code: str, message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after_s)})


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, "invalid_parameter", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = f"no route {request.method} {echo(request.url.path)}" if exc.status_code == 404 else str(exc.detail)[:500]
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left (or a body deadline closed its connection): nobody reads this answer.
        log.info("client disconnected before its request was read", extra={"path": request.url.path[:100]})
        return error_response(400, "client_disconnected", "the client disconnected before sending its whole body")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the service log")
