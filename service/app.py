"""The application factory: create_app(settings) -> FastAPI, with its own manager, metrics and state."""

from __future__ import annotations

from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.middleware.cors import CORSMiddleware

from service.errors import install_error_handlers
from service.api.routes import baseline, inference, models, ops, page, upscale
from service.http.admission import AdmissionMiddleware
from service.runtime.admission import Admission
from service.http.auth import ApiKeyMiddleware
from service.http.body_limit import BodySizeLimitMiddleware
from service.observability import tracing
from service.observability.logs import RequestContextMiddleware, flush_access_log
from service.observability.metrics import Metrics
from service.runtime import codec, priority
from service.runtime.registry import ModelManager
from service.settings import Settings

DESCRIPTION = """Upscales images with the models of the Upgrader model store: 8x8 to 32x32, and photos of any size 4x.

Requests are merged into batches across clients (dynamic batching); new model versions are
picked up from the store without a restart. Every error is JSON: `{"error": {"code", "message", "item"}}`.

When the service has API keys (UPGRADER_API_KEYS), every endpoint but `/healthz`, `/readyz`, `/v2/health/*` and the page
(`/`, `/static`: it holds no data and asks for a key) needs one, this document included (`Authorization: Bearer <key>` or `X-API-Key: <key>`).

The same models also speak the Open Inference Protocol (KServe V2 REST, with the binary tensor data
extension) under `/v2`, for tritonclient, perf_analyzer and KServe; there errors are `{"error": "..."}`.
"""

# Headers a browser app on another origin may read from an answer (with UPGRADER_CORS_ORIGINS).
CORS_EXPOSED = ["x-request-id", "retry-after", "server-timing", "x-upgrader-model", "inference-header-content-length"]


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """The ASGI layers every request passes, outermost first (Starlette adds FastAPI's error handling around them):
    request id and access log, CORS, tracing (a server span), API keys, admission (503 from the headers), body limit."""
    layers = [(RequestContextMiddleware, {})]
    if settings.cors_origins:
        layers.append((CORSMiddleware, {"allow_origins": list(settings.cors_origins), "allow_methods": ["GET", "POST", "PUT"],
                                        "allow_headers": ["*"], "expose_headers": CORS_EXPOSED, "max_age": 600}))
    if app.state.tracer_provider is not None:
        layers.append((tracing.server_spans(), {"tracer_provider": app.state.tracer_provider, "exclude_spans": ["receive", "send"]}))
    if settings.api_keys:
        layers.append((ApiKeyMiddleware, {"settings": settings}))
    layers.append((AdmissionMiddleware, {"admission": app.state.admission, "metrics": app.state.metrics,
                                         "max_images_per_request": settings.max_images_per_request}))
    layers.append((BodySizeLimitMiddleware, {"max_body_bytes": settings.max_body_bytes}))
    for layer, options in reversed(layers):  # add_middleware wraps: the last added is the outermost
        app.add_middleware(layer, **options)


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
        priority.configure(app.state.settings.thread_nice)  # those threads run below the event loop (service.runtime.priority)
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
            tracing.shutdown(app.state.tracer_provider)  # the spans still batched are exported

    # The docs are routes of our own (below), so that API keys guard them like every other endpoint.
    app = FastAPI(title="Upgrader", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  # FastAPI's own OpenTelemetry looks up the global providers on every request (~40 us here);
                  # the service's tracing is configured from the OTEL_* variables (service.observability.tracing).
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.tracer_provider = tracing.provider_from_environment()  # None unless the OTEL_* variables ask for traces
    app.state.manager = ModelManager(settings, app.state.metrics, tracing.tracer(app.state.tracer_provider))
    app.state.admission = Admission(settings.max_active_images, settings.max_waiting_requests, settings.retry_after_s)
    install_error_handlers(app)
    add_middleware(app, settings)
    # The inference routes first: a request is matched against the routes in order, and these carry the load.
    app.include_router(inference.infer_router)
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
    """/openapi.json, /docs and /redoc (behind the API key when keys are set, as every route)."""
    generate = app.openapi

    def openapi_with_limits() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for path in ("/upscale", "/bicubic"):  # the same bodies
                schema["paths"][path]["post"]["requestBody"] = upscale.request_body(app.state.settings)
        return app.openapi_schema

    app.openapi = openapi_with_limits

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Upgrader - docs")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="Upgrader - ReDoc")
