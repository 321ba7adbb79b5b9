"""The gRPC server of a worker: grpc.aio on the worker's own event loop, serving the OIP and the standard health service.

Each worker process starts one (app lifespan, after its models are loaded; with several workers every one binds
UPGRADER_GRPC_PORT with SO_REUSEPORT, as HTTP does) and every RPC takes the HTTP routes' path through the code:
the same ModelManager lease (hot reload included), batcher, limits, API keys and metrics
(service.api.routes.inference.run_model). A ModelInferRequest is turned into the REST form (the JSON request
model and its binary tail) and checked by the same code, so both transports refuse the same requests
with the same messages; the HTTP status becomes a gRPC code (`CODES`).

Answers carry their tensors in `raw_output_contents`, as Triton does. A client that cancels (or whose
deadline passes) fires the request's ClientGone: its images still queued are dropped, not computed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.datastructures import State
from starlette.requests import ClientDisconnect

from model_store import LATEST
from service.http.auth import check_api_key
from service.errors import ApiError
from service.grpc import messages
from service.api.inference_schemas import InferenceRequest, RequestInput, RequestOutput
from service.http.disconnect import ClientGone
from service.runtime.registry import ModelManager
from service.api.routes.inference import (
    EXTENSIONS,
    PIXELS_OUT,
    PLATFORM,
    PNG_OUT,
    SERVER_NAME,
    SERVER_VERSION,
    Tally,
    _config,
    _metadata,
    _read_input,
    _wanted_outputs,
    run_model,
)
from service.settings import Settings
from service.runtime.tensors import NUMPY_DTYPES, TensorError, bytes_to_binary

log = logging.getLogger("service.grpc")

# HTTP status of an ApiError/TensorError -> gRPC status code. 499: the client went away.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# The typed `contents` field that carries each datatype (the protocol's InferTensorContents).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
ALL_CONTENTS = sorted(set(CONTENTS_FIELD.values()))


async def _abort(context: grpc.aio.ServicerContext, exc: ApiError) -> None:
    """End the RPC with the code for the error's HTTP status and the same message; 503 says when to retry (`retry-after` seconds)."""
    trailers = tuple((name.lower(), value) for name, value in (exc.headers or {}).items() if name.lower() == "retry-after")
    await context.abort(CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message, trailing_metadata=trailers)


def _metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _as_rest(request) -> tuple[InferenceRequest, memoryview]:
    """A ModelInferRequest -> the REST request model and binary tail it stands for (raw or typed contents alike)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, or none")
    inputs, tail = [], []
    for index, tensor in enumerate(request.inputs):
        shape, name, datatype = list(tensor.shape), tensor.name, tensor.datatype
        filled = [field for field in ALL_CONTENTS if len(getattr(tensor.contents, field))]
        if raw:
            if filled:
                raise TensorError(f"input {name!r} has both contents and raw_input_contents; send one of them")
            inputs.append(RequestInput(name=name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(raw[index])}))
            tail.append(raw[index])
            continue
        field = CONTENTS_FIELD.get(datatype)
        if field is not None and filled and filled != [field]:
            raise TensorError(f"input {name!r}: {datatype} contents go in {field}, not {', '.join(filled)}")
        values = list(getattr(tensor.contents, field)) if field is not None else []
        if datatype == "BYTES":
            data = bytes_to_binary(values)
            inputs.append(RequestInput(name=name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(data)}))
            tail.append(data)
        elif datatype in NUMPY_DTYPES and field is not None:
            if NUMPY_DTYPES[datatype].kind == "b":
                values = [bool(v) for v in values]
            inputs.append(RequestInput(name=name, shape=shape, datatype=datatype, data=values))
        else:  # FP16, BF16 (no typed field) or an unknown datatype: the shared checks name the problem
            inputs.append(RequestInput(name=name, shape=shape, datatype=datatype, data=values))
    outputs = [RequestOutput(name=output.name) for output in request.outputs] or None
    payload = InferenceRequest(id=request.id or None, inputs=inputs, outputs=outputs)
    return payload, memoryview(b"".join(tail))


class InferenceServicer:
    """inference.GRPCInferenceService over the worker's app state (manager, settings, metrics)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.settings: Settings = state.settings
        self.manager: ModelManager = state.manager

    def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        check_api_key(self.settings, _metadata_value(context, "authorization"), _metadata_value(context, "x-api-key"))

    async def ServerLive(self, request, context):
        return messages.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return messages.ServerReadyResponse(ready=self.manager.is_ready())

    async def ModelReady(self, request, context):
        self._check_key(context)
        try:
            state = await self.manager.model_state(request.name)
            number = await self.manager.version_number(state, request.version or LATEST)
        except ApiError as exc:
            if exc.status == 404:  # Triton's answer for a model or version it does not have: not ready
                return messages.ModelReadyResponse(ready=False)
            raise
        return messages.ModelReadyResponse(ready=number in state.loaded and number not in state.failed)

    async def ServerMetadata(self, request, context):
        self._check_key(context)
        return messages.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        self._check_key(context)
        metadata = await _metadata(self.manager, request.name, request.version or None)
        return messages.ModelMetadataResponse(
            name=metadata.name, versions=metadata.versions, platform=PLATFORM,
            inputs=[{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in metadata.inputs],
            outputs=[{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in metadata.outputs])

    async def ModelConfig(self, request, context):
        """Triton's ModelConfig RPC: the dict GET /v2/models/{name}[/versions/{v}]/config answers, as the message."""
        self._check_key(context)
        state = await self.manager.model_state(request.name)
        if request.version:
            await self.manager.version_number(state, request.version)
        config = json_format.ParseDict(_config(state, self.settings), messages.ModelConfig())
        return messages.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):
        gone = ClientGone()
        context.add_done_callback(lambda ctx: gone.fire() if ctx.cancelled() else None)
        remaining = context.time_remaining()
        with Tally(self.state.metrics) as tally:
            self._check_key(context)
            payload, tail = _as_rest(request)
            wanted = _wanted_outputs(payload)
            done = await run_model(self.state, request.model_name, request.model_version or LATEST,
                                   lambda: _read_input(payload, tail, self.settings), PNG_OUT in wanted, tally, gone,
                                   deadline_s=remaining)
        response = messages.ModelInferResponse(model_name=done.name, model_version=str(done.version), id=request.id)
        for name in wanted:
            if name == PIXELS_OUT:
                response.outputs.add(name=name, datatype="UINT8", shape=list(done.pixels.shape))
                response.raw_output_contents.append(np.ascontiguousarray(done.pixels).tobytes())
            else:
                response.outputs.add(name=name, datatype="BYTES", shape=[len(done.pngs)])
                response.raw_output_contents.append(bytes_to_binary(done.pngs))
        return response


def _handler(method, request_class, response_class):
    async def call(request, context: grpc.aio.ServicerContext):
        try:
            return await method(request, context)
        except TensorError as exc:
            await _abort(context, ApiError(exc.status, "invalid_tensor", str(exc)))
        except ApiError as exc:
            await _abort(context, exc)
        except (ClientDisconnect, asyncio.CancelledError):
            raise asyncio.CancelledError() from None  # the client left: nobody reads an answer

    return grpc.unary_unary_rpc_method_handler(call, request_deserializer=request_class.FromString,
                                               response_serializer=response_class.SerializeToString)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(state: State) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Serve the OIP and grpc.health.v1 on `grpc_port` from this worker's event loop; -> (server, health servicer)."""
    settings: Settings = state.settings
    shared = (settings.workers or 1) > 1  # several workers bind the port, each its own socket (SO_REUSEPORT)
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1 if shared else 0),
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
    ])
    servicer = InferenceServicer(state)
    handlers = {name: _handler(getattr(servicer, name), request_class, response_class)
                for name, (request_class, response_class) in messages.METHODS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(messages.SERVICE, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    where = address(settings.host, settings.grpc_port)
    if server.add_insecure_port(where) == 0:
        raise RuntimeError(f"gRPC could not listen on {where}")
    await server.start()
    for service in ("", messages.SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC serving", extra={"address": where, "reuseport": shared})
    return server, health_servicer


async def stop(running: tuple[grpc.aio.Server, health.aio.HealthServicer], grace_s: float) -> None:
    """Health says NOT_SERVING, new RPCs are refused, those in flight get `grace_s` to finish."""
    server, health_servicer = running
    await health_servicer.enter_graceful_shutdown()
    started = time.monotonic()
    await server.stop(grace_s)
    log.info("gRPC stopped", extra={"seconds": round(time.monotonic() - started, 3)})
