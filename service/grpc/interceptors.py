"""What every gRPC call passes, as HTTP requests pass the app's middleware: one grpc.aio server interceptor.

In order, for every RPC of the OIP and of grpc.health.v1:

* a request id, from the `x-request-id` metadata (if sane) or made, sent back in the trailing metadata (with the
  status, so it costs no extra send) and carried by every log line of the call;
* an OTel server span (when tracing is on), continuing the trace the client's `traceparent` metadata names; the
  batch spans link to it as they link to HTTP requests' spans;
* the API key (`authorization: Bearer <key>` or `x-api-key` metadata), for every RPC but the health checks an
  orchestrator polls (grpc.health.v1, ServerLive, ServerReady): UNAUTHENTICATED without one;
* admission for ModelInfer: while the worker's Admission is full the call is refused with UNAVAILABLE and
  `retry-after` trailing metadata before its message is even parsed;
* errors: an ApiError raised by the servicer ends the call with the code for its HTTP status (`CODES`) and the
  same message as over REST;
* one access-log line per call: method `GRPC`, the full method name as path, the gRPC status code's number.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from service.errors import ApiError
from service.http.auth import check_api_key
from service.observability import logs, tracing
from service.observability.metrics import UNKNOWN_MODEL
from service.runtime.cancellation import ClientLeft

log = logging.getLogger("service.grpc")

# HTTP status of an ApiError -> gRPC status code. 499: the client went away.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT, 499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                          "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"})
ADMITTED_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def metadata_value(metadata, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def trailers(exc: ApiError) -> tuple[tuple[str, str], ...]:
    """503 says when to retry: `retry-after` seconds, as HTTP's Retry-After."""
    return tuple((name.lower(), value) for name, value in (exc.headers or {}).items() if name.lower() == "retry-after")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Request id, span, API key, admission, error codes and the access log for every unary RPC of a worker."""

    def __init__(self, state) -> None:
        self.state = state
        self.settings = state.settings
        self.tracer = tracing.server_tracer(state.tracer_provider)
        self.refused = None  # the 503 counter, looked up at the first refusal

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming RPCs (grpc.health.v1 Watch) pass as they are
        method, metadata = details.method, details.invocation_metadata
        given = metadata_value(metadata, "x-request-id") or ""
        rid = given if logs.valid_request_id(given) else logs.new_request_id()
        refusal = None
        try:
            if method not in OPEN_METHODS:
                check_api_key(self.settings, metadata_value(metadata, "authorization"), metadata_value(metadata, "x-api-key"))
            if method == ADMITTED_METHOD and self.state.admission.full():
                if self.refused is None:
                    self.refused = self.state.metrics.requests.labels(UNKNOWN_MODEL, "503")
                self.refused.inc()
                raise self.state.admission.refuse_now()
        except ApiError as exc:
            refusal = exc
        return grpc.unary_unary_rpc_method_handler(
            self.wrap(handler.unary_unary, method, metadata, rid, refusal),
            # A refused call's message is never parsed.
            request_deserializer=(lambda data: None) if refusal is not None else handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def wrap(self, behaviour, method: str, metadata, rid: str, refusal: ApiError | None):
        async def call(request, context: grpc.aio.ServicerContext):
            token = logs.request_id.set(rid)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            span = tracing.start_server_span(self.tracer, method, metadata) if self.tracer is not None else None
            try:
                if refusal is not None:
                    raise refusal
                context.set_trailing_metadata((("x-request-id", rid),))
                return await behaviour(request, context)
            except ApiError as exc:
                code = CODES.get(exc.status, grpc.StatusCode.INTERNAL)
                await context.abort(code, exc.message, trailing_metadata=(("x-request-id", rid), *trailers(exc)))
            except (ClientLeft, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
                raise asyncio.CancelledError() from None  # the client left: nobody reads an answer
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code = grpc.StatusCode.INTERNAL
                log.error("unhandled error in %s", method, exc_info=exc)
                await context.abort(code, f"internal error ({type(exc).__name__}); see the service log",
                                    trailing_metadata=(("x-request-id", rid),))
            finally:
                if span is not None:
                    tracing.end_server_span(span, code.name)
                logs.log_access("GRPC", method, code.value[0], started)
                logs.request_id.reset(token)

        return call
