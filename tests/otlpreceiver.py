"""A real OTLP/HTTP trace receiver for tests: decodes each export's protobuf (opentelemetry-proto) and keeps the spans."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse


class OtlpReceiver:
    """POST /v1/traces on a free loopback port; `.spans` is every span received, as (resource attributes, span) pairs."""

    def __init__(self) -> None:
        receiver = self
        self.spans: list[tuple[dict, object]] = []
        self.exports = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                if ok:
                    request = ExportTraceServiceRequest.FromString(body)
                    with receiver.lock:
                        receiver.exports += 1
                        for resource_spans in request.resource_spans:
                            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                            for scope_spans in resource_spans.scope_spans:
                                receiver.spans.extend((resource, span) for span in scope_spans.spans)
                answer = ExportTraceServiceResponse().SerializeToString() if ok else b""
                self.send_response(200 if ok else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(span) -> dict:
    """A span's (or link's) attributes as plain values."""
    values = {}
    for kv in span.attributes:
        value = kv.value
        values[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return values
