"""The Open Inference Protocol (KServe V2) over a real uvicorn, spoken by the real tritonclient.http."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from test_service_support import (
    LiveServer,
    assert_close_to,
    decode_png,
    expected_outputs,
    metric_value,
    outputs_of,
    png_bytes,
    png_list,
    publish,
    small_inputs,
    v2_request,
)
from tritonclient.utils import InferenceServerException

from model_store import ModelStore

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)  # the real test images reduced to 8x8, uint8 N x 3 x 8 x 8
pngs = pytest.fixture(scope="module", name="pngs")(png_list)


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.fixture(scope="module")
def live(tmp_path_factory, models):
    """conv versions 1 and 2 (alias stable -> 1) and fc version 1."""
    store = ModelStore(tmp_path_factory.mktemp("oip") / "store")
    _, models[1] = publish(store, "conv", seed=1, psnr=23.0)
    _, models[2] = publish(store, "conv", seed=2, psnr=23.0)
    _, models["fc"] = publish(store, "fc", "fc", seed=3, psnr=19.0)
    store.set_alias("conv", "stable", 1)
    with LiveServer(store=store.root, poll_interval_s=60, max_images_per_request=16, max_queue_images=64) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    client = triton.InferenceServerClient(live.url.removeprefix("http://"))
    yield client
    client.close()


def pixels_input(images: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def images_input(blobs: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(blobs)], "BYTES")
    data = blobs if binary else [base64.b64encode(blob) for blob in blobs]  # JSON carries BYTES as strings: base64
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return tensor


def outputs(*names: str, binary: bool = True) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in names]


def raises(status: int, *fragments: str):
    """The call fails with this HTTP status and a protocol error message containing `fragments`."""

    class Check:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            assert kind is InferenceServerException, f"expected HTTP {status}, got {kind}"
            assert exc.status() == str(status), (exc.status(), exc.message())
            for fragment in fragments:
                assert fragment in exc.message(), exc.message()
            return True

    return Check()


# ---- health and metadata ---------------------------------------------------------------
def test_server_health_and_metadata(live, client):
    assert client.is_server_live() and client.is_server_ready()
    # The bodies KServe's servers send (its SDK reads them; tritonclient looks at the status only).
    assert httpx.get(live.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(live.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(live.url + "/v2/models/conv/ready").json() == {"name": "conv", "ready": True}
    assert httpx.get(live.url + "/v2/models/conv/versions/1/ready").json() == {"name": "conv", "ready": True}
    metadata = client.get_server_metadata()
    assert metadata["name"] == "upgrader" and "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_describes_real_tensors_and_versions(client):
    metadata = client.get_model_metadata("conv")
    assert metadata["name"] == "conv" and metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 3, 8, 8]}]
    assert metadata["outputs"] == [{"name": "output", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}]
    assert client.get_model_metadata("conv", "stable")["versions"] == ["1"]
    assert client.get_model_metadata("conv", "latest")["versions"] == ["2"]
    config = client.get_model_config("conv")
    assert config["max_batch_size"] == 16 and [i["dims"] for i in config["input"]] == [[3, 8, 8]]


def test_model_readiness(client):
    assert client.is_model_ready("conv") and client.is_model_ready("conv", "1") and client.is_model_ready("conv", "stable")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("conv", "9")


# ---- inference -----------------------------------------------------------------------
def test_binary_tensors_give_the_models_outputs(client, models, inputs):
    images = inputs[:5].numpy()
    result = client.infer("conv", [pixels_input(images)], outputs=outputs("output"))
    assert result.get_response()["model_name"] == "conv" and result.get_response()["model_version"] == "2"
    got = result.as_numpy("output")
    assert got.dtype == np.uint8 and got.shape == (5, 3, 32, 32)
    assert_close_to(torch_of(got), expected_outputs(models[2], inputs[:5]))


def test_json_tensors_give_the_same_outputs(client, models, inputs):
    images = inputs[5:8].numpy()
    result = client.infer("conv", [pixels_input(images, binary=False)], outputs=outputs("output", binary=False), request_id="r-7")
    response = result.get_response()
    assert response["id"] == "r-7" and "binary_data_size" not in json.dumps(response)
    assert_close_to(torch_of(result.as_numpy("output").reshape(3, 3, 32, 32)), expected_outputs(models[2], inputs[5:8]))


def test_default_output_is_binary_pixels_and_pngs_come_when_named(client, models, inputs):
    result = client.infer("conv", [pixels_input(inputs[:2].numpy())])  # no outputs named: the metadata's, binary
    assert [o["name"] for o in result.get_response()["outputs"]] == ["output"] and result.as_numpy("png") is None
    result = client.infer("conv", [pixels_input(inputs[:2].numpy())], outputs=outputs("output", "png"))
    pixels, files = result.as_numpy("output"), result.as_numpy("png")
    assert files.shape == (2,)
    for i in range(2):
        assert np.array_equal(decode_png(files[i]).numpy(), pixels[i])


def test_encoded_images_in_and_pngs_out(client, models, inputs, pngs):
    for binary in (True, False):
        result = client.infer("conv", [images_input(pngs[8:12], binary)], outputs=outputs("png", binary=binary))
        files = result.as_numpy("png")
        blobs = [bytes(f) for f in files] if binary else [base64.b64decode(f) for f in files]
        got = np.stack([decode_png(blob).numpy() for blob in blobs])
        assert_close_to(torch_of(got), expected_outputs(models[2], inputs[8:12]))


def test_versions_and_aliases(client, models, inputs):
    images = inputs[:4].numpy()
    for version, model in (("1", models[1]), ("2", models[2]), ("stable", models[1]), ("latest", models[2])):
        result = client.infer("conv", [pixels_input(images)], model_version=version, outputs=outputs("output"))
        assert result.get_response()["model_version"] == ("1" if model is models[1] else "2")
        assert_close_to(torch_of(result.as_numpy("output")), expected_outputs(model, inputs[:4]))
    result = client.infer("fc", [pixels_input(images)], outputs=outputs("output"))
    assert_close_to(torch_of(result.as_numpy("output")), expected_outputs(models["fc"], inputs[:4]))


def test_concurrent_clients_each_get_their_own_outputs(live, models, inputs):
    errors, done = [], []

    def one(start: int) -> None:
        try:
            with_client = triton.InferenceServerClient(live.url.removeprefix("http://"))
            for _ in range(3):
                result = with_client.infer("conv", [pixels_input(inputs[start : start + 2].numpy())], outputs=outputs("output"))
                assert_close_to(torch_of(result.as_numpy("output")), expected_outputs(models[2], inputs[start : start + 2]))
            with_client.close()
            done.append(start)
        except Exception as exc:  # surfaced below with the start index
            errors.append((start, exc))

    threads = [threading.Thread(target=one, args=(2 * i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(done) == 8, errors


def test_requests_are_counted_in_the_service_metrics(live, client, inputs):
    before = metric_value(httpx.get(live.url + "/metrics").text, "upgrader_images_served_total", model="conv")
    client.infer("conv", [pixels_input(inputs[:3].numpy())])
    after = metric_value(httpx.get(live.url + "/metrics").text, "upgrader_images_served_total", model="conv")
    assert after == before + 3


# ---- errors ----------------------------------------------------------------------------
def test_unknown_model_and_version_are_404(client, inputs):
    with raises(404, "model 'nope' not found"):
        client.infer("nope", [pixels_input(inputs[:1].numpy())])
    with raises(404, "no version or alias '7'"):
        client.infer("conv", [pixels_input(inputs[:1].numpy())], model_version="7")
    with raises(404, "model 'nope'"):
        client.get_model_metadata("nope")


def test_bad_names_datatypes_and_shapes_are_400(client, inputs, pngs):
    images = inputs[:2].numpy()
    wrong_name = triton.InferInput("pixels", [2, 3, 8, 8], "UINT8")
    wrong_name.set_data_from_numpy(images)
    with raises(400, "unknown input 'pixels'"):
        client.infer("conv", [wrong_name])
    as_float = triton.InferInput("input", [2, 3, 8, 8], "FP32")
    as_float.set_data_from_numpy(images.astype(np.float32))
    with raises(400, "input 'input' is UINT8, not FP32"):
        client.infer("conv", [as_float])
    with raises(400, "shape [2, 3, 4, 16] is not [N, 3, 8, 8]"):
        client.infer("conv", [pixels_input(images.reshape(2, 3, 4, 16))])
    with raises(400, "unknown output 'upscaled'"):
        client.infer("conv", [pixels_input(images)], outputs=outputs("upscaled"))
    with raises(400, "send exactly one"):
        client.infer("conv", [pixels_input(images), images_input(pngs[:2])])
    with raises(400, "input 'image'", "image 1 has a truncated or corrupt header"):
        client.infer("conv", [images_input([pngs[0], pngs[1][:30]])])
    with raises(422, "image 0 is 32x32; it must be 8x8"):
        client.infer("conv", [images_input([_png_32()])])
    with raises(413, "17 images in one request; the limit is 16"):
        client.infer("conv", [pixels_input(np.zeros((17, 3, 8, 8), np.uint8))])


def test_malformed_bodies_are_400_in_the_protocol_shape(live):
    url = live.url + "/v2/models/conv/infer"
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "UINT8", "parameters": {"binary_data_size": 192}}]}).encode()
    cases = {
        "short binary": (header + bytes(100), {"Inference-Header-Content-Length": str(len(header))}, "runs past the end"),
        "extra bytes": (header + bytes(200), {"Inference-Header-Content-Length": str(len(header))}, "after the last binary tensor"),
        "header past body": (header, {"Inference-Header-Content-Length": str(len(header) + 5)}, "body has only"),
        "not json": (b"{oops", {}, "not valid JSON"),
        "unknown input field": (b'{"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": [], "colour": 1}]}',
                                {}, "colour"),
        "no data": (b'{"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "UINT8"}]}', {}, "neither data nor"),
        "too few values": (b'{"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": [1, 2]}]}', {}, "2 values"),
        "out of range": (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": [256] * 192}]}).encode(),
                         {}, "outside the UINT8 range"),
        "empty batch": (b'{"inputs": [{"name": "input", "shape": [0, 3, 8, 8], "datatype": "UINT8", "data": []}]}', {}, "at least one"),
        "bad encoding": (b"{}", {"Content-Encoding": "br"}, "not supported"),
    }
    for what, (body, headers, fragment) in cases.items():
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code in (400, 415), (what, response.status_code, response.text)
        assert set(response.json()) == {"error"} and fragment in response.json()["error"], (what, response.text)
    assert httpx.get(live.url + "/v2/models/conv/versions/..%2Fx").status_code in (400, 404)
    assert httpx.get(live.url + "/v2/nothing-here").json() == {"error": "no route GET '/v2/nothing-here'"}


def test_unknown_top_level_fields_are_ignored(live, models, inputs):
    """KServe's SDK repeats the model's name and version in the body; other servers ignore such fields, and so does this one."""
    images = inputs[:2].numpy()
    body = {"model_name": "conv", "model_version": "2", "colour": 1,
            "inputs": [{"name": "input", "shape": [2, 3, 8, 8], "datatype": "UINT8", "data": images.reshape(-1).tolist()}]}
    response = httpx.post(live.url + "/v2/models/conv/infer", json=body)
    assert response.status_code == 200, response.text
    got = np.array(response.json()["outputs"][0]["data"], np.uint8).reshape(2, 3, 32, 32)
    assert_close_to(torch_of(got), expected_outputs(models[2], inputs[:2]))


def run_kserve_client(transport: str, url: str, images: np.ndarray, tmp_path, *flags: str) -> tuple[dict, np.ndarray | None]:
    """KServe's SDK in its own process (tests/kserve_client.py says why) -> (its report, the output tensor)."""
    np.save(tmp_path / "in.npy", images)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("kserve_client.py")), transport, url, "conv",
                           str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report, (np.load(tmp_path / "out.npy") if "error" not in report else None)


def upscale_pixels(url: str, images: np.ndarray, model: str = "conv", version: str = "latest") -> np.ndarray:
    """What POST /upscale answers for the same pixels (sent as PNGs): uint8 N x 3 x 32 x 32."""
    files = [("images", (f"{i}.png", png_bytes(image.transpose(1, 2, 0)), "image/png")) for i, image in enumerate(images)]
    response = httpx.post(f"{url}/upscale?model={model}&version={version}", files=files, timeout=60)
    return outputs_of(response).numpy()


def test_kserve_sdk_over_rest_gets_what_upscale_gives(live, models, inputs, tmp_path):
    images = inputs[:4].numpy()
    report, got = run_kserve_client("rest", live.url, images, tmp_path)
    assert report["live"] is True and report["ready"] is True and report["model_ready"] is True
    assert (report["model_name"], report["id"]) == ("conv", "kserve-1")  # the SDK's REST parser drops model_version
    assert (report["output"], report["datatype"], report["shape"]) == ("output", "UINT8", [4, 3, 32, 32])
    assert np.array_equal(got, upscale_pixels(live.url, images))
    report, got = run_kserve_client("rest", live.url, images, tmp_path, "--bad-dtype")
    assert "input 'input' is UINT8, not INT32" in report["error"], report


def test_gzip_bodies_are_accepted(client, models, inputs):
    result = client.infer("conv", [pixels_input(inputs[:2].numpy())], outputs=outputs("output"), request_compression_algorithm="gzip")
    assert_close_to(torch_of(result.as_numpy("output")), expected_outputs(models[2], inputs[:2]))


def test_api_keys_and_queue_full(tmp_path, inputs):
    """A tight server: API keys required, room for one waiting request: a burst gets 503 + Retry-After, never a wrong answer."""
    store = ModelStore(tmp_path / "store")
    _, model = publish(store, "conv", seed=1)
    with LiveServer(store=store.root, api_keys="k1", max_images_per_request=4, max_queue_images=4) as server:
        address = server.url.removeprefix("http://")
        images = inputs[:4].numpy()
        with triton.InferenceServerClient(address) as client:
            with raises(401, "API key"):
                client.infer("conv", [pixels_input(images)])
            assert client.is_server_live()  # health and metadata need no key
        expected = expected_outputs(model, inputs[:4])
        refused, failures = [], []

        def one() -> None:
            with triton.InferenceServerClient(address) as client:
                try:
                    result = client.infer("conv", [pixels_input(images)], headers={"Authorization": "Bearer k1"})
                    assert_close_to(torch_of(result.as_numpy("output")), expected)
                except InferenceServerException as exc:
                    (refused if exc.status() == "503" and "queue is full" in exc.message() else failures).append(exc)
                except AssertionError as exc:
                    failures.append(exc)

        for _ in range(20):  # a burst: one batch runs, one request waits, the others find the queue full
            threads = [threading.Thread(target=one) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            if refused or failures:
                break
        assert not failures and refused, (failures, "no burst ever filled the queue")
        response = httpx.post(server.url + "/v2/models/conv/infer", headers={"X-API-Key": "k1"},
                              json={"inputs": [{"name": "input", "shape": [5, 3, 8, 8], "datatype": "UINT8", "data": [0] * 960}]})
        assert response.status_code == 413 and set(response.json()) == {"error"}


def test_deadline_is_504(tmp_path, inputs):
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", seed=1)
    with LiveServer(store=store.root, request_timeout_s=0.001) as server:  # spent before the batch can come back
        with triton.InferenceServerClient(server.url.removeprefix("http://")) as client:
            with raises(504, "not inferred within"):
                client.infer("conv", [pixels_input(inputs[:4].numpy())])


def _png_32() -> bytes:
    from test_service_support import png_bytes

    return png_bytes(np.zeros((32, 32, 3), np.uint8))


def torch_of(array: np.ndarray):
    import torch

    return torch.from_numpy(np.array(array))  # a writable copy


def test_a_compressed_body_never_inflates_past_the_body_limit(live):
    import gzip

    bomb = gzip.compress(b"\0" * (33 * 1024 * 1024))  # ~33 KB on the wire, over the 32 MiB limit inflated
    response = httpx.post(live.url + "/v2/models/conv/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "inflates past the body limit" in response.json()["error"]
    response = httpx.post(live.url + "/v2/models/conv/infer", content=bomb[:-20], headers={"Content-Encoding": "gzip"})
    assert response.status_code in (400, 413) and set(response.json()) == {"error"}


# ---- the protocol's own lane (service.infer_lane) ------------------------------------------------------------
def read_answers(sock, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    stream = sock.makefile("rb")
    answers = []
    for _ in range(count):
        status = int(stream.readline().split()[1])
        headers = dict(line.decode("latin-1").strip().lower().split(": ", 1) for line in iter(stream.readline, b"\r\n"))
        answers.append((status, headers, stream.read(int(headers["content-length"]))))
    return answers


def test_the_protocols_own_lane_answers_as_the_asgi_path_does(live, inputs, models, caplog):
    """Plain keep-alive requests are answered by the protocol (service.infer_lane), others through ASGI: the same
    bytes either way; pipelined requests are answered in order; a client that leaves does not upset the server."""
    import socket

    import logging

    access_log = logging.getLogger("service.access")
    access_log.addHandler(caplog.handler)  # it may not propagate to the root (service.observability.logs.configure_logging)
    caplog.handler.setLevel(logging.INFO)
    level = access_log.level
    access_log.setLevel(logging.INFO)  # setLevel, not .level =: it clears the logger's cached isEnabledFor answers
    disabled, access_log.disabled = access_log.disabled, False  # a logging.config call elsewhere in the suite may have disabled it
    images = inputs[:3].numpy()
    host, port = live.url.removeprefix("http://").split(":")
    expected = expected_outputs(models[2], inputs[:3])
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(v2_request("/v2/models/conv/infer", images, "X-Request-ID: lane-1\r\n")  # the lane
                     + v2_request("/v2/models/conv/infer?via=asgi", images)  # a query string: the ASGI way (pipelined behind the first)
                     + v2_request("/v2/models/conv/versions/stable/infer", images)  # the lane again, once the second is answered
                     + v2_request("/v2/models/nope/infer", images))  # an error, in the protocol's form
        (lane, lane_headers, lane_body), (asgi, asgi_headers, asgi_body), (stable, stable_headers, stable_body), (missing, _, missing_body) = read_answers(sock, 4)
    assert (lane, asgi, stable, missing) == (200, 200, 200, 404)
    assert lane_headers["x-request-id"] == "lane-1" and asgi_headers["x-request-id"] != "lane-1"
    assert lane_body == asgi_body  # the same answer, byte for byte
    for headers in (lane_headers, asgi_headers):
        assert headers["content-type"] == "application/octet-stream" and "date" in headers
    length = int(lane_headers["inference-header-content-length"])
    document = json.loads(lane_body[:length])
    assert document["model_version"] == "2" and document["outputs"][0]["shape"] == [3, 3, 32, 32]
    assert_close_to(torch_of(np.frombuffer(lane_body[length:], np.uint8).reshape(3, 3, 32, 32)), expected)
    assert json.loads(stable_body[: int(stable_headers["inference-header-content-length"])])["model_version"] == "1"
    assert "nope" in json.loads(missing_body)["error"]
    access_log.removeHandler(caplog.handler)
    access_log.setLevel(level)
    access_log.disabled = disabled
    records = {id(r): r for r in caplog.records}.values()  # a record can reach the handler twice (here and via the root)
    access = [(r.path, r.status) for r in records if r.name == "service.access"]
    # An access line each: the first request (the lane) and the second (ASGI) log the same path and status.
    assert access.count(("/v2/models/conv/infer", 200)) == 2 and ("/v2/models/nope/infer", 404) in access
    # A client that sends its request and leaves before the answer: the server carries on.
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(v2_request("/v2/models/conv/infer", images))
    with triton.InferenceServerClient(live.url.removeprefix("http://")) as client:
        result = client.infer("conv", [pixels_input(images)], outputs=outputs("output"))
        assert_close_to(torch_of(result.as_numpy("output")), expected)


def test_photo_models_take_any_size_over_rest_and_grpc_as_upscale_does(tmp_path):
    """A photo model declares UINT8 [-1, 3, -1, -1]; a 256x256 photo through the OIP (pixels or an encoded image, REST
    or gRPC) gives /upscale?model=photo's pixels."""
    import socket

    import tritonclient.grpc as triton_grpc
    from test_service_wholeimage import publish_photo

    def pixels_of(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            return np.asarray(image.convert("RGB")).transpose(2, 0, 1)

    decode_png = pixels_of
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", seed=1)
    publish_photo(store)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    photo = np.random.default_rng(5).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    photo[64:192] = photo[64:192] // 4 + 96  # some structure besides noise
    encoded = png_bytes(photo)
    with LiveServer(store=store.root, poll_interval_s=60, grpc_port=grpc_port) as live:
        served = httpx.post(f"{live.url}/upscale?model=photo", content=encoded,
                            headers={"content-type": "image/png", "accept": "image/png"}, timeout=120)
        assert served.status_code == 200, served.text
        expected = decode_png(served.content)  # uint8 3 x 1024 x 1024
        assert expected.shape == (3, 1024, 1024)
        pixels = np.ascontiguousarray(photo.transpose(2, 0, 1))[None]
        with triton.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=120) as rest:
            metadata = rest.get_model_metadata("photo")
            assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 3, -1, -1]}]
            assert metadata["outputs"] == [{"name": "output", "datatype": "UINT8", "shape": [-1, 3, -1, -1]}]
            assert rest.get_model_config("photo")["input"][0]["dims"] == [3, -1, -1]
            assert rest.get_model_metadata("conv")["inputs"][0]["shape"] == [-1, 3, 8, 8]  # an 8x8 model stays as it is
            answer = rest.infer("photo", [pixels_input(pixels)], outputs=outputs("output"))
            assert np.array_equal(answer.as_numpy("output")[0], expected)
            answer = rest.infer("photo", [images_input([encoded])], outputs=outputs("png"))
            assert np.array_equal(decode_png(answer.as_numpy("png")[0]), expected)
            # Photos of different sizes come back as PNGs; as one pixel tensor they cannot: the error says so.
            small = png_bytes(photo[:40, :48])
            answer = rest.infer("photo", [images_input([small, encoded])], outputs=outputs("png"))
            assert [decode_png(p).shape for p in answer.as_numpy("png")] == [(3, 160, 192), (3, 1024, 1024)]
            with raises(400, "different sizes", "'png'"):
                rest.infer("photo", [images_input([small, encoded])], outputs=outputs("output"))
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as grpc_client:
            assert grpc_client.get_model_metadata("photo", as_json=True)["inputs"][0]["shape"] == ["-1", "3", "-1", "-1"]
            tensor = triton_grpc.InferInput("input", list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels)
            answer = grpc_client.infer("photo", [tensor], client_timeout=120)
            assert np.array_equal(answer.as_numpy("output")[0], expected)
            tensor = triton_grpc.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([encoded], dtype=np.object_))
            answer = grpc_client.infer("photo", [tensor], outputs=[triton_grpc.InferRequestedOutput("png")], client_timeout=120)
            assert np.array_equal(decode_png(answer.as_numpy("png")[0]), expected)


def test_json_integer_tensors_take_integral_numbers_and_refuse_fractions(live, models, inputs):
    """Generated OIP clients write numbers as floats: 3.0 is 3 for UINT8; 3.5 is refused, naming the input and element."""
    images = inputs[:2].numpy()
    as_floats = [float(v) for v in images.reshape(-1)]
    response = httpx.post(f"{live.url}/v2/models/conv/versions/1/infer",
                          json={"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "UINT8", "data": as_floats}]})
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    pixels = np.array(output["data"], dtype=np.uint8).reshape(output["shape"])
    assert_close_to(torch_of(pixels), expected_outputs(models[1], inputs[:2]))
    as_floats[7] = 3.5
    response = httpx.post(f"{live.url}/v2/models/conv/versions/1/infer",
                          json={"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "UINT8", "data": as_floats}]})
    assert response.status_code == 400
    assert response.json() == {"error": "input 'input': UINT8 data must be integers; element 7 is 3.5"}
