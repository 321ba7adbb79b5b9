"""deploy/nginx: the proxy in front of the service, run for real (the Debian nginx with the shipped template).

Slow clients and the cap on requests in progress are the proxy's to keep; everything else passes through
it unchanged: answers, errors, request ids, and a client that leaves still has its queued work dropped.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from nginxproxy import NginxProxy
from test_http_admission import batch_count, closed_by_server, connect, hold_the_batcher, multipart_body, multipart_head, read_response
from test_service_support import LiveServer, assert_error, metric_value, multipart, png_list, publish, small_inputs, wait_for

from model_store import ModelStore

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)
pngs = pytest.fixture(scope="module", name="pngs")(png_list)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("proxy") / "store")
    publish(store, "conv", seed=1)
    return store


def upscale_requests(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("upgrader_requests_total{"))


def test_answers_errors_and_request_ids_pass_through_unchanged(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60) as live, NginxProxy(live.url) as proxy:
        direct = httpx.post(f"{live.url}/upscale", files=multipart(pngs[:3]))
        through = httpx.post(f"{proxy.url}/upscale", files=multipart(pngs[:3]), headers={"x-request-id": "through-the-proxy-1"})
        assert through.status_code == 200 and through.headers["x-request-id"] == "through-the-proxy-1"
        assert [image["png"] for image in through.json()["images"]] == [image["png"] for image in direct.json()["images"]]
        assert_error(httpx.post(f"{proxy.url}/upscale?model=nope", files=multipart(pngs[:1])), 404, "model_not_found")
        assert httpx.get(f"{proxy.url}/v2/health/ready").status_code == 200
        logged = [json.loads(line) for line in proxy.access_log()]
        assert {"method": "POST", "path": "/upscale", "status": 200, "request_id": "through-the-proxy-1"}.items() <= logged[0].items()
        assert [entry["status"] for entry in logged] == [200, 404, 200]  # the proxy's JSON access log, one line per request


def test_slow_headers_and_bodies_are_closed_by_the_proxy_and_never_reach_the_service(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60) as live, NginxProxy(live.url, header_timeout_s=1, body_timeout_s=1) as proxy:
        silent = connect(proxy.url)  # connects and sends nothing
        dribbling = connect(proxy.url)
        dribbling.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Ty")  # headers never finish
        body = multipart_body(pngs[:2])
        slow_body = connect(proxy.url)
        slow_body.sendall(multipart_head(proxy.url, body) + body[:100])  # body never finishes
        started = time.monotonic()
        assert httpx.get(f"{proxy.url}/healthz").status_code == 200  # while they hang, others are served
        for sock in (silent, dribbling, slow_body):
            assert closed_by_server(sock)
            sock.close()
        assert time.monotonic() - started < 5
        statuses = [json.loads(line)["status"] for line in proxy.access_log()]
        assert statuses.count(408) == 2  # the two that began a request (nginx logs no request for the silent one)
        # The service never saw the slow ones: no /upscale request reached it.
        assert upscale_requests(httpx.get(f"{live.url}/metrics").text) == 0
        # A keep-alive connection's next request gets its own header deadline.
        keep = connect(proxy.url)
        keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(keep)[0] == 200
        keep.sendall(b"GET /heal")
        assert closed_by_server(keep)
        keep.close()


def test_many_half_sent_requests_are_closed_and_health_answers_meanwhile(store):
    with LiveServer(store=store.root, poll_interval_s=60) as live, NginxProxy(live.url, header_timeout_s=1) as proxy:
        socks = []
        for _ in range(300):
            sock = connect(proxy.url)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            assert all(client.get("/healthz").status_code == 200 for _ in range(5))
        for sock in socks:
            assert closed_by_server(sock)
            sock.close()


def test_requests_beyond_the_cap_get_503_in_the_services_shape(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60) as live, NginxProxy(live.url, max_connections=3, body_timeout_s=30) as proxy:
        body = multipart_body(pngs[:2])
        held = []
        for _ in range(3):  # three requests in progress: their bodies stop halfway
            sock = connect(proxy.url)
            sock.sendall(multipart_head(proxy.url, body) + body[:10])
            held.append(sock)
        time.sleep(0.3)
        extra = connect(proxy.url)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, answer = read_response(extra)
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(answer)["error"]["code"] == "too_many_connections"
        for sock in (*held, extra):
            sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{proxy.url}/healthz").status_code == 200  # room again


def test_a_body_over_the_limit_is_refused_by_the_proxy(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60) as live, NginxProxy(live.url, max_body_bytes=4096) as proxy:
        response = httpx.post(f"{proxy.url}/upscale", files=multipart(pngs[:64]))
        assert_error(response, 413, "body_too_large")
        assert upscale_requests(httpx.get(f"{live.url}/metrics").text) == 0


def test_a_client_that_leaves_through_the_proxy_has_its_queued_images_dropped(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60, max_batch_images=1) as live, NginxProxy(live.url) as proxy:
        stays, before, started = hold_the_batcher(live.url, pngs)
        batches = lambda: batch_count(live.url)  # noqa: E731
        leaver = connect(proxy.url)  # 16 images queued behind the 256, then the client leaves
        leaver.sendall(multipart_head(proxy.url, multipart_body(pngs[:16])) + multipart_body(pngs[:16]))
        wait_for(lambda: batches() >= started + 20, "20 more batches")
        leaver.close()
        assert read_response(stays)[0] == 200
        stays.close()
        metrics = httpx.get(f"{live.url}/metrics").text
        assert metric_value(metrics, "upgrader_images_dropped_total", model="conv", reason="client_gone") == 16
        assert batches() - before == 256
