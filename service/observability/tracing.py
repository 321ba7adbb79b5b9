"""OpenTelemetry traces: off unless the standard OTEL_* variables ask for them; then exported over OTLP/HTTP.

On when `OTEL_TRACES_EXPORTER` names `otlp`, or when it is unset and an OTLP endpoint is
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true` turns it
off. The SDK reads the rest itself: `OTEL_SERVICE_NAME` (default here: upgrader), `OTEL_RESOURCE_ATTRIBUTES`,
the exporter's `OTEL_EXPORTER_OTLP_*` (headers, timeout, compression) and the batch processor's `OTEL_BSP_*`.
Off, nothing of it is imported and no layer is added: a request costs what it costs without it.

What is traced:
* one server span per HTTP request (opentelemetry-instrumentation-asgi's middleware, in the app's stack), and one
  per gRPC call (service.grpc.interceptors),
  with the model, version and image count the route served;
* one span per batch forward (service.runtime.batching), *linked* to the server spans of the requests
  whose images it carried: a batch serves many requests and a request may ride several batches, so
  neither can be the other's parent. Each link says how many of that request's images rode the batch
  and how long they queued.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("service.observability.tracing")


def enabled(environ=os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if exporters:
        return "otlp" in exporters
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def provider_from_environment():
    """A TracerProvider exporting over OTLP/HTTP, or None when the environment asks for no traces."""
    if not enabled():
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": "upgrader"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") != "http/protobuf":
        log.warning("only OTLP over HTTP/protobuf is exported", extra={"asked": os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"]})
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("tracing on", extra={"exporter": "otlp/http", "service_name": provider.resource.attributes.get("service.name")})
    return provider


def tracer(provider):
    """The tracer of the batch spans, or None (tracing off)."""
    return None if provider is None else provider.get_tracer("upgrader.batching")


def server_spans():
    """The ASGI middleware class that opens one server span per request."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware


def shutdown(provider) -> None:
    if provider is not None:
        provider.shutdown()


def current_span_context():
    """The span context of the request being served (what a batch span links to), or None if none is recording."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def note_served(model: str, version: int, images: int) -> None:
    """Model, version and image count on the request's server span (if one is recording)."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({"upgrader.model": model, "upgrader.version": version, "upgrader.images": images})


def server_tracer(provider):
    """The tracer of the gRPC server spans, or None (tracing off)."""
    return None if provider is None else provider.get_tracer("upgrader.grpc")


def start_server_span(tracer, method: str, metadata):
    """A server span for one gRPC call, current until `end_server_span`: its parent is the trace the call's
    `traceparent` metadata names (W3C trace context, as HTTP's header), so batch spans link to it."""
    from opentelemetry import context, propagate, trace

    carrier = {key: value if isinstance(value, str) else value.decode("latin-1") for key, value in metadata or ()}
    parent = propagate.extract(carrier)
    service, _, rpc = method.lstrip("/").rpartition("/")
    span = tracer.start_span(method.lstrip("/"), context=parent, kind=trace.SpanKind.SERVER,
                             attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc})
    token = context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_server_span(handle, code: str) -> None:
    from opentelemetry import context, trace

    span, token = handle
    span.set_attribute("rpc.grpc.status_code", code)
    if code != "OK":
        span.set_status(trace.Status(trace.StatusCode.ERROR, code))
    context.detach(token)
    span.end()
