"""The application factory: create_app(settings) -> FastAPI, with its own manager, metrics and state."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.limits import BodySizeLimitMiddleware
from service.logs import RequestContextMiddleware
from service.metrics import Metrics
from service.registry import ModelManager
from service.routers import baseline, models, ops, page, upscale
from service.settings import Settings

DESCRIPTION = """Upscales 8x8 images to 32x32 with the models of the Upgrader model store.

Requests are merged into batches across clients (dynamic batching); new model versions are
picked up from the store without a restart. Every error is JSON: `{"error": {"code", "message", "item"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await app.state.manager.start()
        try:
            yield
        finally:
            await app.state.manager.close()  # requests already queued are answered first
            app.state.metrics.process_exited()

    app = FastAPI(title="Upgrader", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.manager = ModelManager(settings, app.state.metrics)
    install_error_handlers(app)
    app.include_router(upscale.router)
    app.include_router(baseline.router)
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.mount("/static", page.static_files(), name="static")
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)  # outermost: every response, even a 413, carries the request id
    return app

