"""The Open Inference Protocol over gRPC on a real server, spoken by tritonclient.grpc, KServe's SDK and a bare channel."""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pb2
from test_service_oip import run_kserve_client, torch_of, upscale_pixels
from test_service_support import (LiveServer, ServiceProcess, assert_close_to, decode_png, expected_outputs, metric_value, png_list,
                                  publish, small_inputs, wait_for)
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
def _compiled(out: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """grpc_predict_v2.proto and its import compiled again by grpcio-tools, as the docstring of service.grpc.messages says."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{messages.PROTO.parent}", "--include_imports",
                    f"--descriptor_set_out={out}", str(messages.PROTO)], check=True)
    return {file.name: file for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}


def _without_json_names(proto: descriptor_pb2.FileDescriptorProto | descriptor_pb2.DescriptorProto) -> None:
    for message in proto.message_type if isinstance(proto, descriptor_pb2.FileDescriptorProto) else proto.nested_type:
        for field in message.field:
            field.ClearField("json_name")
        _without_json_names(message)


def test_the_descriptor_is_compiled_from_the_proto_and_matches_kserves(tmp_path):
    out = tmp_path / "again.binpb"
    files = _compiled(out)
    assert out.read_bytes() == messages.DESCRIPTOR_SET.read_bytes()
    assert list(files) == [messages.MODEL_CONFIG_PROTO.name, messages.PROTO.name]
    # The kserve wheel's generated module, read without importing it (its names would clash with tritonclient's).
    kserve_root = Path(importlib.util.find_spec("kserve").origin).parent  # located, not imported
    source = (kserve_root / "protocol" / "grpc" / "grpc_predict_v2_pb2.py").read_text()
    serialized = next(ast.literal_eval(node.args[0]) for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile")
    theirs = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    ours = files[messages.PROTO.name]
    # KServe's service plus Triton's ModelConfig RPC, whose messages come from the import.
    [config_rpc] = [method for method in ours.service[0].method if method.name == "ModelConfig"]
    assert (config_rpc.input_type, config_rpc.output_type) == (".inference.ModelConfigRequest", ".inference.ModelConfigResponse")
    ours.service[0].method.remove(config_rpc)
    assert list(ours.dependency) == [messages.MODEL_CONFIG_PROTO.name]
    ours.ClearField("dependency")
    for proto in (theirs, ours):
        proto.ClearField("name")
        _without_json_names(proto)
    assert ours == theirs


def test_the_model_config_messages_are_a_subset_of_tritons(tmp_path):
    """Every message, field and enum value of model_config.proto is Triton's: same name, number, type, label, oneof."""
    from tritonclient.grpc import model_config_pb2, service_pb2  # Triton's, in the default pool; ours are in a pool of their own

    triton_messages, triton_enums = {}, {}

    def index(prefix: str, messages_, enums) -> None:
        for enum in enums:
            triton_enums[f"{prefix}.{enum.name}"] = {value.name: value.number for value in enum.value}
        for message in messages_:
            triton_messages[f"{prefix}.{message.name}"] = message
            index(f"{prefix}.{message.name}", message.nested_type, message.enum_type)

    for module in (model_config_pb2, service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        _without_json_names(proto)
        index(".inference", proto.message_type, proto.enum_type)

    ours = _compiled(tmp_path / "again.binpb")[messages.MODEL_CONFIG_PROTO.name]
    _without_json_names(ours)
    checked = []

    def check(prefix: str, messages_, enums) -> None:
        for enum in enums:
            # An enum has all of Triton's values, so nothing Triton sends or expects is unknown here.
            assert {value.name: value.number for value in enum.value} == triton_enums[f"{prefix}.{enum.name}"], enum.name
        for message in messages_:
            name = f"{prefix}.{message.name}"
            theirs = triton_messages[name]
            their_fields = {field.name: field for field in theirs.field}
            for field in message.field:
                their = their_fields[field.name]
                assert (field.number, field.type, field.label, field.type_name) == (their.number, their.type, their.label, their.type_name), \
                    f"{name}.{field.name}"
                oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
                assert oneof == (theirs.oneof_decl[their.oneof_index].name if their.HasField("oneof_index") else None), f"{name}.{field.name}"
                checked.append(f"{name}.{field.name}")
            check(name, message.nested_type, message.enum_type)

    check(".inference", ours.message_type, ours.enum_type)
    assert {".inference.ModelConfig.max_batch_size", ".inference.ModelConfig.dynamic_batching", ".inference.ModelInput.dims",
            ".inference.ModelConfigResponse.config", ".inference.ModelVersionPolicy.Specific.versions"} <= set(checked)


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


def test_model_config_is_what_rest_answers(live, client):
    """Triton's ModelConfig RPC, read by tritonclient's own message classes, equals GET .../config parsed into them."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    for version, path in (("", "/v2/models/conv/config"), ("stable", "/v2/models/conv/versions/stable/config"),
                          ("2", "/v2/models/conv/versions/2/config")):
        rest = httpx.get(live.url + path)
        assert rest.status_code == 200, rest.text
        config = client.get_model_config("conv", version).config
        assert config == json_format.ParseDict(rest.json(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("conv", "upgrader_pytorch", 16)
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [("input", "TYPE_UINT8", [3, 8, 8])]
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [("output", "TYPE_UINT8", [3, 32, 32])]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching" and list(config.version_policy.specific.versions) == [1, 2]
    with fails(grpc.StatusCode.NOT_FOUND, "model 'nope' not found"):
        client.get_model_config("nope")
    with fails(grpc.StatusCode.NOT_FOUND, "no version or alias '9'"):
        client.get_model_config("conv", "9")


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

    def served():  # the cancelled calls' images leave the line as the batcher reaches them: until then it may be full
        try:
            return [client.infer("conv", [pixels_input(images)]).as_numpy("output")]
        except InferenceServerException as error:
            assert "queue is full" in str(error), error
            return None

    assert np.array_equal(wait_for(served, "the server to serve again", 30)[0], upscale_pixels(live.url, images))


def test_a_cancelled_request_has_its_queued_images_dropped_not_computed(tmp_path, pngs, inputs):
    """As over HTTP (tests/test_http_admission.py): images queued for a gRPC call its client cancelled are never computed."""
    from test_http_admission import connect, multipart_body, multipart_head, read_response

    store = ModelStore(tmp_path / "store")
    publish(store, "conv", seed=1)
    port = free_port()
    with LiveServer(store=store.root, grpc_port=port, poll_interval_s=60, max_batch_images=1) as live, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        def batches() -> float:
            return metric_value(httpx.get(f"{live.url}/metrics").text, "upgrader_batch_images_count", model="conv")

        before = batches()
        body = multipart_body(pngs * 4)  # 256 images, one forward pass (x8 with ensemble=8) each, ahead in line
        stays = connect(live.url)
        stays.sendall(multipart_head(live.url, body).replace(b"/upscale", b"/upscale?ensemble=8") + body)
        started = wait_for(lambda: (count := batches()) > before and count, "the first batch")
        images = inputs[:8].numpy()
        request = ModelInferRequest(model_name="conv")
        request.inputs.add(name="input", datatype="UINT8", shape=list(images.shape))
        request.raw_input_contents.append(images.tobytes())
        call = channel.unary_unary(f"/{messages.SERVICE}/ModelInfer", request_serializer=ModelInferRequest.SerializeToString,
                                   response_deserializer=messages.ModelInferResponse.FromString).future(request)
        wait_for(lambda: batches() >= started + 20, "20 more batches")  # long enough for the 8 to be queued
        assert not call.done()
        call.cancel()
        status, _, answer = read_response(stays)
        assert status == 200
        stays.close()
        metrics = httpx.get(f"{live.url}/metrics").text
        # grpc.aio cancels the handler when its client cancels: counted as "cancelled", the call as 499 (client gone)
        assert metric_value(metrics, "upgrader_images_dropped_total", model="conv", reason="cancelled") == 8
        assert metric_value(metrics, "upgrader_requests_total", model="conv", status="499") == 1
        assert batches() - before == 256  # the 256 only: none of the 8 went through the model


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
            with fails(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required"):
                client.get_model_config("conv")
            assert client.get_model_config("conv", headers={"x-api-key": "k1"}).config.name == "conv"
            # The deadline (spent before the batch can come back) is 504 over HTTP, DEADLINE_EXCEEDED here.
            with fails(grpc.StatusCode.DEADLINE_EXCEEDED, "not inferred within"):
                client.infer("conv", [pixels_input(images)], headers={"authorization": "Bearer k1"})
        assert server.url


# ---- perf_analyzer ---------------------------------------------------------------------
PERF_ANALYZER_SH = Path(__file__).parent / "tools" / "perf_analyzer.sh"


@pytest.fixture(scope="session")
def perf_analyzer(request) -> tuple[Path, dict[str, str]]:
    """Triton's perf_analyzer binary and the environment it runs in; tests/tools/perf_analyzer.sh installs it when missing."""
    try:
        ctypes.CDLL("libb64.so.0d")
    except OSError:
        pytest.skip("perf_analyzer links Debian's libb64.so.0d, which is not installed here (apt-get install libb64-0d; .ci/run does)")
    env = {**os.environ, "PYTHON": sys.executable}
    cache = Path(env.get("UPGRADER_CI_CACHE", "/var/cache/upgrader-ci"))
    installed = (cache / "perf-analyzer-2.41.0" / "bin" / "perf_analyzer").is_file()
    if "UPGRADER_PERF_ANALYZER_DIR" not in env and not installed and not os.access(cache if cache.exists() else cache.parent, os.W_OK):
        env["UPGRADER_PERF_ANALYZER_DIR"] = str(request.config.cache.mkdir("perf-analyzer-2.41.0"))  # no CI cache to write to
    where = Path(subprocess.run(["bash", str(PERF_ANALYZER_SH)], env=env, check=True, capture_output=True, text=True,
                                timeout=900).stdout.strip())
    library_path = ":".join(filter(None, [str(where / "nvidia" / "cuda_runtime" / "lib"), os.environ.get("LD_LIBRARY_PATH")]))
    return where / "bin" / "perf_analyzer", {**os.environ, "LD_LIBRARY_PATH": library_path}


def test_perf_analyzer_over_grpc_measures_a_python_m_service(perf_analyzer, tmp_path):
    """Triton's perf_analyzer -i grpc (ModelConfig, ModelMetadata, then ModelInfer) against `python -m service`."""
    binary, env = perf_analyzer
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", seed=1)
    port = free_port()
    server = ServiceProcess(store.url, env={"UPGRADER_GRPC_PORT": str(port)})
    try:
        server.wait_ready()
        run = subprocess.run([str(binary), "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", "conv", "-b", "1",
                              "--concurrency-range=2", "--measurement-interval=1000", "--stability-percentage=1000",
                              "--max-trials=3"],  # perf_analyzer calls a measurement stable over 3 windows: fewer never is
                             env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    throughput = re.search(r"Concurrency: 2, throughput: ([0-9.]+) infer/sec", report)
    assert throughput and float(throughput.group(1)) > 0, report


def test_every_call_has_a_request_id_and_an_access_log_line(live, channel, inputs):
    """The x-request-id metadata is kept (or one is made) and sent back with the status; each call logs one access line
    carrying it."""
    images = inputs[:2].numpy()
    request = ModelInferRequest(model_name="conv")
    request.inputs.add(name="input", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=ModelInferRequest.SerializeToString,
                               response_deserializer=messages.METHODS["ModelInfer"][1].FromString)
    import logging

    from service.observability.logs import request_id

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines = {}

        def emit(self, record: logging.LogRecord) -> None:  # the request id as the JSON formatter reads it
            if getattr(record, "method", None) == "GRPC":
                self.lines[request_id.get()] = record

    access, handler = logging.getLogger("service.access"), Lines()
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        _, given = call.with_call(request, metadata=(("x-request-id", "grpc-call-1"),), timeout=30)
        _, made = call.with_call(request, timeout=30)
        bad = ModelInferRequest(model_name="nope")
        with pytest.raises(grpc.RpcError) as refused:
            call(bad, metadata=(("x-request-id", "grpc-call-2"),), timeout=30)
        # The status reaches the client before the server's handler has finished (and logged): wait for its line.
        wait_for(lambda: "grpc-call-2" in handler.lines, "the refused call's access line", 10)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert dict(given.trailing_metadata())["x-request-id"] == "grpc-call-1"
    generated = dict(made.trailing_metadata())["x-request-id"]
    assert generated and generated != "grpc-call-1"
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(refused.value.trailing_metadata())["x-request-id"] == "grpc-call-2"
    lines = handler.lines
    assert lines["grpc-call-1"].path == "/inference.GRPCInferenceService/ModelInfer" and lines["grpc-call-1"].status == 0
    assert lines[generated].status == 0
    assert lines["grpc-call-2"].status == grpc.StatusCode.NOT_FOUND.value[0]
