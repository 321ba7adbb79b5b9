"""service.observability.tracing: OpenTelemetry spans over OTLP/HTTP to a real receiver, and nothing when it is off."""

from __future__ import annotations

import asyncio
import socket

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from otlpreceiver import OtlpReceiver, attributes
from test_service_support import LiveServer, multipart, png_list, publish, small_inputs, v2_request

from model_store import ModelStore
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from service.app import create_app
from service.observability import tracing
from service.settings import Settings

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)
CLIENT_TRACE, CLIENT_SPAN = 0x5EED_0000_0000_0000_0000_0000_0000_0001, 0xC11E_0000_0000_0002


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
pngs = pytest.fixture(scope="module", name="pngs")(png_list)
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")


@pytest.fixture
def clean_otel_environment(monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("tracing") / "store")
    publish(store, "conv", seed=1)
    return store


def test_tracing_is_off_unless_the_standard_variables_ask_for_it(clean_otel_environment):
    assert not tracing.enabled({})
    assert tracing.enabled({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing.enabled({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not tracing.enabled({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
    app = create_app(Settings())
    assert app.state.tracer_provider is None and app.state.manager.tracer is None
    assert "OpenTelemetryMiddleware" not in [layer.cls.__name__ for layer in app.user_middleware]


def test_a_server_span_per_request_and_batch_spans_linked_to_the_requests_they_served(store, pngs, inputs, clean_otel_environment):
    with OtlpReceiver() as receiver:
        clean_otel_environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        clean_otel_environment.setenv("OTEL_SERVICE_NAME", "upgrader-under-test")
        clean_otel_environment.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        # A 300 ms batching window: the eight requests sent together ride the same batch.
        grpc_port = free_port()
        with LiveServer(store=store.root, poll_interval_s=60, idle_dispatch=False, max_wait_ms=300, grpc_port=grpc_port) as live:
            assert "OpenTelemetryMiddleware" in [layer.cls.__name__ for layer in live.app.user_middleware]

            async def send_together() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
                    return await asyncio.gather(*(client.post("/upscale", files=multipart(pngs[i : i + 2])) for i in range(8)))

            answers = asyncio.run(send_together())
            assert all(answer.status_code == 200 for answer in answers)
            head, body = v2_request("/v2/models/conv/infer", inputs[:3].numpy().astype(np.uint8)).split(b"\r\n\r\n", 1)
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
            v2 = httpx.post(f"{live.url}/v2/models/conv/infer", content=body,
                            headers={"inference-header-content-length": headers["Inference-Header-Content-Length"]})
            assert v2.status_code == 200, v2.text
            # A gRPC call continues the trace its client names (W3C traceparent metadata), as an HTTP request does.
            with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
                tensor = triton_grpc.InferInput("input", [4, 3, 8, 8], "UINT8")
                tensor.set_data_from_numpy(inputs[:4].numpy().astype(np.uint8))
                client.infer("conv", [tensor], headers={"traceparent": f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"})
        # The server's shutdown flushes the spans still batched.
    spans = [span for _, span in receiver.spans]
    assert {resource["service.name"] for resource, _ in receiver.spans} == {"upgrader-under-test"}
    servers = [span for span in spans if span.kind == Span.SPAN_KIND_SERVER]
    upscales = [span for span in servers if attributes(span).get("http.route", attributes(span).get("http.target", "")) == "/upscale"
                or span.name.startswith("POST /upscale")]
    assert len(upscales) == 8
    for span in upscales:
        served = attributes(span)
        assert served["upgrader.model"] == "conv" and served["upgrader.version"] == 1 and served["upgrader.images"] == 2
    infers = [span for span in servers if "/infer" in span.name]
    assert len(infers) == 1 and attributes(infers[0])["upgrader.images"] == 3
    calls = [span for span in servers if span.name == "inference.GRPCInferenceService/ModelInfer"]
    assert len(calls) == 1
    call = calls[0]
    assert attributes(call)["upgrader.images"] == 4 and attributes(call)["rpc.grpc.status_code"] == "OK"
    assert int.from_bytes(call.trace_id, "big") == CLIENT_TRACE and int.from_bytes(call.parent_span_id, "big") == CLIENT_SPAN
    batches = [span for span in spans if span.name == "batch forward"]
    assert batches
    server_ids = {(span.trace_id, span.span_id) for span in servers}
    linked_images = 0
    for batch in batches:
        batch_attributes = attributes(batch)
        assert batch_attributes["upgrader.model"] == "conv" and batch_attributes["upgrader.version"] == 1
        assert batch_attributes["upgrader.batch_size"] == sum(attributes(link)["upgrader.images"] for link in batch.links)
        assert batch_attributes["upgrader.queue_wait_ms"] >= 0
        for link in batch.links:
            assert (link.trace_id, link.span_id) in server_ids  # linked, not parented: each request keeps its own trace
            assert attributes(link)["upgrader.queue_wait_ms"] >= 0
            linked_images += attributes(link)["upgrader.images"]
        assert not batch.parent_span_id
    assert linked_images == 8 * 2 + 3 + 4
    assert max(len(batch.links) for batch in batches) >= 2  # one forward served several requests
