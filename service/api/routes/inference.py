"""The Open Inference Protocol over REST (KServe V2, with the binary tensor data extension): /v2/...

What tritonclient, perf_analyzer and KServe speak. A thin adapter over the protocol's core (service.oip.protocol:
the tensors each model declares, metadata, config, readiness and inference): here a request is read from its
headers and body (JSON, optionally followed by binary tensors) into an `InferRequest`, and the answer written
back as JSON or JSON + binary outputs. Inference requests take their admission slot (service.http.admission)
before their body is read. Errors are the protocol's `{"error": "..."}` (service.errors picks that shape for
every /v2 path).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from pydantic import StringConstraints, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect

from model_store import LATEST
from service.api.deps import ManagerDep, SettingsDep
from service.api.routing import RequestRoute, path_value
from service.api.schemas import VERSION_PATTERN
from service.errors import ApiError, validation_message
from service.http import admission
from service.http.disconnect import ReceiveWatcher
from service.oip import protocol
from service.oip.protocol import InferRequest, Inferred, Tensor
from service.oip.schemas import (
    InferenceRequest,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    ServerLive,
    ServerMetadata,
    ServerReady,
)
from service.oip.tensors import HEADER_LENGTH, BinaryReader, TensorError, bytes_to_binary, decompress, split_body
from service.runtime.cancellation import ClientLeft
from service.runtime.registry import ModelManager
from service.settings import Settings

router = APIRouter(prefix="/v2", tags=["open inference protocol (KServe V2)"])
# The two infer routes read their request themselves (service.api.routing); the app includes both routers.
infer_router = APIRouter(prefix="/v2", tags=["open inference protocol (KServe V2)"], route_class=RequestRoute)

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
    return ServerMetadata(name=protocol.SERVER_NAME, version=protocol.SERVER_VERSION, extensions=protocol.EXTENSIONS)


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


@router.get("/models/{name}", summary="Model metadata: versions, input and output tensors", response_model=ModelMetadata, responses=_RESPONSES)
async def model_metadata(name: NameParam, manager: ManagerDep) -> ModelMetadata:
    return ModelMetadata(**await protocol.model_metadata(manager, name, None))


@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version", response_model=ModelMetadata, responses=_RESPONSES)
async def version_metadata(name: NameParam, version: VersionParam, manager: ManagerDep) -> ModelMetadata:
    return ModelMetadata(**await protocol.model_metadata(manager, name, version))


async def _ready(manager: ModelManager, name: str, version: str) -> ModelReady:
    ready, why = await protocol.model_ready(manager, name, version)
    if not ready:
        raise ApiError(400, "not_ready", why)
    return ModelReady(name=name, ready=True)


@router.get("/models/{name}/ready", summary="200 when the serving version is loaded", response_model=ModelReady,
            responses=_RESPONSES)
async def model_ready(name: NameParam, manager: ManagerDep) -> ModelReady:
    return await _ready(manager, name, LATEST)


@router.get("/models/{name}/versions/{version}/ready", summary="200 when this version is loaded", response_model=ModelReady,
            responses=_RESPONSES)
async def version_ready(name: NameParam, version: VersionParam, manager: ManagerDep) -> ModelReady:
    return await _ready(manager, name, version)


@router.get("/models/{name}/config", summary="Triton model configuration (for perf_analyzer)", responses=_RESPONSES)
async def model_config(name: NameParam, manager: ManagerDep, settings: SettingsDep) -> dict:
    return await protocol.model_config(manager, settings, name, None)


@router.get("/models/{name}/versions/{version}/config", summary="Triton model configuration of one version", responses=_RESPONSES)
async def version_config(name: NameParam, version: VersionParam, manager: ManagerDep, settings: SettingsDep) -> dict:
    return await protocol.model_config(manager, settings, name, version)


# ---- inference ----------------------------------------------------------------------
@infer_router.post("/models/{name}/infer", summary="Upscale a batch (the serving version)", responses=_INFER_RESPONSES,
                   openapi_extra={"requestBody": _INFER_BODY})
async def infer_latest(name: NameParam, request: Request) -> Response:
    return await infer(request, name, LATEST)


@infer_router.post("/models/{name}/versions/{version}/infer", summary="Upscale a batch with one version or alias",
                   responses=_INFER_RESPONSES, openapi_extra={"requestBody": _INFER_BODY})
async def infer_version(name: NameParam, version: VersionParam, request: Request) -> Response:
    return await infer(request, name, path_value(VERSION, "version", version))


async def infer(request: Request, name: str, version: str) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    gone = ReceiveWatcher(request.receive)  # watched once its images wait: they are dropped if the client leaves

    async def read() -> InferRequest:
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ClientLeft() from None
        return read_request(decompress(raw, request.headers.get("content-encoding"), settings.max_body_bytes),
                            request.headers.get(HEADER_LENGTH))

    def admit():
        # No `gone` here: its watcher reads `receive()`, which must stay the body's until the body is read.
        return admission.slot(state.admission, request.scope, settings.max_images_per_request, settings.request_timeout_s)

    try:
        with protocol.Tally(state.metrics) as tally:
            call, done = await protocol.infer(state, name, version, read, admit=admit, gone=gone, tally=tally)
    finally:
        gone.close()
    answer = encode_answer(call, done)
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers())


def read_request(body: bytes, header_length: str | None) -> InferRequest:
    """A REST inference body (JSON, then the binary tensors in order) -> the protocol's InferRequest."""
    head, tail = split_body(body, header_length)
    try:
        payload = InferenceRequest.model_validate_json(head)
    except ValidationError as exc:
        error = exc.errors()[0]
        where, what = validation_message(error)
        if error["type"] == "json_invalid":
            raise TensorError(f"the inference request is not valid JSON: {what}") from None
        raise TensorError(f"inference request field {where or 'request'!r}: {what}") from None
    reader, inputs = BinaryReader(tail), []
    for tensor in payload.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise TensorError(f"input {tensor.name!r}: binary_data_size must be an integer")
        raw = reader.take(size, tensor.name) if size is not None else None
        inputs.append(Tensor(tensor.name, tensor.datatype, tensor.shape, data=tensor.data, raw=raw))
    reader.finish()
    default_binary = bool((payload.parameters or {}).get("binary_data_output", False))
    outputs = None if payload.outputs is None else [(o.name, (o.parameters or {}).get("binary_data")) for o in payload.outputs]
    return InferRequest(inputs, protocol.wanted_outputs(outputs, default_binary), payload.id)


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


def encode_answer(call: InferRequest, done: Inferred) -> InferAnswer:
    """The inference response: JSON, then the binary outputs in the order the JSON lists them."""
    outputs, binary = [], []
    for output, as_binary in call.outputs.items():
        if output == protocol.PIXELS_OUT:
            pixels: np.ndarray = done.pixels
            entry = {"name": output, "datatype": "UINT8", "shape": list(pixels.shape)}
            data = pixels.tobytes() if as_binary else pixels.reshape(-1).tolist()
        else:
            entry = {"name": output, "datatype": "BYTES", "shape": [len(done.pngs)]}
            data = bytes_to_binary(done.pngs) if as_binary else [base64.b64encode(png).decode("ascii") for png in done.pngs]
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        else:
            entry["data"] = data
        outputs.append(entry)
    document = {"model_name": done.name, "model_version": str(done.version), **({"id": call.id} if call.id is not None else {}),
                "outputs": outputs}
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return InferAnswer(header)
    return InferAnswer(b"".join([header, *binary]), len(header))
