"""The inference endpoints' own lane: POST /upscale and POST /v2/models/{name}[/versions/{v}]/infer.

FastAPI declares and documents these routes (OpenAPI, /docs) like every other, but serving a
request through it costs the event loop ~1 ms before the endpoint runs: five middleware layers of
its own, route matching over every route, dependency solving and parameter validation by
introspection (py-spy on `bench/bench_service.py`). For an 8x8 image that is more than
decoding, batching and answering it together, and the event loop is what a worker runs out of.

`FastLane` sits in front of FastAPI's stack and calls the same endpoint functions directly, doing
here, once, what FastAPI did for them: match the path, check the API key (`deps.check_api_key`),
validate the query into its pydantic model, inject `app.state`, and answer errors in the service's
shapes (`errors.py`). Everything else goes on to FastAPI. (Most /v2 infer requests never get here:
the HTTP protocol answers plain ones itself, service.infer_lane; the rest, e.g. with a query string
or `Expect: 100-continue`, come this way to the same `run_infer`.) Outside both sit the middlewares every
request passes: request id and access log, admission, body size (`app.create_app`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from starlette.datastructures import State
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import check_api_key
from service.errors import (
    ApiError,
    client_gone_response,
    unexpected_error_response,
    validation_error_response,
)

log = logging.getLogger("service.fastlane")

Endpoint = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class FastRoute:
    """`method` on paths matching `pattern` -> `endpoint(request, state, **path groups[, query=Query model])`."""

    method: str
    pattern: re.Pattern[str]
    endpoint: Endpoint
    query: type[BaseModel] | None = None


def query_model(model: type[BaseModel], request: Request):
    """The query string validated into `model` (as FastAPI would), or the ValidationError it raises."""
    return model.model_validate(dict(request.query_params))


class FastLane:
    def __init__(self, app: ASGIApp, owner, routes: list[FastRoute]) -> None:
        self.app, self.owner, self.routes = app, owner, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            for route in self.routes:
                if method == route.method and (match := route.pattern.fullmatch(path)):
                    return await self.serve(route, match.groupdict(), scope, receive, send)
        await self.app(scope, receive, send)

    async def serve(self, route: FastRoute, params: dict[str, str | None], scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.owner  # request.app, as inside FastAPI
        request = Request(scope, receive)
        path = scope["path"]
        state: State = self.owner.state
        try:
            check_api_key(state.settings, request.headers.get("authorization"), request.headers.get("x-api-key"))
            kwargs = {name: value for name, value in params.items() if value is not None}
            if route.query is not None:
                kwargs["query"] = query_model(route.query, request)
            response = await route.endpoint(request, state, **kwargs)
        except ApiError as exc:
            response = exc.response(path)
        except ValidationError as exc:  # the query or a path parameter (an endpoint's own are turned into ApiError there)
            response = validation_error_response(exc.errors(), path)
        except ClientDisconnect:
            response = client_gone_response(path)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 in the service's shape, with the traceback in the log
            response = unexpected_error_response(request.method, path, exc)
        await response(scope, receive, send)
