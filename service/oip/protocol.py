"""The Open Inference Protocol's core: what every model declares, and one inference from request to result.

Every model of the store is a V2 model:

* 8x8 models: input `input` UINT8 [-1, 3, 8, 8] (NCHW pixels), output `output` UINT8 [-1, 3, 32, 32];
* models that take any size (photo models): input `input` UINT8 [-1, 3, -1, -1], output `output`
  UINT8 [-1, 3, -1, -1] (4x the height and width), each image whole (service.runtime.wholeimage);
* for clients that hold image files, either kind also takes `image` BYTES [-1] (encoded PNG, JPEG, WebP
  or BMP, decoded as `/upscale` decodes them) instead of `input`, and answers `png` BYTES [-1] (the outputs
  as PNG files) when it is named. They are left out of the metadata and the model config on purpose:
  perf_analyzer (and other generic clients) feed every input the metadata lists and ask for every output,
  and a request must carry exactly one of the two inputs.

Versions are numbers or aliases (`latest`, `stable`, ...) resolved by the ModelManager as for /upscale.
Errors are ApiErrors (TensorError for a malformed tensor); each transport says them in its own form.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ApiError, unavailable
from service.observability import tracing
from service.observability.metrics import UNKNOWN_MODEL, Metrics
from service.oip.tensors import DATATYPES, TensorError, bytes_from_binary, bytes_from_json, numeric_from_binary, numeric_from_json
from service.runtime import pipeline
from service.runtime.cancellation import ClientGone, ClientLeft
from service.runtime.registry import ModelManager, ModelState, Served
from service.runtime.upscaler import any_size_model
from service.settings import Settings
from upgrader.architectures import INPUT_SHAPE, OUTPUT_SHAPE

SERVER_NAME, SERVER_VERSION = "upgrader", "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
PLATFORM = "upgrader_pytorch"
PIXELS_IN, IMAGES_IN, PIXELS_OUT, PNG_OUT = "input", "image", "output", "png"
CHANNELS = 3


@dataclass(frozen=True)
class Signature:
    """A model's tensors as the metadata and the config declare them (without the batch dimension)."""

    input_dims: tuple[int, ...]
    output_dims: tuple[int, ...]

    def metadata(self) -> tuple[list[dict], list[dict]]:
        return ([{"name": PIXELS_IN, "datatype": "UINT8", "shape": [-1, *self.input_dims]}],
                [{"name": PIXELS_OUT, "datatype": "UINT8", "shape": [-1, *self.output_dims]}])


SMALL = Signature(tuple(INPUT_SHAPE), tuple(OUTPUT_SHAPE))
ANY_SIZE = Signature((CHANNELS, -1, -1), (CHANNELS, -1, -1))


def signature(state: ModelState, number: int | None) -> Signature:
    """The tensors of one version (the serving one when `number` is None): any size for photo models."""
    number = state.serving if number is None else number
    manifest = state.manifests.get(number) if number is not None else None
    return ANY_SIZE if manifest is not None and any_size_model(manifest) else SMALL


# ---- metadata, configuration, readiness ---------------------------------------------------
async def model_metadata(manager: ModelManager, name: str, version: str | None) -> dict:
    state = await manager.model_state(name)
    number = await manager.version_number(state, version) if version is not None else None
    inputs, outputs = signature(state, number).metadata()
    versions = [number] if number is not None else state.versions
    return {"name": name, "versions": [str(v) for v in versions], "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


async def model_config(manager: ModelManager, settings: Settings, name: str, version: str | None) -> dict:
    """Triton's model configuration (the model_configuration extension), which perf_analyzer reads."""
    state = await manager.model_state(name)
    number = await manager.version_number(state, version) if version is not None else None
    tensors = signature(state, number)
    return {
        "name": state.name, "platform": PLATFORM, "max_batch_size": settings.max_images_per_request,
        "input": [{"name": PIXELS_IN, "data_type": "TYPE_UINT8", "dims": list(tensors.input_dims)}],
        "output": [{"name": PIXELS_OUT, "data_type": "TYPE_UINT8", "dims": list(tensors.output_dims)}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
                             "preferred_batch_size": [settings.max_batch_images]},
        "version_policy": {"specific": {"versions": state.versions}},
    }


async def model_ready(manager: ModelManager, name: str, version: str) -> tuple[bool, str]:
    """(ready, why not): a version is ready once loaded and not refused; unknown names raise 404."""
    state = await manager.model_state(name)
    number = await manager.version_number(state, version)
    if number in state.failed:
        return False, f"model {name!r} version {number} cannot be served: {state.failed[number]}"
    if number not in state.loaded:
        return False, f"model {name!r} version {number} is not loaded (the first inference request naming it loads it)"
    return True, ""


# ---- inference ----------------------------------------------------------------------------
@dataclass
class Tensor:
    """One input as a transport delivered it: `raw` bytes in the tensor's binary form, or `data` values (JSON's, or
    gRPC's typed contents; BYTES elements as base64 strings or as bytes)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    raw: bytes | memoryview | None = None


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: dict[str, bool] = field(default_factory=dict)  # output -> as binary data (REST); empty: the default output
    id: str | None = None


@dataclass(frozen=True)
class Inferred:
    name: str
    version: int
    pixels: np.ndarray | None  # uint8 N x 3 x 4H x 4W, when the `output` tensor is wanted
    pngs: list[bytes]  # empty unless `png` is wanted


def wanted_outputs(outputs: list[tuple[str, Any]] | None, default_binary: bool) -> dict[str, bool]:
    """(name, binary_data or None) of each output asked for -> name: as binary. None: the default output."""
    if outputs is None:
        return {PIXELS_OUT: default_binary}
    wanted = {}
    for name, binary in outputs:
        if name not in (PIXELS_OUT, PNG_OUT):
            raise TensorError(f"unknown output {name!r}; this model's outputs are {PIXELS_OUT!r} and {PNG_OUT!r}")
        binary = default_binary if binary is None else binary
        if not isinstance(binary, bool):
            raise TensorError(f"output {name!r}: binary_data must be true or false")
        wanted[name] = binary
    return wanted


class Tally:
    """Counts one inference request in the service metrics when its block ends: model, status (from the exception) and images."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.label, self.status, self.images = metrics, UNKNOWN_MODEL, 500, 0
        self.started = time.perf_counter()

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.status = 200
        elif isinstance(exc, ApiError):
            self.status = exc.status
        elif isinstance(exc, (ClientLeft, asyncio.CancelledError)):
            self.status = 499
        self.metrics.request_done(self.label, self.status, time.perf_counter() - self.started, self.images if exc is None else 0)


async def infer(state, name: str, version: str, read_request: Callable[[], Awaitable[InferRequest]], *,
                admit: Callable[[], contextlib.AbstractAsyncContextManager], gone: ClientGone | None = None,
                deadline_s: float | None = None, tally: Tally | None = None) -> tuple[InferRequest, Inferred]:
    """One inference: lease the version, take the request's admission slot (`admit()`), read the request, decode its
    images and run them through the version's batcher. A version unknown, or a queue full, is refused before the
    request is read; the request's time (`request_timeout_s`, or the client's own `deadline_s` if sooner) counts
    from `tally.started`."""
    settings: Settings = state.settings
    manager: ModelManager = state.manager
    tally = tally or Tally(state.metrics)
    budget = settings.request_timeout_s if deadline_s is None else min(settings.request_timeout_s, deadline_s)
    async with manager.lease(name, version) as served:
        tally.label = served.name
        if not served.batcher.has_room():
            raise unavailable("queue_full", f"{served.batcher.label} queue is full", settings.retry_after_s)
        async with admit():
            request = await read_request()
            wanted = request.outputs or {PIXELS_OUT: False}
            images = await read_images(request, served, settings)
            if PIXELS_OUT in wanted and isinstance(images, list) and len({image.shape for image in images}) > 1:
                raise TensorError(f"input {IMAGES_IN!r}: the images have different sizes, so their outputs do not fit one "
                                  f"{PIXELS_OUT!r} tensor; ask for output {PNG_OUT!r} only")
            outputs, pngs = await pipeline.upscale_pixels(served, images, deadline=tally.started + budget, settings=settings,
                                                          gone=gone, png=PNG_OUT in wanted)
    tally.images = len(outputs)
    if state.tracer_provider is not None:
        tracing.note_served(served.name, served.version, len(outputs))
    pixels = np.stack(outputs) if PIXELS_OUT in wanted and not isinstance(outputs, np.ndarray) else outputs
    return request, Inferred(served.name, served.version, pixels if PIXELS_OUT in wanted else None, pngs)


async def read_images(request: InferRequest, served: Served, settings: Settings) -> np.ndarray | list[np.ndarray]:
    """The request's one input -> uint8 N x 3 x H x W (8x8 models: H = W = 8), or for encoded images of any size a list
    of 3 x H x W. Pixels are taken as they are; encoded images are decoded as /upscale decodes them."""
    if len(request.inputs) != 1:
        raise TensorError(f"{len(request.inputs)} inputs; send exactly one: {PIXELS_IN!r} (UINT8 [N, 3, H, W]) or "
                          f"{IMAGES_IN!r} (BYTES [N])")
    tensor = request.inputs[0]
    if tensor.raw is None and tensor.data is None:
        raise TensorError(f"input {tensor.name!r} has neither data nor a binary_data_size parameter")
    if tensor.datatype not in DATATYPES:
        raise TensorError(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    limit = settings.max_images_per_request
    if tensor.name == PIXELS_IN:
        if tensor.datatype != "UINT8":
            raise TensorError(f"input {PIXELS_IN!r} is UINT8, not {tensor.datatype}")
        check_pixel_shape(tensor.shape, served.any_size, settings)
        check_count(tensor.shape[0], limit)
        return (numeric_from_binary(tensor.raw, "UINT8", tensor.shape, tensor.name) if tensor.raw is not None
                else numeric_from_json(tensor.data, "UINT8", tensor.shape, tensor.name))
    if tensor.name == IMAGES_IN:
        if tensor.datatype != "BYTES":
            raise TensorError(f"input {IMAGES_IN!r} is BYTES (encoded images), not {tensor.datatype}")
        if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
            raise TensorError(f"input {IMAGES_IN!r}: shape {tensor.shape} is not [N] (or [N, 1])")
        check_count(tensor.shape[0], limit)
        blobs = (bytes_from_binary(tensor.raw, tensor.shape, tensor.name) if tensor.raw is not None
                 else bytes_from_json(tensor.data, tensor.shape, tensor.name))
        try:
            images = await pipeline.decode_images(served, blobs, settings)
        except ApiError as exc:  # the codec names the element; say which input it was in
            raise ApiError(exc.status, exc.code, f"input {IMAGES_IN!r}: {exc.message}", exc.item) from None
        return images
    raise TensorError(f"unknown input {tensor.name!r}; this model's inputs are {PIXELS_IN!r} (UINT8 [N, 3, H, W]) and "
                      f"{IMAGES_IN!r} (BYTES [N], encoded images)")


def check_pixel_shape(shape: list[int], any_size: bool, settings: Settings) -> None:
    dims = SMALL.input_dims if not any_size else ANY_SIZE.input_dims
    wanted = f"[N, {', '.join('H' if d == -1 and i == 1 else 'W' if d == -1 else str(d) for i, d in enumerate(dims))}]"
    if len(shape) != 4 or shape[1] != CHANNELS:
        raise TensorError(f"input {PIXELS_IN!r}: shape {shape} is not {wanted}")
    if not any_size:
        if tuple(shape[1:]) != SMALL.input_dims:
            raise TensorError(f"input {PIXELS_IN!r}: shape {shape} is not {wanted}")
        return
    height, width = shape[2], shape[3]
    if height < 1 or width < 1:
        raise TensorError(f"input {PIXELS_IN!r}: shape {shape} has an empty image")
    if height * width > settings.max_whole_image_pixels:
        raise TensorError(f"input {PIXELS_IN!r}: {width}x{height} = {width * height} pixels per image; the limit is "
                          f"{settings.max_whole_image_pixels}", 413)
    if max(shape[0], 1) * height * width > settings.max_whole_image_pixels:
        raise TensorError(f"input {PIXELS_IN!r}: {shape[0]} images of {width}x{height} are {shape[0] * height * width} pixels "
                          f"together; the limit is {settings.max_whole_image_pixels} per request", 413)


def check_count(count: int, limit: int) -> None:
    if count < 1:
        raise TensorError(f"the batch dimension is {count}; send at least one image")
    if count > limit:
        raise TensorError(f"{count} images in one request; the limit is {limit}", 413)
