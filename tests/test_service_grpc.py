"""The Open Inference Protocol over gRPC on a real server, spoken by tritonclient.grpc, KServe's SDK and a bare channel."""

from __future__ import annotations

import ast
import importlib.util
import socket
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pb2
from test_service_oip import run_kserve_client, torch_of, upscale_pixels
from test_service_support import LiveServer, assert_close_to, decode_png, expected_outputs, metric_value, png_list, publish, small_inputs
from tritonclient.utils import InferenceServerException

from model_store import ModelStore
from service.grpc import messages

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)
pngs = pytest.fixture(scope="module", name="pngs")(png_list)
ModelInferRequest, _ = messages.METHODS["ModelInfer"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.fixture(scope="module")
def live(tmp_path_factory, models):
    """conv versions 1 and 2 (alias stable -> 1), gRPC on its own port; max_body_bytes bounds a gRPC message too."""
    store = ModelStore(tmp_path_factory.mktemp("grpc") / "store")
    _, models[1] = publish(store, "conv", seed=1, psnr=23.0)
    _, models[2] = publish(store, "conv", seed=2, psnr=23.0)
    store.set_alias("conv", "stable", 1)
    port = free_port()
    with LiveServer(store=store.root, grpc_port=port, poll_interval_s=60, max_images_per_request=16, max_queue_images=64,
                    max_body_bytes=64 * 1024) as server:
        server.grpc = f"127.0.0.1:{port}"
        yield server


@pytest.fixture(scope="module")
def client(live):
    client = triton.InferenceServerClient(live.grpc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(live):
    with grpc.insecure_channel(live.grpc) as channel:
        yield channel


def model_infer(channel, request, **kwargs):
    call = channel.unary_unary(f"/{messages.SERVICE}/ModelInfer", request_serializer=ModelInferRequest.SerializeToString,
                               response_deserializer=messages.ModelInferResponse.FromString)
    return call(request, **kwargs)


def pixels_input(images: np.ndarray, datatype: str = "UINT8", shape: list[int] | None = None) -> triton.InferInput:
    tensor = triton.InferInput("input", shape or list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


def fails(code: grpc.StatusCode, *fragments: str):
    """The call fails with this gRPC status and a message containing `fragments` (tritonclient's or grpc's error)."""

    class Check:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            assert kind is not None, f"expected {code.name}, the call succeeded"
            if isinstance(exc, InferenceServerException):
                status, message = exc.status(), exc.message()
            else:
                assert isinstance(exc, grpc.RpcError), exc
                status, message = f"StatusCode.{exc.code().name}", exc.details()
            assert status == f"StatusCode.{code.name}", (status, message)
            for fragment in fragments:
                assert fragment in message, message
            self.message = message
            return True

    return Check()


# ---- the proto --------------------------------------------------------------------------
def test_the_descriptor_is_compiled_from_the_proto_and_matches_kserves(tmp_path):
    out = tmp_path / "again.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{messages.PROTO.parent}", f"--descriptor_set_out={out}",
                    str(messages.PROTO)], check=True)
    assert out.read_bytes() == messages.DESCRIPTOR_SET.read_bytes()
    # The kserve wheel's generated module, read without importing it (its names would clash with tritonclient's).
    kserve_root = messages.Path(importlib.util.find_spec("kserve").origin).parent  # located, not imported
    source = (kserve_root / "protocol" / "grpc" / "grpc_predict_v2_pb2.py").read_text()
    serialized = next(ast.literal_eval(node.args[0]) for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile")
    theirs = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for proto in (theirs, ours):
        proto.ClearField("name")
        for message in proto.message_type:
            for nested in [message, *message.nested_type, *(n for m in message.nested_type for n in m.nested_type)]:
                for field in nested.field:
                    field.ClearField("json_name")
    assert ours == theirs


# ---- health and metadata ---------------------------------------------------------------
def test_health_and_metadata(live, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("conv") and client.is_model_ready("conv", "1") and client.is_model_ready("conv", "stable")
    assert not client.is_model_ready("nope") and not client.is_model_ready("conv", "9")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "upgrader" and "binary_tensor_data" in metadata["extensions"]
    metadata = client.get_model_metadata("conv", as_json=True)
    assert metadata["versions"] == ["1", "2"] and metadata["platform"] == "upgrader_pytorch"
    assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": ["-1", "3", "8", "8"]}]
    assert client.get_model_metadata("conv", "stable", as_json=True)["versions"] == ["1"]
    with fails(grpc.StatusCode.NOT_FOUND, "model 'nope' not found"):
        client.get_model_metadata("nope")
    with grpc.insecure_channel(live.grpc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", messages.SERVICE):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


# ---- inference -------------------------------------------------------------------------
def test_tritonclient_gets_what_upscale_gives(live, client, models, inputs):
    images = inputs[:5].numpy()
    result = client.infer("conv", [pixels_input(images)], request_id="g-1",
                          outputs=[triton.InferRequestedOutput("output"), triton.InferRequestedOutput("png")])
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("conv", "2", "g-1")
    got = result.as_numpy("output")
    assert got.dtype == np.uint8 and got.shape == (5, 3, 32, 32)
    assert np.array_equal(got, upscale_pixels(live.url, images))
    assert_close_to(torch_of(got), expected_outputs(models[2], inputs[:5]))
    files = result.as_numpy("png")
    assert np.array_equal(np.stack([decode_png(bytes(f)).numpy() for f in files]), got)
    result = client.infer("conv", [pixels_input(images)])  # no outputs named: the metadata's one
    assert [o.name for o in result.get_response().outputs] == ["output"] and np.array_equal(result.as_numpy("output"), got)


def test_versions_aliases_and_encoded_images(live, client, models, inputs, pngs):
    images = inputs[:3].numpy()
    for version, number in (("1", 1), ("stable", 1), ("latest", 2), ("", 2)):
        result = client.infer("conv", [pixels_input(images)], model_version=version)
        assert result.get_response().model_version == str(number)
        assert np.array_equal(result.as_numpy("output"), upscale_pixels(live.url, images, version=str(number)))
    tensor = triton.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs[:3], dtype=np.object_))
    result = client.infer("conv", [tensor], outputs=[triton.InferRequestedOutput("output")])
    assert np.array_equal(result.as_numpy("output"), upscale_pixels(live.url, images))


def test_typed_contents_give_what_raw_contents_give(live, channel, inputs, pngs):
    images = inputs[:2].numpy()
    request = ModelInferRequest(model_name="conv")
    request.inputs.add(name="input", datatype="UINT8", shape=[2, 3, 8, 8]).contents.uint_contents.extend(images.reshape(-1).tolist())
    response = model_infer(channel, request)
    assert [o.name for o in response.outputs] == ["output"] and list(response.outputs[0].shape) == [2, 3, 32, 32]
    got = np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(2, 3, 32, 32)
    assert np.array_equal(got, upscale_pixels(live.url, images))
    request = ModelInferRequest(model_name="conv", outputs=[{"name": "output"}])
    request.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(pngs[:2])
    response = model_infer(channel, request)
    assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(2, 3, 32, 32), got)


def test_kserve_sdk_over_grpc_gets_what_upscale_gives(live, inputs, tmp_path):
    images = inputs[:4].numpy()
    report, got = run_kserve_client("grpc", live.grpc, images, tmp_path)
    assert report["live"] is True and report["ready"] is True and report["model_ready"] is True
    assert (report["model_name"], report["model_version"], report["id"]) == ("conv", "2", "kserve-1")
    assert (report["output"], report["datatype"], report["shape"]) == ("output", "UINT8", [4, 3, 32, 32])
    assert np.array_equal(got, upscale_pixels(live.url, images))
    report, _ = run_kserve_client("grpc", live.grpc, images, tmp_path, "--bad-dtype")
    assert "INVALID_ARGUMENT" in report["error"] and "input 'input' is UINT8, not INT32" in report["error"], report


def test_requests_are_counted_in_the_service_metrics(live, client, inputs):
    before = metric_value(httpx.get(live.url + "/metrics").text, "upgrader_images_served_total", model="conv")
    client.infer("conv", [pixels_input(inputs[:3].numpy())])
    after = metric_value(httpx.get(live.url + "/metrics").text, "upgrader_images_served_total", model="conv")
    assert after == before + 3


# ---- errors ----------------------------------------------------------------------------
def test_bad_requests_get_a_status_and_the_http_message(live, client, channel, inputs):
    images = inputs[:2].numpy()
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "input 'input' is UINT8, not INT32"):
        client.infer("conv", [pixels_input(images.astype(np.int32), "INT32")])
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "shape [2, 3, 4, 16] is not [N, 3, 8, 8]"):
        client.infer("conv", [pixels_input(images.reshape(2, 3, 4, 16))])
    with fails(grpc.StatusCode.NOT_FOUND, "model 'nope' not found"):
        client.infer("nope", [pixels_input(images)])
    with fails(grpc.StatusCode.NOT_FOUND, "no version or alias '7'"):
        client.infer("conv", [pixels_input(images)], model_version="7")
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'colour'"):
        client.infer("conv", [pixels_input(images)], outputs=[triton.InferRequestedOutput("colour")])
    with fails(grpc.StatusCode.RESOURCE_EXHAUSTED, "17 images in one request; the limit is 16"):
        client.infer("conv", [pixels_input(np.zeros((17, 3, 8, 8), np.uint8))])

    def request(**tensor) -> ModelInferRequest:
        message = ModelInferRequest(model_name="conv")
        message.inputs.add(name="input", datatype="UINT8", shape=[2, 3, 8, 8], **tensor)
        return message

    short = request()
    short.raw_input_contents.append(images.tobytes()[:100])
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "100 binary bytes for shape [2, 3, 8, 8] of UINT8 (expected 384)"):
        model_infer(channel, short)
    few = request()
    few.inputs[0].contents.uint_contents.extend([1, 2, 3])
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "3 values for shape [2, 3, 8, 8] (expected 384)"):
        model_infer(channel, few)
    wide = request()
    wide.inputs[0].contents.uint_contents.extend([300] * 384)
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "outside the UINT8 range"):
        model_infer(channel, wide)
    misplaced = request()
    misplaced.inputs[0].contents.int_contents.extend([1] * 384)
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "UINT8 contents go in uint_contents, not int_contents"):
        model_infer(channel, misplaced)
    both = request()
    both.raw_input_contents.extend([images.tobytes(), b"x"])
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs"):
        model_infer(channel, both)
    huge = request()
    huge.raw_input_contents.append(bytes(100 * 1024))  # over max_body_bytes (64 KiB): refused by grpc before any parsing
    with fails(grpc.StatusCode.RESOURCE_EXHAUSTED):
        model_infer(channel, huge)
    # None of these took the server down or left it stuck.
    assert np.array_equal(client.infer("conv", [pixels_input(images)]).as_numpy("output"), upscale_pixels(live.url, images))


def test_a_cancelled_request_leaves_the_server_serving(live, channel, client, inputs):
    images = inputs[:16].numpy()
    request = ModelInferRequest(model_name="conv")
    request.inputs.add(name="input", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    call = channel.unary_unary(f"/{messages.SERVICE}/ModelInfer", request_serializer=ModelInferRequest.SerializeToString,
                               response_deserializer=messages.ModelInferResponse.FromString)
    futures = [call.future(request) for _ in range(8)]
    for future in futures:
        future.cancel()
    for future in futures:  # each ends: answered before the cancel arrived, or cancelled; never hung
        assert future.cancelled() or future.exception(timeout=30) is None or future.code() == grpc.StatusCode.CANCELLED
    assert np.array_equal(client.infer("conv", [pixels_input(images)]).as_numpy("output"), upscale_pixels(live.url, images))


def test_api_keys_and_deadlines(tmp_path, inputs):
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", seed=1)
    port = free_port()
    with LiveServer(store=store.root, grpc_port=port, api_keys="k1", request_timeout_s=0.001) as server:
        images = inputs[:4].numpy()
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            assert client.is_server_live() and client.is_server_ready()  # health needs no key
            with fails(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required"):
                client.infer("conv", [pixels_input(images)])
            with fails(grpc.StatusCode.UNAUTHENTICATED):
                client.get_model_metadata("conv", headers={"authorization": "Bearer wrong"})
            assert client.get_model_metadata("conv", headers={"x-api-key": "k1"}, as_json=True)["name"] == "conv"
            # The deadline (spent before the batch can come back) is 504 over HTTP, DEADLINE_EXCEEDED here.
            with fails(grpc.StatusCode.DEADLINE_EXCEEDED, "not inferred within"):
                client.infer("conv", [pixels_input(images)], headers={"authorization": "Bearer k1"})
        assert server.url
