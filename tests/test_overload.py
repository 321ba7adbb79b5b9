"""Overload is refused before it costs work; slow, oversized and hostile clients; the defects found.

Everything runs against a real uvicorn on loopback (LiveServer: the app under the service's own
guarded protocol) with a real store; slow clients are raw sockets that send part of a request and stop.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import zlib

import httpx
import pytest
from test_service_support import (
    LiveServer,
    assert_error,
    metric_value,
    multipart,
    png_list,
    publish,
    small_inputs,
    v2_request,
    wait_for,
)

from model_store import WEIGHTS_FILE, ModelStore
from service.limits import CLIENT_GONE, Admission, ClientGone

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)
pngs = pytest.fixture(scope="module", name="pngs")(png_list)
ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("overload") / "store")
    publish(store, "conv", seed=1)
    return store


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """`count` pipelined responses (status, body) from a raw socket, in the order they came."""
    stream = sock.makefile("rb")
    answers = []
    for _ in range(count):
        status = int(stream.readline().split()[1])
        headers = dict(line.decode("latin-1").lower().split(":", 1) for line in iter(stream.readline, b"\r\n"))
        answers.append((status, stream.read(int(headers["content-length"]))))
    return answers


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def multipart_head(url: str, body: bytes, boundary: str = "b0undary") -> bytes:
    return (f"POST /upscale HTTP/1.1\r\nHost: {url.removeprefix('http://')}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()


def padded_png(png: bytes, size: int) -> bytes:
    """The same image with a tEXt chunk of `size` bytes before IEND (still an 8x8 PNG)."""
    data = b"comment\0" + b"x" * size
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:-12] + chunk + png[-12:]


def multipart_body(images: list[bytes], boundary: str = "b0undary") -> bytes:
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n" for i, image in enumerate(images))
    return parts + f"--{boundary}--\r\n".encode()


# ---- admission --------------------------------------------------------------------------------------
def test_overload_is_refused_before_the_body_is_read_and_waiting_requests_are_served(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60, max_active_images=1, max_waiting_requests=1) as live:
        body = multipart_body(pngs[:4])
        # A: takes the only slot, then stalls halfway through its body.
        a = connect(live.url)
        a.sendall(multipart_head(live.url, body) + body[: len(body) // 2])
        time.sleep(0.3)
        # B: waits in line for the slot (its body, sent whole, is not read yet).
        b = connect(live.url)
        b.sendall(multipart_head(live.url, body) + body)
        time.sleep(0.3)
        # C: only its headers; it never sends the body it announces, and is refused anyway: the refusal needs no body.
        c = connect(live.url)
        c.sendall(multipart_head(live.url, body))
        status, headers, answer = read_response(c)
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert json.loads(answer)["error"]["code"] == "overloaded"
        # A finishes its body: A, then B, are served in full.
        a.sendall(body[len(body) // 2 :])
        for sock in (a, b):
            status, _, answer = read_response(sock)
            assert status == 200, answer
            assert len(json.loads(answer)["images"]) == 4
        for sock in (a, b, c):
            sock.close()
        # Health checks were never behind the line, and the refusal is counted.
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        assert metric_value(httpx.get(f"{live.url}/metrics").text, "upgrader_requests_total", model="-", status="503") >= 1


def test_a_refusal_from_the_headers_keeps_the_connection_in_step(store, pngs):
    """Refused from its headers, a request's body is still read and dropped: the same connection serves the next request;
    an answer still being made on the connection goes out first; a client waiting for 100 Continue is closed."""
    with LiveServer(store=store.root, poll_interval_s=60, max_active_images=1, max_waiting_requests=1) as live:
        body = multipart_body(pngs[:4])
        a = connect(live.url)  # takes the only slot, then stalls halfway through its body
        a.sendall(multipart_head(live.url, body) + body[: len(body) // 2])
        time.sleep(0.3)
        b = connect(live.url)  # waits in line
        b.sendall(multipart_head(live.url, body) + body)
        time.sleep(0.3)
        # C: refused with its whole body sent; then sends the rest of its body in a second write.
        c = connect(live.url)
        c.sendall(multipart_head(live.url, body) + body[:10])
        status, headers, answer = read_response(c)
        assert status == 503 and headers["retry-after"] == "1" and "date" in headers and "connection" not in headers
        assert json.loads(answer)["error"]["code"] == "overloaded"
        c.sendall(body[10:])
        # D: a pipelined pair, a /bicubic request (not under admission) then an /upscale one: answers in request order.
        d = connect(live.url)
        bicubic = (f"POST /bicubic HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        d.sendall(bicubic + multipart_head(live.url, body) + body)
        (first, first_body), (second, second_body) = read_responses(d, 2)
        assert (first, second) == (200, 503), (first_body, second_body)
        assert len(json.loads(first_body)["images"]) == 4 and json.loads(second_body)["error"]["code"] == "overloaded"
        # E: waits for 100 Continue before its body; it gets the 503 instead, and the connection is closed.
        e = connect(live.url)
        e.sendall(multipart_head(live.url, body).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
        status, headers, _ = read_response(e)
        assert status == 503 and headers["connection"] == "close" and closed_by_server(e)
        a.sendall(body[len(body) // 2 :])
        for sock in (a, b):
            assert read_response(sock)[0] == 200
        # The refused connection C is still in step: its next request is served.
        c.sendall(multipart_head(live.url, body) + body)
        status, _, answer = read_response(c)
        assert status == 200, answer
        assert len(json.loads(answer)["images"]) == 4
        for sock in (a, b, c, d):
            sock.close()


def test_the_front_door_refuses_pipelined_requests_in_order_and_hands_anything_unusual_to_httptools(store, pngs):
    """service.front_door answers plain refusals itself (no uvicorn protocol); everything else goes to the guarded
    uvicorn protocol with the bytes read so far: answers keep their order, odd requests are judged by httptools, and a
    refused body that never ends, or a connection left idle after its refusal, is closed on the usual deadlines."""
    with LiveServer(store=store.root, poll_interval_s=60, max_active_images=1, max_waiting_requests=0, max_wait_ms=5000,
                    idle_dispatch=False, body_timeout_s=0.5, uvicorn_options={"timeout_keep_alive": 1}) as live:
        body = multipart_body(pngs[:4])
        holder = connect(live.url)  # takes the only slot for the 5-s batching window: admission is full meanwhile
        holder.sendall(multipart_head(live.url, body) + body)
        time.sleep(0.3)
        # Two refusable requests and a health check, pipelined in one write, the second split across two writes.
        pipelined = connect(live.url)
        stream = multipart_head(live.url, body) + body + multipart_head(live.url, body) + body + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        pipelined.sendall(stream[:len(stream) // 2 + 7])
        time.sleep(0.1)
        pipelined.sendall(stream[len(stream) // 2 + 7:])
        answers = read_responses(pipelined, 3)
        assert [status for status, _ in answers] == [503, 503, 200]
        assert [json.loads(answer)["error"]["code"] for _, answer in answers[:2]] == ["overloaded", "overloaded"]
        # A head that comes a byte at a time is still read (the blank line may straddle two reads).
        dribbled = connect(live.url)
        dribbled.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in multipart_head(live.url, body):
            dribbled.send(bytes([byte]))
            time.sleep(0.0005)
        assert read_response(dribbled)[0] == 503
        dribbled.sendall(body + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(dribbled)[0] == 200
        # A chunked body is not the door's to drop: handed over, refused by the guarded protocol, the connection in step.
        chunked = connect(live.url)
        head = multipart_head(live.url, body).replace(f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked")
        chunked.sendall(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [status for status, _ in read_responses(chunked, 2)] == [503, 200]
        # Two Content-Lengths (request smuggling): httptools refuses it, the door never guesses.
        smuggled = connect(live.url)
        smuggled.sendall(multipart_head(live.url, body).replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n") + body)
        assert read_response(smuggled)[0] == 400
        # A refused body that stops halfway is closed at the body deadline (its 503 already went out: no 408).
        stalled = connect(live.url)
        stalled.sendall(multipart_head(live.url, body) + body[:10])
        assert read_response(stalled)[0] == 503
        time.sleep(1.2)
        assert closed_by_server(stalled)
        # A refused connection left idle is closed after the keep-alive timeout, as uvicorn closes its own.
        idle = connect(live.url)
        idle.sendall(multipart_head(live.url, body) + body)
        assert read_response(idle)[0] == 503
        # ... which only the door has held (served connections are the guarded protocol's).
        kinds = {type(connection).__name__ for connection in list(live.server.server_state.connections)}
        assert kinds == {"FrontDoor", "GuardedHttpToolsProtocol"}, kinds
        time.sleep(1.8)
        assert closed_by_server(idle)
        metrics = httpx.get(f"{live.url}/metrics").text
        assert metric_value(metrics, "upgrader_connections_refused_total", reason="body_timeout") == 1
        assert metric_value(metrics, "upgrader_requests_total", model="-", status="503") == 6
        assert read_response(holder)[0] == 200
        for sock in (holder, pipelined, dribbled, chunked, smuggled, stalled, idle):
            sock.close()


def test_a_requests_share_of_the_admission_budget_is_estimated_from_its_length(pngs):
    admission = Admission(512, 32, 1)
    sixty_four = admission.weight(str(len(multipart_body(pngs[:64]))), 256)
    assert 64 <= sixty_four <= 2 * 64  # errs high, never low, for real 8x8 PNGs in multipart
    base64_json = len(json.dumps({"images": [base64.b64encode(p).decode() for p in pngs[:64]]}))
    assert 64 <= admission.weight(str(base64_json), 256) <= 2 * 64
    assert admission.weight(str(len(multipart_body(pngs[:1]))), 256) <= 2  # one-image requests: ~256 share the budget
    assert admission.weight(None, 256) == 256  # no Content-Length (chunked): as many as a request may carry
    assert Admission(100, 32, 1).weight("10000000", 256) == 100  # never more than the budget: it can always run alone


def test_requests_let_in_from_their_headers_count_until_their_route_takes_a_slot():
    """A burst read in one event-loop turn is let in before any of its routes runs: the arrivals count."""
    admission = Admission(512, 2, 1)
    arrivals = []
    for _ in range(6):  # 6 x 80 images fit the budget
        assert not admission.full()
        arrivals.append(admission.arrive(80))
    arrivals.append(admission.arrive(80))  # 560 > 512: this one will wait in line
    assert not admission.full()  # 1 of 2 places in line
    arrivals.append(admission.arrive(80))
    assert admission.full()  # the line (2) will be full once these reach their routes: the next is refused
    for arrival in arrivals:
        admission.arrived(arrival)
    assert (admission.arriving, admission.arriving_weight, admission.arriving_to_wait) == (0, 0, 0) and not admission.full()
    one_image = Admission(512, 2, 1)
    for _ in range(128):  # 128 one-image requests at once fit the budget: none is refused
        assert not one_image.full()
        one_image.arrive(1)


def test_requests_that_end_before_their_route_stop_counting_as_arriving(store, pngs):
    """401, 404 and 422 answers and a client that leaves mid-body: afterwards nothing counts as arriving, and requests are served."""
    with LiveServer(store=store.root, poll_interval_s=60, api_keys="k1") as live, httpx.Client(base_url=live.url, timeout=30) as client:
        key = {"X-API-Key": "k1"}
        body = multipart_body(pngs[:2])
        headers = {"content-type": "multipart/form-data; boundary=b0undary", **key}
        assert client.post("/upscale", content=body, headers={"content-type": headers["content-type"]}).status_code == 401
        assert client.post("/upscale?model=nope", content=body, headers=headers).status_code == 404
        assert client.post("/upscale?ensemble=3", content=body, headers=headers).status_code == 422
        gone = connect(live.url)
        gone.sendall(multipart_head(live.url, body).replace(b"\r\n\r\n", b"\r\nX-API-Key: k1\r\n\r\n", 1) + body[:10])
        gone.close()
        admission = live.app.state.admission
        deadline = time.monotonic() + 10
        # The client that left is noticed when its route reads the body: its slot is then given back.
        while (admission.arriving or admission.in_use) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (admission.arriving, admission.arriving_weight) == (0, 0)
        assert admission.in_use == 0
        answer = client.post("/upscale", content=body, headers=headers)
        assert answer.status_code == 200 and len(answer.json()["images"]) == 2
        assert (admission.arriving, admission.arriving_weight, admission.in_use) == (0, 0, 0)


def test_a_client_that_leaves_has_its_queued_images_dropped_not_computed(store, pngs, inputs):
    """Images queued for clients that have closed their connection are never computed: not those of an /upscale
    request, nor those of /v2 requests (in the protocol's own lane or the ASGI way). The request that stays is served in full."""
    with LiveServer(store=store.root, poll_interval_s=60, max_batch_images=1) as live:
        def batches() -> float:
            return metric_value(httpx.get(f"{live.url}/metrics").text, "upgrader_batch_images_count", model="conv")

        before = batches()
        body = multipart_body(pngs * 4)  # 256 images, one forward pass (x8 with ensemble=8) each
        stays = connect(live.url)
        stays.sendall(multipart_head(live.url, body).replace(b"/upscale", b"/upscale?ensemble=8") + body)
        started = wait_for(lambda: (count := batches()) > before and count, "the first batch")
        leaver = connect(live.url)  # 16 images queued behind the 256, then the client leaves
        leaver.sendall(multipart_head(live.url, multipart_body(pngs[:16])) + multipart_body(pngs[:16]))
        v2_leaver = connect(live.url)  # 8 images through the protocol's own lane, then the client leaves
        v2_leaver.sendall(v2_request("/v2/models/conv/infer", inputs[:8].numpy()))
        asgi_leaver = connect(live.url)  # 4 more with a query string: the ASGI way (service.fastlane), then the client leaves
        asgi_leaver.sendall(v2_request("/v2/models/conv/infer?via=asgi", inputs[:4].numpy()))
        wait_for(lambda: batches() >= started + 20, "20 more batches")  # long enough for all three to be decoded and queued
        for sock in (leaver, v2_leaver, asgi_leaver):
            sock.close()
        status, _, answer = read_response(stays)
        assert status == 200 and len(json.loads(answer)["images"]) == 256
        stays.close()
        metrics = httpx.get(f"{live.url}/metrics").text
        assert metric_value(metrics, "upgrader_images_dropped_total", model="conv", reason="client_gone") == 16 + 8 + 4
        assert metric_value(metrics, "upgrader_requests_total", model="conv", status="499") == 3
        assert batches() - before == 256  # the 256 only: none of the 28 went through the model


def test_a_request_waiting_in_line_leaves_it_when_its_client_does():
    """A request waiting for admission whose client leaves gives up its place at once (not at the deadline)."""
    import asyncio

    from starlette.requests import ClientDisconnect

    async def scenario() -> None:
        admission = Admission(64, 2, 1)
        gone = ClientGone()
        holding, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with admission.slot({}, str(64 * 300), 256, wait_s=30):
                holding.set()
                await release.wait()

        async def waiter() -> None:
            async with admission.slot({CLIENT_GONE: gone}, str(64 * 300), 256, wait_s=30):
                raise AssertionError("a request whose client left was admitted")

        first = asyncio.create_task(holder())
        await holding.wait()
        second = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        assert admission.waiting == 1
        gone.fire()
        for _ in range(3):  # a few turns of the loop, nowhere near the 30 s wait: the request is out of the line already
            await asyncio.sleep(0)
        assert second.done() and admission.waiting == 0 and admission.in_use == 64
        with pytest.raises(ClientDisconnect):
            await second
        release.set()
        await first
        assert admission.in_use == 0

    asyncio.run(scenario())


def test_a_full_queue_refuses_before_the_body(store, pngs):
    """The version's queue is full (a request waits on a 10 s batching window): the next one is refused from its headers alone."""
    with (LiveServer(store=store.root, poll_interval_s=60, max_queue_images=4, max_images_per_request=4, max_wait_ms=10_000, idle_dispatch=False,
                     max_batch_images=64) as live, httpx.Client(base_url=live.url, timeout=30) as client):
        filler = connect(live.url)
        body = multipart_body(pngs[:4])
        filler.sendall(multipart_head(live.url, body) + body)
        deadline = time.monotonic() + 30
        while metric_value(client.get("/metrics").text, "upgrader_queue_images", model="conv", version="1") < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = connect(live.url)
        refused.sendall(multipart_head(live.url, body))  # headers only
        status, headers, answer = read_response(refused)
        assert status == 503 and json.loads(answer)["error"]["code"] == "queue_full" and headers["retry-after"]
        filler.close()
        refused.close()


# ---- slow clients -----------------------------------------------------------------------------------
def test_slow_headers_and_bodies_time_out_with_408_and_a_metric(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60, header_timeout_s=0.5, body_timeout_s=0.5) as live:
        silent = connect(live.url)  # connects and sends nothing
        dribbling = connect(live.url)
        dribbling.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Ty")  # headers never finish
        body = multipart_body(pngs[:2])
        slow_body = connect(live.url)
        slow_body.sendall(multipart_head(live.url, body) + body[:100])  # body never finishes
        # While they hang, the service answers others.
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        for sock, code in ((silent, "header_timeout"), (dribbling, "header_timeout"), (slow_body, "body_timeout")):
            status, headers, answer = read_response(sock)
            assert status == 408 and headers["connection"] == "close"
            assert json.loads(answer)["error"]["code"] == code
            assert closed_by_server(sock)
            sock.close()
        metrics = httpx.get(f"{live.url}/metrics").text
        assert metric_value(metrics, "upgrader_connections_refused_total", reason="header_timeout") == 2
        assert metric_value(metrics, "upgrader_connections_refused_total", reason="body_timeout") == 1
        # The abandoned request is counted as the client's doing (499), not as a server error.
        assert metric_value(metrics, "upgrader_requests_total", model="conv", status="499") == 1
        assert "status=\"500\"" not in metrics
        # A keep-alive connection's next request gets its own header deadline.
        keep = connect(live.url)
        keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(keep)[0] == 200
        keep.sendall(b"GET /heal")
        assert read_response(keep)[0] == 408
        keep.close()


def test_a_large_body_waiting_for_admission_is_not_timed_out_for_our_slowness(store, pngs):
    """Past 64 KB uvicorn stops reading until the app asks; while the app lets it wait in line, the body clock does not run."""
    with LiveServer(store=store.root, poll_interval_s=60, max_active_images=1, max_waiting_requests=4, body_timeout_s=0.5,
                    max_wait_ms=2000, idle_dispatch=False) as live:
        padded = [padded_png(png, 16_000) for png in pngs[:64]]  # real 8x8 PNGs with a 16 KB text chunk each
        small, large = multipart_body(pngs[:2]), multipart_body(padded)
        assert len(large) > 1_000_000  # more than one read of the socket, more than uvicorn buffers before pausing
        first = connect(live.url)
        first.sendall(multipart_head(live.url, small) + small)  # holds the slot ~2 s (the batching window)
        time.sleep(0.3)
        second = connect(live.url)
        second.sendall(multipart_head(live.url, large) + large)  # sent whole at once, read only when admitted
        for sock, count in ((first, 2), (second, 64)):
            status, _, answer = read_response(sock)
            assert status == 200, answer
            assert len(json.loads(answer)["images"]) == count
            sock.close()


def test_many_half_sent_requests_are_closed_and_health_answers_meanwhile(store):
    with LiveServer(store=store.root, poll_interval_s=60, header_timeout_s=1.0) as live:
        socks = []
        for _ in range(300):
            sock = connect(live.url)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
        with httpx.Client(base_url=live.url, timeout=30) as client:
            assert all(client.get("/healthz").status_code == 200 for _ in range(5))
        for sock in socks:
            assert read_response(sock)[0] == 408 and closed_by_server(sock)
            sock.close()


def test_connections_beyond_the_cap_get_503_and_are_closed(store):
    with LiveServer(store=store.root, poll_interval_s=60, max_connections=3) as live:
        held = [connect(live.url) for _ in range(3)]
        time.sleep(0.2)
        extra = connect(live.url)
        status, headers, answer = read_response(extra)
        assert status == 503 and headers["retry-after"] and json.loads(answer)["error"]["code"] == "too_many_connections"
        assert closed_by_server(extra)
        for sock in held:
            sock.close()
        time.sleep(0.2)
        metrics = httpx.get(f"{live.url}/metrics").text  # room again
        assert metric_value(metrics, "upgrader_connections_refused_total", reason="too_many_connections") == 1


# ---- oversized bodies -------------------------------------------------------------------------------
def test_ten_million_empty_json_strings_are_refused_from_the_first_chunks(store):
    """30 MB announced; the 413 comes back after the first megabyte, before the rest is even sent."""
    body = b'{"images": [' + b",".join([b'""'] * 10_000_000) + b"]}"
    with LiveServer(store=store.root, poll_interval_s=60) as live:
        sock = connect(live.url)
        sock.sendall((f"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                     + body[: 1 << 20])
        status, _, answer = read_response(sock)
        assert status == 413 and json.loads(answer)["error"]["code"] == "too_many_images"
        sock.close()
        assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_json_within_the_limits_still_works_and_a_raw_image_is_capped_from_its_length(store, pngs):
    with LiveServer(store=store.root, poll_interval_s=60, max_images_per_request=4) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        encoded = [base64.b64encode(p).decode() for p in pngs[:4]]
        response = client.post("/upscale", json={"images": encoded, "references": None})
        assert response.status_code == 200 and len(response.json()["images"]) == 4
        assert_error(client.post("/upscale", json={"images": encoded + encoded[:1]}), 413, "too_many_images", 4)
        assert_error(client.post("/upscale", content=b"\x89PNG" + b"\0" * 70_000, headers={"content-type": "image/png"}),
                     413, "image_too_large", 0)


# ---- defects ----------------------------------------------------------------------------------------
def test_versions_are_ascii_digits_or_aliases(store):
    with LiveServer(store=store.root, poll_interval_s=60, admin_token="admin-secret") as live, httpx.Client(base_url=live.url) as client:
        assert client.get("/models/conv/versions/1").status_code == 200
        for version in ("%C2%B2", "%D9%A1", "%EF%BC%91"):  # superscript two, Arabic-Indic one, fullwidth one
            assert_error(client.get(f"/models/conv/versions/{version}"), 404, "version_not_found")
        for version in ("²", "١"):
            assert_error(client.put("/models/conv/aliases/stable", json={"version": version}, headers=ADMIN), 404, "version_not_found")
        assert_error(client.post("/upscale?version=%C2%B2", files=multipart([b"x"])), 422, "invalid_parameter")


def test_admin_token_is_checked_before_the_body(store):
    with LiveServer(store=store.root, poll_interval_s=60, admin_token="admin-secret") as live, httpx.Client(base_url=live.url) as client:
        for body in (b"{not json", b"", b'{"version": [1, 2]}'):
            assert_error(client.put("/models/conv/aliases/stable", content=body, headers={"content-type": "application/json"}),
                         401, "unauthorized")
        assert_error(client.put("/models/conv/aliases/stable", content=b"{not json", headers=ADMIN), 400, "invalid_json")
        assert_error(client.put("/models/conv/aliases/stable", json={"versio": 1}, headers=ADMIN), 422, "invalid_body")
    with LiveServer(store=store.root, poll_interval_s=60) as live:
        assert_error(httpx.put(f"{live.url}/models/conv/aliases/stable", content=b"{not json"), 403, "admin_disabled")


def test_metadata_and_refusals_carry_no_host_paths(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", seed=1)
    # A manifest recording the trainer's host directories, as trainer/train.py does in `args`.
    version, _ = publish(store, "conv", seed=2)
    manifest_path = store.root / "conv" / str(version) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["args"].update(data=str(tmp_path / "datasets" / "cifar10-jpeg"), cache=str(tmp_path / ".cache"), store=str(store.root))
    manifest["recipe"]["checkpoint_dir"] = str(tmp_path / "checkpoints")
    manifest_path.write_text(json.dumps(manifest))  # weights unchanged: still verifies (the sha256 covers the weights)
    broken, _ = publish(store, "conv", seed=3)
    (store.root / "conv" / str(broken) / WEIGHTS_FILE).write_bytes(b"not safetensors")  # refused, with a reason
    with LiveServer(store=store.root, poll_interval_s=60) as live, httpx.Client(base_url=live.url) as client:
        answers = [client.get(path) for path in ("/models", "/models/conv", f"/models/conv/versions/{version}",
                                                  f"/models/conv/versions/{broken}")]
        answers.append(client.post(f"/upscale?version={broken}", files=multipart([b"x"])))
        assert answers[2].status_code == 200 and answers[2].json()["manifest"]["args"]["data"] == "cifar10-jpeg"
        assert answers[3].json()["status"] == "failed" and answers[3].json()["error"]
        assert answers[4].status_code == 503
        for response in answers:
            assert str(tmp_path) not in response.text, response.text[:500]


def test_a_huge_unknown_path_gets_a_short_answer(store):
    with LiveServer(store=store.root, poll_interval_s=60) as live, httpx.Client(base_url=live.url) as client:
        path = "/" + "a" * 65_000
        response = client.get(path)
        assert_error(response, 404, "not_found")
        assert len(response.content) < 1000
        response = client.get("/models/" + "b" * 65_000)
        assert_error(response, 404, "model_not_found")
        assert len(response.content) < 1000


def test_helper_and_inference_threads_run_below_the_event_loop(store, pngs):
    """In an overload herd the event loop admits or refuses; the threads doing admitted work yield it the CPU."""
    import os
    import threading

    # The default setting: every server of this test process uses it, and their threads are all in the list below.
    with LiveServer(store=store.root, poll_interval_s=60) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        answer = client.post("/upscale", files=multipart(pngs[:32]))  # a body over 4 KB: parsed and decoded on the helper thread
        assert answer.status_code == 200
        loop_nice = os.getpriority(os.PRIO_PROCESS, live.thread.native_id)
        helpers = [t for t in threading.enumerate() if t.name.startswith("AnyIO worker thread")]
        inference = [t for t in threading.enumerate() if t.name.startswith("infer-conv:1")]
        assert helpers and inference
        for thread in helpers + inference:
            assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == loop_nice + live.app.state.settings.thread_nice == loop_nice + 10, thread.name


def test_a_refusal_built_from_its_cached_framing_is_the_full_answer_with_its_own_request_id():
    """Refusal.raw reuses the body and the header lines around the request id while they hold (service.server): each
    answer still has its own id, today's default headers (uvicorn swaps the list each second) and the current state."""
    from service.metrics import Metrics
    from service.server import Refusal
    from service.settings import Settings

    admission = Admission(max_images=64, max_waiting=0, retry_after_s=3)
    refusal = Refusal(admission, Metrics(), Settings(retry_after_s=3))

    def parse(raw: bytes) -> tuple[str, dict[str, str], dict]:
        head, _, body = raw.partition(b"\r\n\r\n")
        status, *lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        assert int(headers["content-length"]) == len(body)
        return status, headers, json.loads(body)

    monday = [(b"date", b"Mon, 23 Nov 2026 10:00:00 GMT"), (b"server", b"uvicorn")]
    first, second = (parse(refusal.raw(monday, True)) for _ in range(2))
    assert first[0] == second[0] == "HTTP/1.1 503 Service Unavailable"
    assert first[1]["x-request-id"] != second[1]["x-request-id"]
    assert first[1]["retry-after"] == "3" and first[1]["date"] == "Mon, 23 Nov 2026 10:00:00 GMT" and "connection" not in first[1]
    assert first[2] == second[2] and first[2]["error"]["message"] == "0 of 64 images at work and 0 requests waiting on this worker; retry later"
    later = [(b"date", b"Mon, 23 Nov 2026 10:00:01 GMT"), (b"server", b"uvicorn")]
    admission.in_use = 64  # the worker's state changes: a full budget at work
    status, headers, body = parse(refusal.raw(later, False))
    assert headers["date"] == "Mon, 23 Nov 2026 10:00:01 GMT" and headers["connection"] == "close"
    assert body["error"]["message"].startswith("64 of 64 images at work")
    assert parse(refusal.raw(later, True))[1].keys() == first[1].keys()
