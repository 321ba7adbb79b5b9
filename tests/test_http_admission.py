"""service.http: admission (overload refused before it costs work), clients that leave, oversized and hostile requests.

Everything runs against a real uvicorn on loopback (LiveServer: the app as `python -m service` serves it)
with a real store; clients are raw sockets where a test needs to send part of a request and stop. Slow
clients and the connection cap are the proxy's: tests/test_http_proxy.py.
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
from service.runtime.admission import Admission
from service.runtime.cancellation import ClientGone, ClientLeft

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


def test_one_admission_refuses_v2_infer_from_its_headers_and_grpc_before_its_message(store, pngs, inputs):
    """While /upscale holds the only slot and one request waits, a /v2 infer is refused from its headers (503, the
    protocol's error shape) and a gRPC ModelInfer with UNAVAILABLE and retry-after; once the slot frees, both serve."""
    import socket as sockets

    import grpc
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    with LiveServer(store=store.root, poll_interval_s=60, max_active_images=1, max_waiting_requests=1, grpc_port=grpc_port) as live:
        body = multipart_body(pngs[:4])
        a = connect(live.url)  # the only slot, its body stalled halfway
        a.sendall(multipart_head(live.url, body) + body[: len(body) // 2])
        time.sleep(0.3)
        images = inputs[:2].numpy()
        v2 = v2_request("/v2/models/conv/infer", images)
        b = connect(live.url)  # the one place in line: a /v2 request, its body sent whole and read once it is let in
        b.sendall(v2)
        time.sleep(0.3)
        c = connect(live.url)
        c.sendall(v2[: v2.index(b"\r\n\r\n") + 4])  # its headers alone: the refusal needs no body
        status, headers, answer = read_response(c)
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert set(json.loads(answer)) == {"error"} and "images at work" in json.loads(answer)["error"]
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = triton_grpc.InferInput("input", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            with pytest.raises(InferenceServerException) as refused:
                client.infer("conv", [tensor])
            assert refused.value.status() == "StatusCode.UNAVAILABLE" and "images at work" in refused.value.message()
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
            from service.grpc import messages
            request_class, response_class = messages.METHODS["ModelInfer"]
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=request_class.SerializeToString,
                                       response_deserializer=response_class.FromString)
            with pytest.raises(grpc.RpcError) as bare:
                call(request_class(model_name="conv"), timeout=10)
            assert bare.value.code() == grpc.StatusCode.UNAVAILABLE
            assert int(dict(bare.value.trailing_metadata())["retry-after"]) >= 1
            channel.close()
            a.sendall(body[len(body) // 2 :])
            for sock in (a, b):
                assert read_response(sock)[0] == 200
            assert client.infer("conv", [tensor]).as_numpy("output").shape == (2, 3, 32, 32)  # served once there is room
        c.close()
        for sock in (a, b):
            sock.close()
        assert metric_value(httpx.get(f"{live.url}/metrics").text, "upgrader_requests_total", model="-", status="503") >= 3


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


def test_refused_requests_pipelined_dribbled_or_chunked_keep_the_connection_in_step(store, pngs):
    """Refusals answered from the headers keep their order among pipelined requests; a head sent a byte at a time, a chunked
    body and two Content-Lengths are judged by uvicorn's parser, and each connection serves its next request."""
    with LiveServer(store=store.root, poll_interval_s=60, max_active_images=1, max_waiting_requests=0, max_wait_ms=5000,
                    idle_dispatch=False) as live:
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
        # A chunked body: refused all the same, the connection in step.
        chunked = connect(live.url)
        head = multipart_head(live.url, body).replace(f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked")
        chunked.sendall(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [status for status, _ in read_responses(chunked, 2)] == [503, 200]
        # Two Content-Lengths (request smuggling): the parser refuses it, nothing guesses.
        smuggled = connect(live.url)
        smuggled.sendall(multipart_head(live.url, body).replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n") + body)
        assert read_response(smuggled)[0] == 400
        metrics = httpx.get(f"{live.url}/metrics").text
        assert metric_value(metrics, "upgrader_requests_total", model="-", status="503") == 4
        assert read_response(holder)[0] == 200
        for sock in (holder, pipelined, dribbled, chunked, smuggled):
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


def batch_count(url: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics").text, "upgrader_batch_images_count", model="conv")


def hold_the_batcher(url: str, pngs: list[bytes]):
    """A 256-image ensemble=8 request (one image a batch: 2,048 forwards) that keeps the batcher busy; -> (its socket,
    the batch count before it, the count once it started)."""
    before = batch_count(url)
    body = multipart_body(pngs * 4)
    stays = connect(url)
    stays.sendall(multipart_head(url, body).replace(b"/upscale", b"/upscale?ensemble=8") + body)
    started = wait_for(lambda: (count := batch_count(url)) > before and count, "the first batch")
    return stays, before, started


def test_a_client_that_leaves_has_its_queued_images_dropped_not_computed(store, pngs, inputs):
    """Images queued for clients that have closed their connection are never computed: not those of an /upscale
    request, nor those of /v2 requests (with a query string or without). The request that stays is served in full."""
    with LiveServer(store=store.root, poll_interval_s=60, max_batch_images=1) as live:
        stays, before, started = hold_the_batcher(live.url, pngs)
        leaver = connect(live.url)  # 16 images queued behind the 256, then the client leaves
        leaver.sendall(multipart_head(live.url, multipart_body(pngs[:16])) + multipart_body(pngs[:16]))
        v2_leaver = connect(live.url)  # 8 images over the Open Inference Protocol, then the client leaves
        v2_leaver.sendall(v2_request("/v2/models/conv/infer", inputs[:8].numpy()))
        query_leaver = connect(live.url)  # 4 more, with a query string, then the client leaves
        query_leaver.sendall(v2_request("/v2/models/conv/infer?via=query", inputs[:4].numpy()))
        batches = lambda: batch_count(live.url)  # noqa: E731
        wait_for(lambda: batches() >= started + 20, "20 more batches")  # long enough for all three to be decoded and queued
        for sock in (leaver, v2_leaver, query_leaver):
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

    async def scenario() -> None:
        admission = Admission(64, 2, 1)
        gone = ClientGone()
        holding, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with admission.slot(admission.weight(str(64 * 300), 256), wait_s=30):
                holding.set()
                await release.wait()

        async def waiter() -> None:
            async with admission.slot(admission.weight(str(64 * 300), 256), wait_s=30, gone=gone):
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
        with pytest.raises(ClientLeft):
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


def test_a_large_body_waiting_for_admission_is_read_once_admitted(store, pngs):
    """Past 64 KB uvicorn stops reading until the app asks: a large body sent whole waits in line unread, and is served."""
    with LiveServer(store=store.root, poll_interval_s=60, max_active_images=1, max_waiting_requests=4,
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


def test_connections_beyond_uvicorns_limit_get_503(store):
    """UPGRADER_MAX_CONNECTIONS is uvicorn's limit_concurrency: what reaches a worker past it is refused at once."""
    with LiveServer(store=store.root, poll_interval_s=60, max_connections=3) as live:
        held = [connect(live.url) for _ in range(3)]
        time.sleep(0.2)
        extra = connect(live.url)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(extra)[0] == 503
        for sock in (*held, extra):
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{live.url}/healthz").status_code == 200  # room again


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
