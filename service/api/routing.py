"""`RequestRoute`: the route class of the inference endpoints, which take the request and read it themselves.

FastAPI documents these routes from their declarations like every other (OpenAPI, /docs), and they pass the
whole middleware stack and the app's exception handlers like every other. At request time FastAPI's own handler
would solve the endpoint's dependencies and validate its parameters by introspection: for an 8x8 image that is
a tenth of what the whole request costs the event loop (`bench/bench_service.py`). These endpoints take only the
request and their path parameters as matched, and validate the rest themselves (`schemas.query_of`,
`path_value`), so this route class calls them directly: FastAPI's documented extension point, a custom
`APIRoute.get_route_handler`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError


class RequestRoute(APIRoute):
    """An APIRoute whose endpoint is called as `endpoint(request=request, **path_params)`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            return await endpoint(request=request, **request.path_params)

        return handle


def path_value(adapter: TypeAdapter, name: str, value: str):
    """A path parameter validated as FastAPI validates it (the same 422/400 answer when it does not fit)."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("path", name, *error["loc"])} for error in exc.errors()]) from None
