"""POST /bicubic: the baseline every model is measured against, on the same inputs, in the same answer shape.

Pillow's bicubic 4x (what the trainer's reports call "bicubic"), computed on the request side: no
model, no batcher. It takes exactly /upscale's bodies, limits and `tile` flag, so a client (the
page) compares a model with bicubic by sending the same request to both.
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Request, Response
from PIL import Image

from service.runtime import codec
from service.runtime.priority import off_loop
from service.api.deps import SettingsDep
from service.api.bodies import read_body, request_body
from service.api.routes.upscale import _RESPONSES, TileParam, check_acceptable, make_response
from service.runtime.pipeline import check_pixels, decode_all, decode_reference, decode_with_references, score_each
from service.api.schemas import UpscaleMetrics, UpscaleResponse
from service.settings import Settings
from service.runtime.upscaler import Upscaler
from upgrader.architectures import INPUT_SIZE, OUTPUT_SIZE

router = APIRouter(tags=["upscale"])

NAME, VERSION = "bicubic", 0
SCALE = OUTPUT_SIZE // INPUT_SIZE


def bicubic(image: np.ndarray) -> np.ndarray:
    """uint8 3 x H x W -> uint8 3 x 4H x 4W by Pillow's bicubic resampling."""
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    resized = pil.resize((pil.width * SCALE, pil.height * SCALE), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1))


@router.post("/bicubic", summary="Pillow bicubic 4x of the same inputs (the baseline)", response_model=UpscaleResponse,
             responses=_RESPONSES, # the app puts its own limits in:
             openapi_extra={"requestBody": request_body(Settings.model_construct())})
async def upscale_bicubic(request: Request, settings: SettingsDep, tile: TileParam = False) -> Response:
    started = time.perf_counter()
    body = await read_body(request, settings, tile)
    check_acceptable(request, len(body.images))
    if tile:
        check_pixels(body.images, settings.max_image_pixels, settings.max_request_pixels)
        images, references, _ = await decode_with_references(body, settings, settings.max_image_pixels)
    else:
        images = list(await decode_all(Upscaler.decode, body.images, settings))
        references = await decode_all(decode_reference, body.references, settings) if body.references else None
    began = time.perf_counter()
    outputs, pngs = await off_loop(resize_and_encode, images, settings.png_compression)
    inference_s = time.perf_counter() - began
    scores = await off_loop(score_each, outputs if tile else np.stack(outputs), references) if references is not None else None
    run = UpscaleMetrics(images=len(pngs), batch_size=len(pngs), queue_ms=0.0, inference_ms=round(inference_s * 1000, 3),
                         total_ms=round((time.perf_counter() - started) * 1000, 3), device="cpu",
                         precision="float32")
    return make_response(request, NAME, VERSION, pngs, scores, run, [o.shape[-2:] for o in outputs])


def resize_and_encode(images: list[np.ndarray], level: int) -> tuple[list[np.ndarray], list[bytes]]:
    outputs = [bicubic(image) for image in images]
    return outputs, [codec.encode_png(o, level) for o in outputs]
