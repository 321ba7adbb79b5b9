"""POST /upscale, its HTTP side: query, admission, body forms, content negotiation and the answer.

What happens to the images is the pipeline's (service.runtime.pipeline: decode -> submit -> encode); the
body forms are read in service.api.bodies.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.requests import ClientDisconnect

from service.api.bodies import read_body, request_body
from service.api.routing import RequestRoute
from service.api.schemas import (
    ErrorResponse,
    ModelRef,
    UpscaledImage,
    UpscaleMetrics,
    UpscaleQuery,
    UpscaleResponse,
    query_of,
    query_parameters,
)
from service.errors import ApiError, unavailable
from service.http import admission
from service.http.disconnect import ReceiveWatcher
from service.observability import tracing
from service.observability.metrics import UNKNOWN_MODEL
from service.runtime import formats, pipeline
from service.runtime.cancellation import ClientLeft
from service.runtime.priority import off_loop
from service.settings import Settings
from upgrader.architectures import OUTPUT_SIZE

router = APIRouter(tags=["upscale"], route_class=RequestRoute)  # the endpoint reads its request itself

_binary = {"type": "string", "format": "binary"}
_ERRORS = {
    400: "Corrupt or truncated image, empty part, invalid base64/JSON/multipart.",
    401: "UPGRADER_API_KEYS is set and no valid key was sent.",
    404: "Unknown model or version/alias.",
    406: "A format (query or Accept) this server does not write, or one image type in Accept with several images.",
    413: "Body, image, image count or declared image dimensions (tile=true: pixels per image or per request) over the limits.",
    415: "Not a PNG/JPEG/WebP/BMP image, or an unsupported Content-Type.",
    422: "Wrong image size, animated image, unknown form/JSON field, no images, references not aligned, bad query parameter.",
    503: "Queue full, no model loaded, version refused or shutting down (with Retry-After).",
    504: "Not inferred within UPGRADER_REQUEST_TIMEOUT_S.",
}
_RESPONSES = {
    200: {"model": UpscaleResponse, "description": "JSON by default; with one image and `Accept` naming its format (image/png, "
          "image/webp, image/jpeg, image/avif), the image itself (metrics in `Server-Timing`, model in `X-Upgrader-Model: name:version`).",
          "content": {media: {"schema": _binary} for media in ("image/png", "image/webp", "image/jpeg", "image/avif")}},
    **{status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()},
}


TileParam = Annotated[bool, Query(description=UpscaleQuery.model_fields["tile"].description)]


@router.post("/upscale", summary="Upscale 8x8 images to 32x32, and photos of any size 4x", response_model=UpscaleResponse,
             responses=_RESPONSES,  # the app puts its own limits in:
             openapi_extra={"requestBody": request_body(Settings.model_construct()), "parameters": query_parameters(UpscaleQuery)})
async def upscale(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    query: UpscaleQuery = query_of(UpscaleQuery, request.query_params)
    started = time.perf_counter()
    label, status, images_served = UNKNOWN_MODEL, 500, 0
    gone = ReceiveWatcher(request.receive)  # watched once its images wait: they are dropped if the client leaves
    try:
        # Admission, before a byte of the body is read: which version serves it, whether its queue has
        # room at all, and a slot on this worker (or a place in line). A refusal costs microseconds.
        async with state.manager.lease(query.model, query.version) as served:
            label = served.name
            if not served.batcher.has_room():
                raise unavailable("queue_full", f"{served.batcher.label} queue is full", settings.retry_after_s)
            async with admission.slot(state.admission, request.scope, settings.max_images_per_request, settings.request_timeout_s):
                body = await read_body(request, settings, query.tile or served.any_size)
                output = formats.negotiate(request.headers.get("accept", ""), query.format, query.quality, len(body.images))
                done = await pipeline.upscale(served, body, ensemble=query.ensemble, tile=query.tile,
                                              deadline=started + settings.request_timeout_s, settings=settings, gone=gone, output=output,
                                              manager=state.manager, version=query.version)
        run = UpscaleMetrics(images=len(done.encoded), batch_size=done.batch_size, queue_ms=round(done.queue_s * 1000, 3),
                             tiles=done.tiles, inference_ms=round(done.inference_s * 1000, 3),
                             total_ms=round((time.perf_counter() - started) * 1000, 3), device=str(state.manager.device),
                             precision=state.manager.precision)
        version = done.version or served.version  # a photo model may hand clean photos to its clean version
        answer = (request, served.name, version, done.encoded, done.scores, run, done.sizes, output)
        small = len(done.encoded) <= pipeline.INLINE_DECODE_LIMIT
        response = make_response(*answer) if small else await off_loop(make_response, *answer)
        images_served, status = len(done.encoded), response.status_code
        if state.tracer_provider is not None:
            tracing.note_served(served.name, version, images_served)
        return response
    except ApiError as exc:
        status = exc.status
        raise
    except (ClientLeft, ClientDisconnect):
        status = 499  # the client left (or its body deadline passed) before its answer: none goes out
        raise
    finally:
        gone.close()
        state.metrics.request_done(label, status, time.perf_counter() - started, images_served)


def wants_png(request: Request, count: int) -> bool:
    return count == 1 and "image/png" in request.headers.get("accept", "")


def check_acceptable(request: Request, count: int) -> None:
    accept = request.headers.get("accept", "")
    if count > 1 and "image/png" in accept and "json" not in accept and "*/*" not in accept:
        raise ApiError(406, "not_acceptable", f"Accept: image/png answers one image; this request has {count} "
                       "(accept application/json for several)")


def make_response(request: Request, name: str, version: int, pngs: list[bytes], scores: list[tuple[float, float]] | None,
                  run: UpscaleMetrics, sizes: list[tuple[int, int]] | None = None, output: formats.Output | None = None) -> Response:
    """The answer: the one image itself when `output.raw` (default: PNG when Accept asks for image/png), else JSON."""
    if output is None:
        output = formats.Output("png", None, wants_png(request, len(pngs)))
    if output.raw:
        timing = (f"queue;dur={run.queue_ms}, inference;dur={run.inference_ms}, total;dur={run.total_ms}, "
                  f"batch;desc=\"{run.batch_size} images on {run.device}\"")
        return Response(pngs[0], media_type=output.media_type, headers={"Server-Timing": timing, "X-Upgrader-Model": f"{name}:{version}"})
    png = output.format == "png"
    images = [
        UpscaledImage(index=i, png=base64.b64encode(data).decode("ascii") if png else None,
                      data=None if png else base64.b64encode(data).decode("ascii"), media_type=None if png else output.media_type,
                      width=sizes[i][1] if sizes else OUTPUT_SIZE, height=sizes[i][0] if sizes else OUTPUT_SIZE,
                      psnr=None if scores is None else round(scores[i][0], 4), ssim=None if scores is None else round(scores[i][1], 6))
        for i, data in enumerate(pngs)
    ]
    payload = UpscaleResponse(model=ModelRef(name=name, version=version), images=images, metrics=run)
    return Response(payload.model_dump_json(exclude_none=True), media_type="application/json")
