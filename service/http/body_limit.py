"""The request body limit (`max_body_bytes`): refused from Content-Length, or while the body streams in."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_response


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                exc = body_too_large(self.limit)
                return await error_response(exc.status, exc.code, exc.message, path=scope.get("path", ""))(scope, receive, send)
            return await self.app(scope, receive, send)  # the server reads exactly Content-Length bytes: within the limit
        received = 0  # a chunked body: counted as it streams in

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise body_too_large(self.limit)  # raised inside the route: answered by the ApiError handler
            return message

        await self.app(scope, counting_receive, send)


