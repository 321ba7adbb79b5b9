"""The bodies POST /upscale and /bicubic accept: multipart parts, JSON base64 or one raw image -> EncodedImages.

Each form is read and checked here (counts, fields, sizes, base64), so the pipeline sees only encoded images
(service.runtime.pipeline). `request_body` is the OpenAPI description of the same forms with this server's limits.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
from fastapi import Request
from pydantic import ValidationError

from service.api import multipart
from service.api.schemas import UpscaleJSONRequest
from service.errors import ApiError, echo, validation_message
from service.runtime import codec
from service.runtime.pipeline import EncodedImages
from service.runtime.priority import off_loop
from service.settings import Settings

IMAGE_FIELD, REFERENCE_FIELD = "images", "references"
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


# ---- body forms -------------------------------------------------------------------
async def read_body(request: Request, settings: Settings, tile: bool = False) -> EncodedImages:
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
        body = EncodedImages([await read_limited(request, image_bytes, 0)], None)
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


async def read_multipart(request: Request, settings: Settings, max_part_bytes: int) -> EncodedImages:
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
    return EncodedImages(fields[IMAGE_FIELD], fields[REFERENCE_FIELD] or None)


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


def read_json(raw: bytes) -> EncodedImages:
    try:
        payload = UpscaleJSONRequest.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where, what = validation_message(error)
        if error["type"] == "json_invalid":
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {what}") from None
        if error["type"] == "extra_forbidden":
            raise ApiError(422, "unknown_field", f"unexpected JSON field {echo(where)}; send {{\"images\": [base64, ...]}}") from None
        if error["type"] == "missing" and where == IMAGE_FIELD:
            raise ApiError(422, "missing_images", "the JSON body has no \"images\" list") from None
        item = error["loc"][1] if len(error["loc"]) > 1 and isinstance(error["loc"][1], int) else None
        raise ApiError(422, "invalid_body", f"{where or 'body'}: {what}", item) from None
    decoded = {IMAGE_FIELD: [], REFERENCE_FIELD: []}
    for key, values in ((IMAGE_FIELD, payload.images), (REFERENCE_FIELD, payload.references or [])):
        for item, text in enumerate(values):
            try:
                decoded[key].append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_base64", f"{key}[{item}] is not valid base64", item) from None
    return EncodedImages(decoded[IMAGE_FIELD], decoded[REFERENCE_FIELD] if payload.references is not None else None)
