"""The gRPC server of a worker: grpc.aio on the worker's own event loop, serving the OIP and the standard health service.

Each worker process starts one (app lifespan, after its models are loaded; with several workers every one binds
UPGRADER_GRPC_PORT with SO_REUSEPORT, as HTTP does). The servicer is a thin adapter over the protocol's core
(service.oip.protocol): a ModelInferRequest becomes an `InferRequest` (raw or typed contents alike) and rides the
same lease, admission, pipeline, limits and metrics as REST, so both transports refuse the same requests with the
same messages. Request ids, spans, API keys, admission refusals, error codes and the access log are the
interceptor's (service.grpc.interceptors).

Answers carry their tensors in `raw_output_contents`, as Triton does. A client that cancels (or whose
deadline passes) fires the request's ClientGone: its images still queued are dropped, not computed.
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.datastructures import State

from model_store import LATEST
from service.errors import ApiError
from service.grpc import messages
from service.grpc.interceptors import ServiceInterceptor
from service.oip import protocol
from service.oip.protocol import InferRequest, Tensor
from service.oip.tensors import NUMPY_DTYPES, TensorError, bytes_to_binary
from service.runtime.cancellation import ClientGone
from service.runtime.registry import ModelManager
from service.settings import Settings

log = logging.getLogger("service.grpc")

# The typed `contents` field that carries each datatype (the protocol's InferTensorContents).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
ALL_CONTENTS = sorted(set(CONTENTS_FIELD.values()))


def read_request(request) -> InferRequest:
    """A ModelInferRequest -> the protocol's InferRequest (raw_input_contents, or typed contents)."""
    raw = request.raw_input_contents
    if len(raw) and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, or none")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        shape, name, datatype = list(tensor.shape), tensor.name, tensor.datatype
        if len(raw):
            if tensor.HasField("contents") and any(len(getattr(tensor.contents, f)) for f in ALL_CONTENTS):
                raise TensorError(f"input {name!r} has both contents and raw_input_contents; send one of them")
            inputs.append(Tensor(name, datatype, shape, raw=raw[index]))
            continue
        filled = [f for f in ALL_CONTENTS if len(getattr(tensor.contents, f))]
        field = CONTENTS_FIELD.get(datatype)
        if field is not None and filled and filled != [field]:
            raise TensorError(f"input {name!r}: {datatype} contents go in {field}, not {', '.join(filled)}")
        values = list(getattr(tensor.contents, field)) if field is not None else []
        if datatype in NUMPY_DTYPES and NUMPY_DTYPES[datatype].kind == "b":
            values = [bool(v) for v in values]
        inputs.append(Tensor(name, datatype, shape, data=values))  # FP16, BF16 (no typed field): the core names the problem
    outputs = [(output.name, None) for output in request.outputs] or None
    return InferRequest(inputs, protocol.wanted_outputs(outputs, True), request.id or None)


def weight(request) -> int:
    """A ModelInferRequest's images, from its first input's batch dimension (at least one)."""
    return max(1, request.inputs[0].shape[0]) if len(request.inputs) and len(request.inputs[0].shape) else 1


class InferenceServicer:
    """inference.GRPCInferenceService over the worker's app state (manager, settings, metrics, admission)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.settings: Settings = state.settings
        self.manager: ModelManager = state.manager

    async def ServerLive(self, request, context):
        return messages.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return messages.ServerReadyResponse(ready=self.manager.is_ready())

    async def ModelReady(self, request, context):
        try:
            ready, _ = await protocol.model_ready(self.manager, request.name, request.version or LATEST)
        except ApiError as exc:
            if exc.status == 404:  # Triton's answer for a model or version it does not have: not ready
                return messages.ModelReadyResponse(ready=False)
            raise
        return messages.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return messages.ServerMetadataResponse(name=protocol.SERVER_NAME, version=protocol.SERVER_VERSION,
                                               extensions=protocol.EXTENSIONS)

    async def ModelMetadata(self, request, context):
        return messages.ModelMetadataResponse(**await protocol.model_metadata(self.manager, request.name, request.version or None))

    async def ModelConfig(self, request, context):
        """Triton's ModelConfig RPC: the dict GET /v2/models/{name}[/versions/{v}]/config answers, as the message."""
        config = await protocol.model_config(self.manager, self.settings, request.name, request.version or None)
        return messages.ModelConfigResponse(config=json_format.ParseDict(config, messages.ModelConfig()))

    async def ModelInfer(self, request, context):
        gone = ClientGone()
        context.add_done_callback(lambda ctx: gone.fire() if ctx.cancelled() else None)
        state, settings = self.state, self.settings

        async def read() -> InferRequest:
            return read_request(request)

        def admit():
            return state.admission.slot(state.admission.weigh(weight(request)), settings.request_timeout_s, gone)

        with protocol.Tally(state.metrics) as tally:
            call, done = await protocol.infer(state, request.model_name, request.model_version or LATEST, read, admit=admit,
                                              gone=gone, deadline_s=context.time_remaining(), tally=tally)
        response = messages.ModelInferResponse(model_name=done.name, model_version=str(done.version), id=request.id)
        for name in call.outputs:
            if name == protocol.PIXELS_OUT:
                response.outputs.add(name=name, datatype="UINT8", shape=list(done.pixels.shape))
                response.raw_output_contents.append(np.ascontiguousarray(done.pixels).tobytes())
            else:
                response.outputs.add(name=name, datatype="BYTES", shape=[len(done.pngs)])
                response.raw_output_contents.append(bytes_to_binary(done.pngs))
        return response


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(state: State) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Serve the OIP and grpc.health.v1 on `grpc_port` from this worker's event loop; -> (server, health servicer)."""
    settings: Settings = state.settings
    # Every worker binds the port with its own socket (SO_REUSEPORT), joining the placeholder with which the
    # supervisor claimed it (service.workers.claim_ports); without that claim (an app served another way) the
    # port is bound alone.
    shared = bool(getattr(state, "ports_claimed", False))
    server = grpc.aio.server(interceptors=[ServiceInterceptor(state)], options=[
        ("grpc.so_reuseport", 1 if shared else 0),
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
    ])
    servicer = InferenceServicer(state)
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=request_class.FromString,
                                                          response_serializer=response_class.SerializeToString)
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
