"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import ManagerDep, MetricsDep, SettingsDep
from service.errors import unavailable
from service.api.schemas import ErrorResponse, Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="The process is alive", response_model=Health, response_model_exclude_none=True)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", summary="The default model is loaded and requests can be served", response_model=Health, response_model_exclude_none=True,
            responses={503: {"model": ErrorResponse, "description": "No default model loaded yet (or none in the store)."}})
async def readyz(manager: ManagerDep, settings: SettingsDep) -> Health:
    if not manager.is_ready():
        if not manager.store_reachable:
            reason = "the model store cannot be read"
        elif manager.default_model is None:
            reason = "the model store holds no models yet"
        else:
            reason = f"default model {manager.default_model!r} is not loaded"
        raise unavailable("not_ready", reason, settings.retry_after_s)
    return Health(status="ready", default_model=manager.default_model,
                  loaded={name: sorted(state.loaded) for name, state in manager.models.items()})


@router.get("/metrics", summary="Prometheus metrics (API key when keys are set, unless UPGRADER_METRICS_PUBLIC)", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                       401: {"model": ErrorResponse, "description": "UPGRADER_API_KEYS is set and no valid key was sent."}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
