"""API keys (UPGRADER_API_KEYS): checked for every request by one ASGI middleware, and by the gRPC servicer.

Open without a key: the health checks an orchestrator polls (`/healthz`, `/readyz`, `/v2/health/*`), the
page (`/`, `/static/*`: it holds no data and asks the user for a key), CORS preflights (answered by the
CORS middleware outside this one) and, with UPGRADER_METRICS_PUBLIC, `/metrics`. Everything else, the
API documents included, needs `Authorization: Bearer <key>` or `X-API-Key: <key>`. The admin token
(PUT aliases) is a second credential, asked by those routes alone (service.api.deps.require_admin).
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError
from service.settings import Settings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_PREFIXES = ("/v2/health/", "/static/")


def bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matches(given: str | None, secret: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def check_api_key(settings: Settings, authorization: str | None, x_api_key: str | None) -> None:
    """401 unless keys are off or one of the two headers carries a valid key."""
    if not settings.api_keys:
        return
    given = [key for key in (bearer(authorization), x_api_key) if key]
    if not any(matches(key, secret.get_secret_value()) for key in given for secret in settings.api_keys):
        raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key> or X-API-Key)",
                       headers={"WWW-Authenticate": "Bearer"})


def is_open(path: str, settings: Settings) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (settings.metrics_public and path == "/metrics")


class ApiKeyMiddleware:
    """401 for a request without a valid key, before routing; added only when keys are set (create_app)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_open(scope["path"], self.settings):
            headers = Headers(scope=scope)
            try:
                check_api_key(self.settings, headers.get("authorization"), headers.get("x-api-key"))
            except ApiError as exc:
                return await exc.response(scope["path"])(scope, receive, send)
        await self.app(scope, receive, send)
