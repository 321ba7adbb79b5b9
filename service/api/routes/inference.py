"""The Open Inference Protocol (KServe V2 REST) with the binary tensor data extension: /v2/...

What tritonclient, perf_analyzer and KServe speak. Every model of the store is a V2 model:

* the tensors the metadata describes: input `input` UINT8 [-1, 3, 8, 8] (NCHW pixels), output
  `output` UINT8 [-1, 3, 32, 32]; a request without an `outputs` list gets `output`.
* for clients that hold image files: input `image` BYTES [-1] (encoded 8x8 images: PNG, JPEG,
  WebP, BMP) instead of `input`, and output `png` BYTES [-1] (the outputs as PNG files) when named.
  They are left out of the metadata and the model config on purpose: perf_analyzer (and other
  generic clients) feed every input the metadata lists and ask for every output, and a request
  must carry exactly one of the two inputs.

Versions are numbers or aliases (`latest`, `stable`, ...) resolved by the ModelManager as for
/upscale, and requests ride the same batcher under the same limits, API keys and metrics. Errors
are the protocol's `{"error": "..."}` (service.errors picks that shape for every /v2 path).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from pydantic import StringConstraints, TypeAdapter, ValidationError
from starlette.datastructures import State
from starlette.requests import ClientDisconnect

from model_store import LATEST
from service.api.deps import ManagerDep, SettingsDep
from service.errors import ApiError
from service.api.routing import RequestRoute, path_value
from service.http.disconnect import ClientGone
from service.api.inference_schemas import (
    InferenceRequest,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    ServerLive,
    ServerReady,
    ServerMetadata,
    TensorMetadata,
)
from service.observability import tracing
from service.observability.metrics import UNKNOWN_MODEL, Metrics
from service.runtime.registry import ModelManager, ModelState
from service.api.routes.upscale import decode_all
from service.api.schemas import VERSION_PATTERN
from service.settings import Settings
from service.runtime.tensors import (
    DATATYPES,
    HEADER_LENGTH,
    BinaryReader,
    TensorError,
    bytes_from_binary,
    bytes_from_json,
    bytes_to_binary,
    decompress,
    numeric_from_binary,
    numeric_from_json,
    split_body,
)
from service.runtime.upscaler import Upscaler
from upgrader.architectures import INPUT_SHAPE, OUTPUT_SHAPE

router = APIRouter(prefix="/v2", tags=["open inference protocol (KServe V2)"])
# The two infer routes read their request themselves (service.api.routing); the app includes both routers.
infer_router = APIRouter(prefix="/v2", tags=["open inference protocol (KServe V2)"], route_class=RequestRoute)

SERVER_NAME, SERVER_VERSION = "upgrader", "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
PLATFORM = "upgrader_pytorch"
PIXELS_IN, IMAGES_IN, PIXELS_OUT, PNG_OUT = "input", "image", "output", "png"
INPUTS = [TensorMetadata(name=PIXELS_IN, datatype="UINT8", shape=[-1, *INPUT_SHAPE])]
OUTPUTS = [TensorMetadata(name=PIXELS_OUT, datatype="UINT8", shape=[-1, *OUTPUT_SHAPE])]

NameParam = Annotated[str, Path(description="Model name as in the store.")]
VERSION = TypeAdapter(Annotated[str, StringConstraints(pattern=VERSION_PATTERN)])  # a version, as the infer routes check it
VersionParam = Annotated[str, Path(description="Version number or alias (latest, stable, ...).", pattern=VERSION_PATTERN)]
_binary = {"type": "string", "format": "binary"}
_ERRORS = {
    400: "Bad JSON, unknown input/output name, wrong datatype or shape, binary sizes that do not add up, corrupt image.",
    401: "UPGRADER_API_KEYS is set and no valid key was sent.",
    404: "Unknown model or version/alias.",
    413: "Body, image or image count over the limits.",
    503: "Queue full, version not loadable or shutting down (with Retry-After).",
    504: "Not inferred within UPGRADER_REQUEST_TIMEOUT_S.",
}
_RESPONSES = {status: {"model": ProtocolError, "description": text} for status, text in _ERRORS.items()}
_INFER_BODY = {
    "required": True,
    "description": "The JSON inference request; with the binary tensor data extension the JSON is followed by the tensors' "
                   "bytes and its length is in the `Inference-Header-Content-Length` header.",
    "content": {"application/json": {"schema": InferenceRequest.model_json_schema()}, "application/octet-stream": {"schema": _binary}},
}
_INFER_RESPONSES = {200: {"description": "The inference response (JSON, or JSON followed by binary outputs when asked for; "
                                         "`Inference-Header-Content-Length` then gives the JSON's length).",
                          "content": {"application/json": {}, "application/octet-stream": {"schema": _binary}}},
                    **_RESPONSES}


# ---- health and metadata ----------------------------------------------------------
@router.get("", summary="Server metadata: name, version, extensions", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)


# The health answers carry the JSON bodies KServe's servers send: its SDK reads them (`is_server_ready`
# returns the body's `ready`), while tritonclient looks at the status alone.
@router.get("/health/live", summary="200 while the process serves", response_model=ServerLive)
async def live() -> ServerLive:
    return ServerLive(live=True)


@router.get("/health/ready", summary="200 once the default model is loaded", response_model=ServerReady,
            responses={400: _RESPONSES[503]})
async def ready(manager: ManagerDep) -> ServerReady:
    if not manager.is_ready():
        raise ApiError(400, "not_ready", "not ready: the default model is not loaded yet")
    return ServerReady(ready=True)


async def _metadata(manager: ModelManager, name: str, version: str | None) -> ModelMetadata:
    state = await manager.model_state(name)
    versions = [await manager.version_number(state, version)] if version is not None else state.versions
    return ModelMetadata(name=name, versions=[str(v) for v in versions], platform=PLATFORM, inputs=INPUTS, outputs=OUTPUTS)


@router.get("/models/{name}", summary="Model metadata: versions, input and output tensors", response_model=ModelMetadata, responses=_RESPONSES)
async def model_metadata(name: NameParam, manager: ManagerDep) -> ModelMetadata:
    return await _metadata(manager, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version", response_model=ModelMetadata, responses=_RESPONSES)
async def version_metadata(name: NameParam, version: VersionParam, manager: ManagerDep) -> ModelMetadata:
    return await _metadata(manager, name, version)


async def _ready(manager: ModelManager, name: str, version: str) -> ModelReady:
    state = await manager.model_state(name)
    number = await manager.version_number(state, version)
    if number in state.failed:
        raise ApiError(400, "not_ready", f"model {name!r} version {number} cannot be served: {state.failed[number]}")
    if number not in state.loaded:
        raise ApiError(400, "not_ready", f"model {name!r} version {number} is not loaded (the first inference request naming it loads it)")
    return ModelReady(name=name, ready=True)


@router.get("/models/{name}/ready", summary="200 when the serving version is loaded", response_model=ModelReady,
            responses=_RESPONSES)
async def model_ready(name: NameParam, manager: ManagerDep) -> ModelReady:
    return await _ready(manager, name, LATEST)


@router.get("/models/{name}/versions/{version}/ready", summary="200 when this version is loaded", response_model=ModelReady,
            responses=_RESPONSES)
async def version_ready(name: NameParam, version: VersionParam, manager: ManagerDep) -> ModelReady:
    return await _ready(manager, name, version)


def _config(state: ModelState, settings: Settings) -> dict:
    """Triton's model configuration (the model_configuration extension), which perf_analyzer reads."""
    return {
        "name": state.name, "platform": PLATFORM, "max_batch_size": settings.max_images_per_request,
        "input": [{"name": PIXELS_IN, "data_type": "TYPE_UINT8", "dims": list(INPUT_SHAPE)}],
        "output": [{"name": PIXELS_OUT, "data_type": "TYPE_UINT8", "dims": list(OUTPUT_SHAPE)}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
                             "preferred_batch_size": [settings.max_batch_images]},
        "version_policy": {"specific": {"versions": state.versions}},
    }


@router.get("/models/{name}/config", summary="Triton model configuration (for perf_analyzer)", responses=_RESPONSES)
async def model_config(name: NameParam, manager: ManagerDep, settings: SettingsDep) -> dict:
    return _config(await manager.model_state(name), settings)


@router.get("/models/{name}/versions/{version}/config", summary="Triton model configuration of one version", responses=_RESPONSES)
async def version_config(name: NameParam, version: VersionParam, manager: ManagerDep, settings: SettingsDep) -> dict:
    state = await manager.model_state(name)
    await manager.version_number(state, version)
    return _config(state, settings)


# ---- inference ----------------------------------------------------------------------
@infer_router.post("/models/{name}/infer", summary="Upscale a batch (the serving version)", responses=_INFER_RESPONSES,
             openapi_extra={"requestBody": _INFER_BODY})
async def infer_latest(name: NameParam, request: Request) -> Response:
    return await infer(request, request.app.state, name, LATEST)


@infer_router.post("/models/{name}/versions/{version}/infer", summary="Upscale a batch with one version or alias", responses=_INFER_RESPONSES,
             openapi_extra={"requestBody": _INFER_BODY})
async def infer_version(name: NameParam, version: VersionParam, request: Request) -> Response:
    return await infer(request, request.app.state, name, path_value(VERSION, "version", version))


@dataclass(frozen=True)
class InferAnswer:
    """An inference response's bytes: JSON, or JSON followed by binary outputs (`header_length` is then the JSON's length)."""

    body: bytes
    header_length: int | None = None

    @property
    def media_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"

    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {"Inference-Header-Content-Length": str(self.header_length)}


async def infer(request: Request, state: State, name: str, version: str = LATEST) -> Response:
    gone = ClientGone.after_body(request.receive)  # watched once its images wait: they are dropped if the client leaves
    try:
        answer = await run_infer(state, name, version, request.headers.get, request.body, gone)
    finally:
        gone.close()
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers())


async def run_infer(state: State, name: str, version: str, header: Callable[[str], str | None],
                    read_body: Callable[[], Awaitable[bytes]], gone: ClientGone | None = None) -> InferAnswer:
    """One inference request, from its headers (`header(lowercase name)`) and body to its answer; errors raise ApiError.

    Called by `infer` (the REST route) with its request's ClientGone: a client that leaves raises ClientDisconnect
    (counted as 499)."""
    settings: Settings = state.settings
    with Tally(state.metrics) as tally:
        try:
            body = decompress(await read_body(), header("content-encoding"), settings.max_body_bytes)
            head, tail = split_body(body, header(HEADER_LENGTH))
            payload = _parse_header(head)
            wanted = _wanted_outputs(payload)
            done = await run_model(state, name, version, lambda: _read_input(payload, tail, settings), PNG_OUT in wanted, tally, gone)
        except TensorError as exc:
            raise ApiError(exc.status, "invalid_tensor", str(exc)) from None
        return _answer(done.name, done.version, payload.id, wanted, done.pixels, done.pngs)


class Tally:
    """Counts one inference request in the service metrics when its block ends: model, status (from the exception) and images.

    Shared by both transports (REST here, gRPC in service.grpc), so a request counts the same either way."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.label, self.status, self.images = metrics, UNKNOWN_MODEL, 500, 0
        self.started = time.perf_counter()

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.status = 200
        elif isinstance(exc, (TensorError, ApiError)):
            self.status = exc.status
        elif isinstance(exc, (ClientDisconnect, asyncio.CancelledError)):
            self.status = 499
        self.metrics.request_done(self.label, self.status, time.perf_counter() - self.started, self.images if exc is None else 0)


@dataclass(frozen=True)
class Inferred:
    name: str
    version: int
    pixels: np.ndarray  # uint8 N x 3 x 32 x 32
    pngs: list[bytes]  # empty unless asked for


async def run_model(state: State, name: str, version: str, read_images: Callable[[], Awaitable[np.ndarray]], png: bool,
                    tally: Tally, gone: ClientGone | None = None, deadline_s: float | None = None) -> Inferred:
    """The shared inference path of both transports: lease the version, read the request's images, run them through its batcher.

    `read_images()` runs under the lease (a version unknown is refused before any image is decoded); the
    request's time (`request_timeout_s`, or the client's own `deadline_s` if sooner) counts from `tally.started`."""
    settings: Settings = state.settings
    manager: ModelManager = state.manager
    async with manager.lease(name, version) as served:
        tally.label = served.name
        images = await read_images()
        budget = settings.request_timeout_s if deadline_s is None else min(settings.request_timeout_s, deadline_s)
        timeout = budget - (time.perf_counter() - tally.started)
        result = await served.batcher.submit(images, 1, timeout, png=png, gone=gone)
    tally.images = len(result.pngs)
    if state.tracer_provider is not None:
        tracing.note_served(served.name, served.version, len(result.pngs))
    return Inferred(served.name, served.version, result.images, result.pngs)


def _parse_header(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise TensorError(f"the inference request is not valid JSON: {error['msg']}") from None
        where = ".".join(str(part) for part in error["loc"]) or "request"
        raise TensorError(f"inference request field {where!r}: {error['msg']}") from None


def _wanted_outputs(payload: InferenceRequest) -> dict[str, bool]:
    """Output name -> as binary data. No list: the metadata's output, binary if the request says binary_data_output."""
    default_binary = bool((payload.parameters or {}).get("binary_data_output", False))
    if payload.outputs is None:
        return {PIXELS_OUT: default_binary}
    wanted = {}
    for output in payload.outputs:
        if output.name not in (PIXELS_OUT, PNG_OUT):
            raise TensorError(f"unknown output {output.name!r}; this model's outputs are {PIXELS_OUT!r} and {PNG_OUT!r}")
        binary = (output.parameters or {}).get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise TensorError(f"output {output.name!r}: binary_data must be true or false")
        wanted[output.name] = binary
    return wanted


async def _read_input(payload: InferenceRequest, tail, settings: Settings) -> np.ndarray:
    """The request's one input -> uint8 N x 3 x 8 x 8 (pixels as they are, encoded images decoded)."""
    reader = BinaryReader(tail)
    if len(payload.inputs) != 1:
        raise TensorError(f"{len(payload.inputs)} inputs; send exactly one: {PIXELS_IN!r} (UINT8 [N, 3, 8, 8]) or {IMAGES_IN!r} (BYTES [N])")
    tensor = payload.inputs[0]
    parameters = tensor.parameters or {}
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None and (not isinstance(binary_size, int) or isinstance(binary_size, bool)):
        raise TensorError(f"input {tensor.name!r}: binary_data_size must be an integer")
    if binary_size is None and tensor.data is None:
        raise TensorError(f"input {tensor.name!r} has neither data nor a binary_data_size parameter")
    if tensor.datatype not in DATATYPES:
        raise TensorError(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    limit = settings.max_images_per_request
    if tensor.name == PIXELS_IN:
        if tensor.datatype != "UINT8":
            raise TensorError(f"input {PIXELS_IN!r} is UINT8, not {tensor.datatype}")
        if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != INPUT_SHAPE:
            raise TensorError(f"input {PIXELS_IN!r}: shape {tensor.shape} is not [N, {', '.join(map(str, INPUT_SHAPE))}]")
        _check_count(tensor.shape[0], limit)
        chunk = reader.take(binary_size, tensor.name) if binary_size is not None else None
        reader.finish()
        return (numeric_from_binary(chunk, "UINT8", tensor.shape, tensor.name) if chunk is not None
                else numeric_from_json(tensor.data, "UINT8", tensor.shape, tensor.name))
    if tensor.name == IMAGES_IN:
        if tensor.datatype != "BYTES":
            raise TensorError(f"input {IMAGES_IN!r} is BYTES (encoded images), not {tensor.datatype}")
        if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
            raise TensorError(f"input {IMAGES_IN!r}: shape {tensor.shape} is not [N] (or [N, 1])")
        _check_count(tensor.shape[0], limit)
        chunk = reader.take(binary_size, tensor.name) if binary_size is not None else None
        reader.finish()
        blobs = (bytes_from_binary(chunk, tensor.shape, tensor.name) if chunk is not None
                 else bytes_from_json(tensor.data, tensor.shape, tensor.name))
        try:
            return await decode_all(Upscaler.decode, blobs, settings)
        except ApiError as exc:  # the codec names the element; say which input it was in
            raise ApiError(exc.status, exc.code, f"input {IMAGES_IN!r}: {exc.message}", exc.item) from None
    raise TensorError(f"unknown input {tensor.name!r}; this model's inputs are {PIXELS_IN!r} (UINT8 [N, 3, 8, 8]) and "
                      f"{IMAGES_IN!r} (BYTES [N], encoded images)")


def _check_count(count: int, limit: int) -> None:
    if count < 1:
        raise TensorError(f"the batch dimension is {count}; send at least one image")
    if count > limit:
        raise TensorError(f"{count} images in one request; the limit is {limit}", 413)


def _answer(name: str, version: int, request_id: str | None, wanted: dict[str, bool], pixels: np.ndarray, pngs: list[bytes]) -> InferAnswer:
    """The inference response: JSON, then the binary outputs in the order the JSON lists them."""
    outputs, binary = [], []
    for output, as_binary in wanted.items():
        if output == PIXELS_OUT:
            entry = {"name": output, "datatype": "UINT8", "shape": list(pixels.shape)}
            data = pixels.tobytes() if as_binary else pixels.reshape(-1).tolist()
        else:
            entry = {"name": output, "datatype": "BYTES", "shape": [len(pngs)]}
            data = bytes_to_binary(pngs) if as_binary else [base64.b64encode(png).decode("ascii") for png in pngs]
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        else:
            entry["data"] = data
        outputs.append(entry)
    document = {"model_name": name, "model_version": str(version), **({"id": request_id} if request_id is not None else {}), "outputs": outputs}
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return InferAnswer(header)
    return InferAnswer(b"".join([header, *binary]), len(header))
