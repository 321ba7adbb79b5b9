"""Dependencies injected into the routes (everything lives on app.state, created by create_app).

All are `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop
per dependency per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.errors import ApiError
from service.http.auth import bearer, matches
from service.observability.metrics import Metrics
from service.runtime.registry import ModelManager
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_admin(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="`Bearer <UPGRADER_ADMIN_TOKEN>`.")] = None,
) -> None:
    if settings.admin_token is None:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: UPGRADER_ADMIN_TOKEN is not set")
    if not matches(bearer(authorization), settings.admin_token.get_secret_value()):
        raise ApiError(401, "unauthorized", "a valid admin token is required (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})
