"""The application factory: create_app(settings) -> FastAPI, with its own manager, metrics and state."""

from __future__ import annotations

import re
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from service.deps import require_api_key
from service.errors import install_error_handlers
from service import codec, priority
from service.fastlane import FastLane, FastRoute
from service.limits import Admission, BodySizeLimitMiddleware
from service.logs import RequestContextMiddleware, flush_access_log
from service.metrics import Metrics
from service.registry import ModelManager
from service.routers import baseline, inference, models, ops, page, upscale
from service.schemas import VERSION_PATTERN, UpscaleQuery
from service.settings import Settings

DESCRIPTION = """Upscales 8x8 images to 32x32 with the models of the Upgrader model store.

Requests are merged into batches across clients (dynamic batching); new model versions are
picked up from the store without a restart. Every error is JSON: `{"error": {"code", "message", "item"}}`.

When the service has API keys (UPGRADER_API_KEYS), every endpoint but `/healthz`, `/readyz`, `/v2/health/*` and the page
(`/`, `/static`: it holds no data and asks for a key) needs one, this document included (`Authorization: Bearer <key>` or `X-API-Key: <key>`).

The same models also speak the Open Inference Protocol (KServe V2 REST, with the binary tensor data
extension) under `/v2`, for tritonclient, perf_analyzer and KServe; there errors are `{"error": "..."}`.
"""


class UpgraderAPI(FastAPI):
    """FastAPI, with the service's own layers around its stack (built on the first request, as Starlette does).

    (Overload is refused before all of it, by the HTTP protocol: service.server.) Every request
    passes the request id and access log and the body size limit; then
    the inference endpoints take the fast lane (service.fastlane) and everything else FastAPI's
    stack (its error handling, routing, dependencies, docs).
    """

    def build_middleware_stack(self):
        settings: Settings = self.state.settings
        app = FastLane(super().build_middleware_stack(), self, [
            FastRoute("POST", re.compile(r"/upscale"), upscale.upscale, UpscaleQuery),
            FastRoute("POST", re.compile(rf"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>{VERSION_PATTERN[1:-1]}))?/infer"),
                      inference.infer),
        ])
        app = BodySizeLimitMiddleware(app, max_body_bytes=settings.max_body_bytes)
        return RequestContextMiddleware(app)  # outermost: every response, even a 413, carries the request id


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One helper thread per worker for the CPU work taken off the event loop (parsing, decoding and
        # answering large requests: run_in_threadpool). That work holds the GIL, so more threads add
        # no speed, only rivals for the GIL: with anyio's default of 40, the event loop waited its
        # turn behind each of them after every system call, and under overload a refusal took
        # 100-300 ms to go out (bench/overload.py).
        to_thread.current_default_thread_limiter().total_tokens = 1
        priority.configure(app.state.settings.thread_nice)  # those threads run below the event loop (service.priority)
        codec.png_decoder()  # probed and logged at start-up, not on the first request
        await app.state.manager.start()
        grpc_server = None
        try:
            if app.state.settings.grpc_port:  # the OIP over gRPC, on this worker's loop, once its models are loaded
                from service.grpc import server as grpc_oip  # here: grpcio stays unimported when gRPC is off

                grpc_server = await grpc_oip.start(app.state)
            yield
        finally:
            if grpc_server is not None:
                await grpc_oip.stop(grpc_server, app.state.settings.request_timeout_s)
            await app.state.manager.close()  # requests already queued are answered first
            app.state.metrics.process_exited()
            flush_access_log()

    # The docs are routes of our own (below), so that API keys guard them like every other endpoint.
    app = UpgraderAPI(title="Upgrader", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                      docs_url=None, redoc_url=None, openapi_url=None,
                      # FastAPI's native OpenTelemetry looks up the global providers on every request (~40 us
                      # here); the service reports through Prometheus (/metrics) and configures no OTel.
                      telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.manager = ModelManager(settings, app.state.metrics)
    app.state.admission = Admission(settings.max_active_images, settings.max_waiting_requests, settings.retry_after_s)
    install_error_handlers(app)
    app.include_router(upscale.router)
    app.include_router(baseline.router)
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.mount("/static", page.static_files(), name="static")
    add_docs(app)
    app.include_router(inference.router)
    return app



def add_docs(app: FastAPI) -> None:
    """/openapi.json, /docs and /redoc, behind the API key when keys are set."""
    guarded = [Depends(require_api_key)]

    generate = app.openapi

    def openapi_with_limits() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for path in ("/upscale", "/bicubic"):  # the same bodies
                schema["paths"][path]["post"]["requestBody"] = upscale.request_body(app.state.settings)
        return app.openapi_schema

    app.openapi = openapi_with_limits

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Upgrader - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=guarded)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="Upgrader - ReDoc")
