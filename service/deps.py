"""Dependencies injected into the routers (everything lives on app.state, created by create_app).

All are `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop
per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.datastructures import State

from service.errors import ApiError
from service.metrics import Metrics
from service.registry import ModelManager
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_state(request: Request) -> State:
    """app.state whole: what the inference endpoints take, so the fast lane (service.fastlane) can hand it in as FastAPI does."""
    return request.app.state


SettingsDep = Annotated[Settings, Depends(get_settings)]
StateDep = Annotated[State, Depends(get_state)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, secret: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def check_api_key(settings: Settings, authorization: str | None, x_api_key: str | None) -> None:
    """401 unless keys are off or one of the two headers carries a valid key (also called by service.fastlane)."""
    if not settings.api_keys:
        return
    given = [key for key in (_bearer(authorization), x_api_key) if key]
    if not any(_matches(key, secret.get_secret_value()) for key in given for secret in settings.api_keys):
        raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key> or X-API-Key)",
                       headers={"WWW-Authenticate": "Bearer"})


BearerKeyHeader = Annotated[str | None, Header(alias="authorization", description="`Bearer <key>` when UPGRADER_API_KEYS is set.")]
KeyHeader = Annotated[str | None, Header(alias="x-api-key", description="Alternative to Authorization: the key itself.")]


async def require_api_key(settings: SettingsDep, authorization: BearerKeyHeader = None, x_api_key: KeyHeader = None) -> None:
    check_api_key(settings, authorization, x_api_key)


async def require_admin(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="`Bearer <UPGRADER_ADMIN_TOKEN>`.")] = None,
) -> None:
    if settings.admin_token is None:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: UPGRADER_ADMIN_TOKEN is not set")
    if not _matches(_bearer(authorization), settings.admin_token.get_secret_value()):
        raise ApiError(401, "unauthorized", "a valid admin token is required (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})


async def require_metrics_access(settings: SettingsDep, authorization: BearerKeyHeader = None, x_api_key: KeyHeader = None) -> None:
    """The API key, unless UPGRADER_METRICS_PUBLIC opens /metrics to a scraper."""
    if not settings.metrics_public:
        check_api_key(settings, authorization, x_api_key)
