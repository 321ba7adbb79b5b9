"""Helpers shared by the service tests (no tests here): models in a real store, real PNG bytes, a real server."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from model_store import ModelStore
from service import Settings, create_app
from service.server import uvicorn_config
from upgrader.architectures import build_model, parameter_count
from upgrader.imaging import downsample, to_float

# Fresh-init models answer almost the same grey for every input, so a request getting another
# request's output would pass a 1-level comparison. Scaling the last layer spreads the outputs
# over the whole range (checked by `assert_outputs_distinguishable`).
LAST_LAYER_GAIN = 100.0


def make_model(arch: str = "conv", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch)
    last_weight = [p for name, p in model.named_parameters() if name.endswith("weight")][-1]
    with torch.no_grad():
        last_weight.mul_(LAST_LAYER_GAIN)
    return model.eval()


BUSY_SUBPIXEL_PARAMS = {"width": 32, "depth": 4, "global_attention": 1}


def busy_subpixel_model() -> torch.nn.Module:
    """A small subpixel_residual (every kind of layer, attention included) with seeded weights that do more than
    bicubic: a fresh one's last conv is zero, so its outputs would not show a precision's roundings."""
    torch.manual_seed(0)
    model = build_model("subpixel_residual", **BUSY_SUBPIXEL_PARAMS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def publish(store: ModelStore, name: str, arch: str = "conv", seed: int = 0, psnr: float = 20.0,
            files: dict[str, bytes] | None = None, natural_psnr: float | None = None,
            recipe: dict | None = None, model: torch.nn.Module | None = None, params: dict | None = None,
            bicubic_psnr: float | None = 19.0) -> tuple[int, torch.nn.Module]:
    """Publish a seeded model (or `model`, built with `params`) with a manifest following the team's contract;
    returns (version, model).

    With `natural_psnr`, the manifest also has the natural-photo validation (metrics.natural) the trainer
    publishes with --natural."""
    model = make_model(arch, seed) if model is None else model
    manifest = {
        "architecture": {"name": arch, "params": params or {}}, "parameter_count": parameter_count(model),
        "input_shape": [3, 8, 8], "output_shape": [3, 32, 32],
        "recipe": {"optimizer": "adam", "lr": 0.001, "batch_size": 128, "loss": "mse", "epochs": 1, **(recipe or {})},
        "args": {"arch": arch, "seed": seed},
        "dataset": {"name": "cifar10-jpeg", "fingerprint": "test", "train_size": 0, "val_size": 0},
        "history": [{"epoch": 1, "train_loss": 0.1, "val_loss": 0.1, "seconds": 0.0}],
        "metrics": {"model": {"mse": 0.01, "psnr": psnr, "ssim": 0.5}, "images": 0},
        "device": "cpu", "wall_time_s": 0.0, "torch_version": torch.__version__, "epochs_completed": 1,
    }
    if bicubic_psnr is not None:
        manifest["metrics"]["bicubic"] = {"mse": 0.01, "psnr": bicubic_psnr, "ssim": 0.5}
    if natural_psnr is not None:
        manifest["metrics"]["natural"] = {"model": {"mse": 0.005, "psnr": natural_psnr, "ssim": 0.7},
                                          "bicubic": {"mse": 0.006, "psnr": 28.5, "ssim": 0.66}, "images": 3439}
        manifest["dataset"]["natural"] = {"name": "sr-natural", "fingerprint": "test-natural", "val_files": ["bsd200/100075.png"]}
        manifest["dataset"]["mix"] = {"cifar10-jpeg": 0.5, "sr-natural": 0.5}
    return store.publish(name, model.state_dict(), manifest, files=files), model


def publish_corrupt_copy(store: ModelStore, name: str, source: int) -> int:
    """Commit a new version of `name` whose weights are truncated (a copy of `source`); returns its number.

    Written the way the store itself publishes (claim, artifacts, manifest last), so a reader never
    sees it half-written, only corrupt: the weights no longer match the manifest's sha256.
    """
    bad = max(int(obj.key.split("/")[1]) for obj in store.storage.list(f"{name}/") if obj.key.split("/")[1].isdigit()) + 1
    assert store.storage.create(f"{name}/{bad}/.claim", b"{}")
    for obj in store.storage.list(f"{name}/{source}/"):
        filename = obj.key.rsplit("/", 1)[1]
        if filename in ("manifest.json", ".claim"):
            continue
        data = store.storage.get(obj.key)
        store.storage.put(f"{name}/{bad}/{filename}", data[: len(data) // 2] if filename == "weights.safetensors" else data)
    store.storage.put(f"{name}/{bad}/manifest.json", store.storage.get(f"{name}/{source}/manifest.json"))
    return bad


def quantise(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def small_inputs(real_images: torch.Tensor) -> torch.Tensor:
    """The real 32x32 test images reduced to 8x8 the trainer's way, as uint8."""
    return quantise(downsample(to_float(real_images)))


def png_list(inputs: torch.Tensor) -> list[bytes]:
    """Real PNG bytes of the 8x8 inputs, as a client would upload them."""
    return [png_bytes(image) for image in inputs]


def expected_outputs(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's direct output for uint8 inputs, quantised as a PNG holds it."""
    with torch.inference_mode():
        return quantise(model(to_float(inputs)))


def png_bytes(image: torch.Tensor | np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    pil = Image.fromarray(array)
    if mode:
        pil = pil.convert(mode)
    buffer = io.BytesIO()
    pil.save(buffer, fmt)
    return buffer.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def outputs_of(response: httpx.Response) -> torch.Tensor:
    """The decoded output PNGs of a 200 JSON answer, checking indices and sizes."""
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [image["index"] for image in images] == list(range(len(images)))
    assert all((image["width"], image["height"]) == (32, 32) for image in images)
    return torch.stack([decode_png(base64.b64decode(image["png"])) for image in images])


def assert_outputs_distinguishable(expected: torch.Tensor) -> None:
    """Any two inputs' outputs differ by more than twice the rounding tolerance: within 1 of one is never within 1 of another."""
    diffs = (expected[:, None].int() - expected[None].int()).abs().flatten(2).amax(2)
    diffs.fill_diagonal_(255)
    assert diffs.min() > 2, "test model too insensitive to its input to detect mixed-up outputs"


def assert_close_to(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to one level: batch composition can flip a rounding at x.5 (float sums in another order)."""
    assert got.shape == expected.shape
    assert (got.int() - expected.int()).abs().max() <= 1


def assert_error(response: httpx.Response, status: int, code: str, item: int | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["item"] == item, error
    assert error["message"]
    return error


def multipart(images: list[bytes], field: str = "images", references: list[bytes] | None = None) -> list:
    parts = [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return parts + [("references", (f"r{i}.png", data, "image/png")) for i, data in enumerate(references or [])]


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
            return float(value)
    return 0.0


def v2_request(path: str, images: np.ndarray, extra_headers: str = "") -> bytes:
    """A raw binary-tensor inference request, as tritonclient sends it."""
    header = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(images.shape),
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    body = header + images.tobytes()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}\r\n").encode() + body


class LiveServer:
    """The real app under a real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, uvicorn_options: dict | None = None, **settings) -> None:
        self.app = create_app(Settings(**settings))
        config = uvicorn_config(self.app, "127.0.0.1", 0, log_config=None, access_log=False, lifespan="on", **(uvicorn_options or {}))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "server did not shut down"

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop()


@contextmanager
def in_process_client(**settings):
    """TestClient over the app (lifespan run), for everything that needs no real socket."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(**settings)), raise_server_exceptions=False) as client:
        yield client


class ServiceProcess:
    """`python -m service` as a real subprocess (optionally inside a network namespace); `.output` holds its logs after stop()."""

    def __init__(self, store_url: str, *flags: str, host: str = "127.0.0.1", port: int | None = None, netns: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        environment = {**os.environ, "UPGRADER_STORE": store_url, "PYTHONUNBUFFERED": "1", **(env or {})}
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        command = [sys.executable, "-m", "service", "--host", host, "--port", str(port), *flags]
        self.url, self.output = f"http://{host}:{port}", ""
        # Logs go to a file, not a pipe: nobody reads a pipe while the test runs, and a full one
        # (64 KB of access log) would block the server's event loop on its next log line.
        self._log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen((["ip", "netns", "exec", netns] if netns else []) + command, env=environment,
                                        stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            assert self.process.poll() is None, self._read_log()
            return False

    def wait_ready(self, seconds: float = 120) -> "ServiceProcess":
        deadline = time.monotonic() + seconds
        while not self.ready():
            assert time.monotonic() < deadline, f"service at {self.url} not ready after {seconds:g}s"
            time.sleep(0.1)
        return self

    def _read_log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=90)  # the supervisor kills a worker still alive after 30 + 10 s
        self.output = self._read_log()

    def logs(self) -> list[dict]:
        """Its JSON log lines: all of them after stop(), those written so far before."""
        text = self.output or self._read_log()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{") and line.endswith("}")]


def wait_for(condition, what: str, seconds: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return result
