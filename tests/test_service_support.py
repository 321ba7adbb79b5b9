"""Helpers shared by the service tests (no tests here): models in a real store, real PNG bytes, a real server."""

from __future__ import annotations

import base64
import io
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


def publish(store: ModelStore, name: str, arch: str = "conv", seed: int = 0, psnr: float = 20.0,
            files: dict[str, bytes] | None = None, natural_psnr: float | None = None) -> tuple[int, torch.nn.Module]:
    """Publish a seeded model with a manifest following the team's contract; returns (version, model).

    With `natural_psnr`, the manifest also has the natural-photo validation (metrics.natural) the trainer
    publishes with --natural."""
    model = make_model(arch, seed)
    manifest = {
        "architecture": {"name": arch, "params": {}}, "parameter_count": parameter_count(model),
        "input_shape": [3, 8, 8], "output_shape": [3, 32, 32],
        "recipe": {"optimizer": "adam", "lr": 0.001, "batch_size": 128, "loss": "mse", "epochs": 1},
        "args": {"arch": arch, "seed": seed},
        "dataset": {"name": "cifar10-jpeg", "fingerprint": "test", "train_size": 0, "val_size": 0},
        "history": [{"epoch": 1, "train_loss": 0.1, "val_loss": 0.1, "seconds": 0.0}],
        "metrics": {"model": {"mse": 0.01, "psnr": psnr, "ssim": 0.5}, "bicubic": {"mse": 0.01, "psnr": 19.0, "ssim": 0.5}, "images": 0},
        "device": "cpu", "wall_time_s": 0.0, "torch_version": torch.__version__, "epochs_completed": 1,
    }
    if natural_psnr is not None:
        manifest["metrics"]["natural"] = {"model": {"mse": 0.005, "psnr": natural_psnr, "ssim": 0.7},
                                          "bicubic": {"mse": 0.006, "psnr": 28.5, "ssim": 0.66}, "images": 3439}
        manifest["dataset"]["natural"] = {"name": "sr-natural", "fingerprint": "test-natural", "val_files": ["bsd200/100075.png"]}
        manifest["dataset"]["mix"] = {"cifar10-jpeg": 0.5, "sr-natural": 0.5}
    return store.publish(name, model.state_dict(), manifest, files=files), model


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


class LiveServer:
    """The real app under a real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, **settings) -> None:
        self.app = create_app(Settings(**settings))
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on")
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
