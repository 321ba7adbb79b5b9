"""POST /upscale: images in (multipart, JSON base64 or one raw image), 32x32 PNGs out; with tile=true, any size, 4x out."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from service.runtime import codec, formats, tiling, wholeimage
from service.api import multipart
from service.runtime.priority import off_loop
from service.errors import ApiError, echo, unavailable
from service.api.routing import RequestRoute
from service.http.admission import Admission
from service.http.disconnect import ClientGone
from service.observability import tracing
from service.observability.metrics import UNKNOWN_MODEL, Metrics
from service.runtime.registry import ModelManager, Served
from service.api.schemas import (
    ErrorResponse,
    ModelRef,
    UpscaledImage,
    UpscaleJSONRequest,
    UpscaleMetrics,
    UpscaleQuery,
    UpscaleResponse,
    query_of,
    query_parameters,
)
from service.settings import Settings
from service.runtime.upscaler import Upscaler
from upgrader.architectures import OUTPUT_SIZE, fully_convolutional
from upgrader.imaging import psnr_per_image, ssim_per_image, to_float

router = APIRouter(tags=["upscale"], route_class=RequestRoute)  # the endpoint reads its request itself

IMAGE_FIELD, REFERENCE_FIELD = "images", "references"
INLINE_DECODE_LIMIT = 4  # decoding costs ~0.1 ms an image (encoding the answer ~15 us): beyond a few, off the event loop
INLINE_JSON_LIMIT = 64 * 1024  # bytes of JSON parsed on the event loop; larger bodies are parsed in a thread
INLINE_BODY_LIMIT = 4 * 1024  # bytes of multipart parsed on the event loop (a few 8x8 images); larger bodies in a thread
JSON_KEYS = ("images", "references")

_binary = {"type": "string", "format": "binary"}
_IMAGE_TYPES = "image/png, image/jpeg, image/webp, image/bmp"
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def request_body(settings: Settings) -> dict:
    """The OpenAPI request body of POST /upscale with this server's limits: what it accepts, as far as a schema can say.

    Counts, sizes, base64, required and unknown fields are in the schema; what no JSON schema can say
    (that the bytes decode to an 8x8 image, that references align with images) is in the descriptions
    and answered 400/413/415/422 (see the responses).
    """
    count = {"minItems": 1, "maxItems": settings.max_images_per_request}
    binary = {**_binary, "minLength": 1, "maxLength": settings.max_image_bytes, "contentMediaType": "image/*"}
    base64_image = {"type": "string", "format": "byte", "contentEncoding": "base64", "pattern": _BASE64, "minLength": 4,
                    "maxLength": 4 * -(-settings.max_image_bytes // 3)}
    example = base64.b64encode(codec.encode_png(np.zeros((3, 8, 8), np.uint8))).decode("ascii")
    return {
        "required": True,
        "description": "One of three forms. Each image is an 8x8 PNG, JPEG, WebP or BMP (L, LA, P, RGBA, 16-bit converted to RGB) "
                       f"of at most {settings.max_image_bytes} bytes; optional references are 32x32, one per image, in the same order. "
                       "With tile=true images may have any size (up to UPGRADER_MAX_IMAGE_PIXELS each, bounded in bytes by the body "
                       "limit) and references are 4x each image's width and height.",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": [IMAGE_FIELD], "additionalProperties": False, "properties": {
                    IMAGE_FIELD: {"type": "array", "items": binary, **count, "description": "One or more file parts named `images`."},
                    # No minItems: in multipart zero `references` parts is the same body as none at all.
                    REFERENCE_FIELD: {"type": "array", "items": binary, "maxItems": settings.max_images_per_request,
                                      "description": "Optional file parts named `references`, one per image."}}},
                "encoding": {IMAGE_FIELD: {"contentType": _IMAGE_TYPES}, REFERENCE_FIELD: {"contentType": _IMAGE_TYPES}},
            },
            "application/json": {
                "schema": {"type": "object", "required": [IMAGE_FIELD], "additionalProperties": False, "properties": {
                    IMAGE_FIELD: {"type": "array", "items": base64_image, **count, "description": "Base64-encoded 8x8 images."},
                    REFERENCE_FIELD: {"anyOf": [{"type": "array", "items": base64_image, **count}, {"type": "null"}],
                                      "description": "Optional base64 32x32 references, one per image; adds psnr/ssim per output."}}},
                "example": {IMAGE_FIELD: [example]},
            },
            **{media: {"schema": binary} for media in ("image/png", "image/jpeg", "image/webp", "image/bmp")},
        },
    }


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


@dataclass
class UpscaleBody:
    images: list[bytes]
    references: list[bytes] | None


@router.post("/upscale", summary="Upscale 8x8 images to 32x32 (any size with tile=true)", response_model=UpscaleResponse, responses=_RESPONSES,
             # the app puts its own limits in:
             openapi_extra={"requestBody": request_body(Settings.model_construct()), "parameters": query_parameters(UpscaleQuery)})
async def upscale(request: Request) -> Response:
    state = request.app.state
    query: UpscaleQuery = query_of(UpscaleQuery, request.query_params)
    manager: ModelManager = state.manager
    metrics: Metrics = state.metrics
    settings: Settings = state.settings
    admission: Admission = state.admission
    model, version, ensemble, tile = query.model, query.version, query.ensemble, query.tile
    started = time.perf_counter()
    label, status, images_served = UNKNOWN_MODEL, 500, 0
    gone = ClientGone.after_body(request.receive)  # watched once its images wait: they are dropped if the client leaves
    try:
        # Admission, before a byte of the body is read: which version serves it, whether its queue has
        # room at all, and a slot on this worker (or a place in line). A refusal costs microseconds.
        async with manager.lease(model, version) as served:
            label = served.name
            if not served.batcher.has_room():
                raise unavailable("queue_full", f"{served.batcher.label} queue is full", settings.retry_after_s)
            async with admission.slot(request.scope, request.headers.get("content-length"), settings.max_images_per_request,
                                      wait_s=settings.request_timeout_s):
                # A model that takes any size upscales whole images, tile=true or not (service.runtime.wholeimage).
                whole = served.any_size
                body = await read_body(request, settings, tile or whole)
                output = formats.negotiate(request.headers.get("accept", ""), query.format, query.quality, len(body.images))
                if tile or whole:
                    if whole:
                        check_pixels(body.images, settings, settings.max_whole_image_pixels, settings.max_whole_image_pixels)
                    else:
                        check_pixels(body.images, settings, settings.max_image_pixels)
                upscale_images = upscale_whole if whole else upscale_tiled if tile else upscale_small
                done = await upscale_images(served, body, ensemble, started + settings.request_timeout_s, settings, gone, output)
                scores = await off_loop(score_each, done.outputs, done.references) if done.references is not None else None
        total_ms = (time.perf_counter() - started) * 1000
        run = UpscaleMetrics(images=len(done.pngs), batch_size=done.batch_size, queue_ms=round(done.queue_s * 1000, 3), tiles=done.tiles,
                             inference_ms=round(done.inference_s * 1000, 3), total_ms=round(total_ms, 3), device=str(manager.device),
                             precision=manager.precision)
        answer = (request, served.name, served.version, done.pngs, scores, run, [o.shape[-2:] for o in done.outputs], output)
        response = make_response(*answer) if len(done.pngs) <= INLINE_DECODE_LIMIT else await off_loop(make_response, *answer)
        images_served = len(done.pngs)
        status = response.status_code
        if state.tracer_provider is not None:
            tracing.note_served(served.name, served.version, images_served)
        return response
    except ApiError as exc:
        status = exc.status
        raise
    except ClientDisconnect:
        status = 499  # the client left (or its body deadline passed) before sending its body: no answer goes out
        raise
    finally:
        gone.close()
        metrics.request_done(label, status, time.perf_counter() - started, images_served)


@dataclass
class Upscaled:
    outputs: np.ndarray | list[np.ndarray]  # uint8 N x 3 x 32 x 32, or 3 x 4H x 4W per tiled image
    pngs: list[bytes]  # each output encoded in the answer's format (PNG unless asked otherwise: service.runtime.formats)
    references: np.ndarray | list[np.ndarray] | None
    batch_size: int
    queue_s: float
    inference_s: float
    tiles: int | None = None


PNG = formats.Output("png", None, False)


async def encode_all(images, metas: list[codec.PhotoMeta] | None, output: formats.Output, settings: Settings) -> list[bytes]:
    """Each output in the answer's format (off the event loop: a large photo's encoding takes a while)."""
    return await off_loop(lambda: [formats.encode(image, output, metas[i] if metas else None, settings.png_compression)
                                   for i, image in enumerate(images)])


async def upscale_small(served: Served, body: UpscaleBody, ensemble: int, deadline: float, settings: Settings,
                        gone: ClientGone | None, output: formats.Output = PNG) -> Upscaled:
    """8x8 images: one job on the batcher (dropped if the client leaves while it waits: `gone`)."""
    inputs = await decode_all(Upscaler.decode, body.images, settings)
    references = await decode_all(decode_reference, body.references, settings) if body.references else None
    png = output.format == "png"  # the worker thread encodes PNGs as it goes; other formats are encoded here
    result = await served.batcher.submit(inputs, ensemble, deadline - time.perf_counter(), png=png, gone=gone)
    encoded = result.pngs if png else await encode_all(result.images, None, output, settings)
    return Upscaled(result.images, encoded, references, result.batch_size, result.queue_s, result.inference_s)


async def upscale_tiled(served: Served, body: UpscaleBody, ensemble: int, deadline: float, settings: Settings,
                        gone: ClientGone | None, output: formats.Output = PNG) -> Upscaled:
    """Images of any size: tiles through the batcher, stitched (service.runtime.tiling)."""
    images, references, metas = await decode_tiled(body, settings)
    overlapping = fully_convolutional(served.manifest.get("architecture", {}).get("name", ""))
    tiled = await tiling.upscale_tiles(served.batcher, images, overlapping, ensemble, deadline - time.perf_counter(), settings.max_batch_images, gone)
    encoded = await encode_all(tiled.images, metas, output, settings)
    return Upscaled(tiled.images, encoded, references, tiled.batch_size, tiled.queue_s, tiled.inference_s, tiled.tiles)


async def upscale_whole(served: Served, body: UpscaleBody, ensemble: int, deadline: float, settings: Settings,
                        gone: ClientGone | None, output: formats.Output = PNG) -> Upscaled:
    """Images of any size through a model that takes any size: whole, or in windows within the pixel budget (service.runtime.wholeimage)."""
    images, references, metas = await decode_tiled(body, settings, settings.max_whole_image_pixels)
    done = await wholeimage.upscale_whole(served.batcher, images, ensemble, deadline - time.perf_counter(), settings.max_forward_pixels,
                                          served.halo, gone)
    encoded = await encode_all(done.images, metas, output, settings)
    return Upscaled(done.images, encoded, references, done.batch_size, done.queue_s, done.inference_s, done.tiles)


# ---- body forms -------------------------------------------------------------------
async def read_body(request: Request, settings: Settings, tile: bool = False) -> UpscaleBody:
    """Whatever the form, -> encoded images and references; refuses unknown fields and bad counts.

    Tiled images are bounded by their pixels and the body limit, not by the 8x8 images' byte limit."""
    image_bytes = settings.max_body_bytes if tile else settings.max_image_bytes
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        body = await read_multipart(request, settings, image_bytes)
    elif media_type == "application/json" or media_type.endswith("+json"):
        raw = await read_json_bytes(request, settings)
        body = read_json(raw) if len(raw) <= INLINE_JSON_LIMIT else await off_loop(read_json, raw)
    elif media_type.startswith("image/"):
        body = UpscaleBody([await read_limited(request, image_bytes, 0)], None)
    else:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {media_type or '(none)'!r} is not accepted; send "
                       "multipart/form-data (parts named images), application/json ({\"images\": [base64, ...]}) or one image/png body")
    limit = settings.max_images_per_request
    if not body.images:
        raise ApiError(422, "missing_images", f"no images in the request: send one or more {IMAGE_FIELD!r}")
    if len(body.images) > limit:
        raise ApiError(413, "too_many_images", f"{len(body.images)} images in one request; the limit is {limit}", limit)
    if body.references is not None and len(body.references) != len(body.images):
        raise ApiError(422, "references_mismatch", f"{len(body.references)} references for {len(body.images)} images; send one per image")
    return body


async def read_multipart(request: Request, settings: Settings, max_part_bytes: int) -> UpscaleBody:
    """The parts named images (and references), each a file part; a large body is parsed off the event loop."""
    content_type = request.headers.get("content-type", "")
    multipart.boundary(content_type)  # 400 before reading a body that cannot be parsed
    body = await request.body()
    parts_limit = 2 * settings.max_images_per_request

    def parse() -> list[multipart.Part]:
        try:
            return multipart.parse(body, content_type, parts_limit, max_part_bytes)
        except multipart.TooManyParts:
            raise ApiError(413, "too_many_images", f"more than {parts_limit} parts; the limit is {settings.max_images_per_request} images "
                           "and as many references", settings.max_images_per_request) from None

    parts = parse() if len(body) <= INLINE_BODY_LIMIT else await off_loop(parse)
    fields: dict[str, list[bytes]] = {IMAGE_FIELD: [], REFERENCE_FIELD: []}
    for part in parts:
        if part.name not in fields:
            raise ApiError(422, "unknown_field", f"unexpected form field {echo(part.name)}; send parts named {IMAGE_FIELD!r} "
                           f"(and optionally {REFERENCE_FIELD!r})")
        if part.filename is None:
            raise ApiError(422, "not_a_file", f"{part.name} part {len(fields[part.name])} is a text field; send it as a file part "
                           "(with a filename)", len(fields[part.name]))
        fields[part.name].append(bytes(part.data))
    return UpscaleBody(fields[IMAGE_FIELD], fields[REFERENCE_FIELD] or None)


async def read_limited(request: Request, limit: int, item: int) -> bytes:
    """One raw image body, refused (413) as soon as it exceeds `limit`: from Content-Length, or while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "image_too_large", f"image {item} is larger than {limit} bytes", item)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "image_too_large", f"image {item} is larger than {limit} bytes", item)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_bytes(request: Request, settings: Settings) -> bytes:
    """The JSON body, refused (413) while it streams in once it holds more strings than a request may carry.

    A JSON string costs two quote characters, so the quotes seen so far bound the number of images
    (base64 never contains a quote). Counting a chunk is ~1 us per KB: 10 million empty strings are
    refused after their first kilobytes instead of after parsing 30 MB into 10 million objects.
    """
    strings = 2 * settings.max_images_per_request + len(JSON_KEYS)  # images, as many references, and the keys
    chunks, quotes = [], 0
    async for chunk in request.stream():
        quotes += chunk.count(b'"')
        if quotes > 2 * strings:
            raise ApiError(413, "too_many_images", f"the JSON body holds more than {strings} strings; the limit is "
                           f"{settings.max_images_per_request} images and as many references", settings.max_images_per_request)
        chunks.append(chunk)
    return b"".join(chunks)


def read_json(raw: bytes) -> UpscaleBody:
    try:
        payload = UpscaleJSONRequest.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "json_invalid":
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error['msg']}") from None
        if error["type"] == "extra_forbidden":
            raise ApiError(422, "unknown_field", f"unexpected JSON field {echo(where)}; send {{\"images\": [base64, ...]}}") from None
        if error["type"] == "missing" and where == IMAGE_FIELD:
            raise ApiError(422, "missing_images", "the JSON body has no \"images\" list") from None
        item = error["loc"][1] if len(error["loc"]) > 1 and isinstance(error["loc"][1], int) else None
        raise ApiError(422, "invalid_body", f"{where or 'body'}: {error['msg']}", item) from None
    decoded = {IMAGE_FIELD: [], REFERENCE_FIELD: []}
    for key, values in ((IMAGE_FIELD, payload.images), (REFERENCE_FIELD, payload.references or [])):
        for item, text in enumerate(values):
            try:
                decoded[key].append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_base64", f"{key}[{item}] is not valid base64", item) from None
    return UpscaleBody(decoded[IMAGE_FIELD], decoded[REFERENCE_FIELD] if payload.references is not None else None)


# ---- decoding, scoring, answering -------------------------------------------------
def decode_reference(data: bytes, item: int, max_bytes: int | None = None):
    return codec.decode_image(data, OUTPUT_SIZE, item, "reference", max_bytes)


async def decode_all(decode, blobs: list[bytes], settings: Settings) -> np.ndarray:
    def run() -> np.ndarray:
        return codec.stack_images([decode(data, item, settings.max_image_bytes) for item, data in enumerate(blobs)])

    return run() if len(blobs) <= INLINE_DECODE_LIMIT else await off_loop(run)


def score(outputs: np.ndarray, references: np.ndarray) -> list[tuple[float, float]]:
    """PSNR and SSIM of each output (as the client receives it, quantised) against its reference."""
    a, b = to_float(torch.from_numpy(outputs)), to_float(torch.from_numpy(references))
    return list(zip(psnr_per_image(a, b).tolist(), ssim_per_image(a, b).tolist(), strict=True))


def score_each(outputs: np.ndarray | list[np.ndarray], references: np.ndarray | list[np.ndarray]) -> list[tuple[float, float]]:
    """`score` for a batch of equal sizes, or image by image for tiled images of different sizes."""
    if isinstance(outputs, np.ndarray):
        return score(outputs, references)
    return [score(o[None], r[None])[0] for o, r in zip(outputs, references, strict=True)]


# ---- images of any size (tile=true) -----------------------------------------------
def check_pixels(blobs: list[bytes], settings: Settings, max_image_pixels: int, max_request_pixels: int | None = None) -> list[tuple[int, int]]:
    """Declared (width, height) of every image from its header, refused over the pixel limits before any is decoded."""
    sizes = []
    for item, data in enumerate(blobs):
        width, height = codec.declared_size(data, item)
        if width * height > max_image_pixels:
            raise ApiError(413, "dimensions_too_large", f"image {item} declares {width}x{height} = {width * height} pixels; "
                           f"the limit is {max_image_pixels} per image", item)
        sizes.append((width, height))
    total, limit = sum(w * h for w, h in sizes), max_request_pixels or settings.max_request_pixels
    if total > limit:
        raise ApiError(413, "too_many_pixels", f"the images of this request have {total} pixels together; the limit is "
                       f"{limit} per request")
    return sizes


async def decode_tiled(body: UpscaleBody, settings: Settings, max_pixels: int | None = None
                       ) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[codec.PhotoMeta]]:
    """Photos of any size (up to `max_pixels`, default max_image_pixels) -> uint8 3 x H x W each (EXIF orientation applied,
    sRGB), with what their answers need (alpha, greyness: codec.decode_photo); references must be 4x their image's width
    and height."""
    def run():
        limit = max_pixels or settings.max_image_pixels
        photos = [codec.decode_photo(data, item, "image", limit) for item, data in enumerate(body.images)]
        images = [image for image, _ in photos]
        references = None
        if body.references is not None:
            references = [codec.decode_photo(data, item, "reference", size=(image.shape[1] * tiling.SCALE, image.shape[0] * tiling.SCALE))[0]
                          for item, (data, image) in enumerate(zip(body.references, images, strict=True))]
            references = [np.ascontiguousarray(r.transpose(2, 0, 1)) for r in references]
        return [np.ascontiguousarray(i.transpose(2, 0, 1)) for i in images], references, [meta for _, meta in photos]

    return await off_loop(run)


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
