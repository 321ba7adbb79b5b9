"""LitServe baseline for bench/bench_service.py: the same model, weights and HTTP contract as our service.

    python bench/litserve_server.py --store DIR --model resnet18 --port 8001 --threads 1 [--codec pil]

Serves `POST /predict` with a raw `Content-Type: image/png` body (one 8x8 PNG) and answers
`{"model", "images": [{"index", "png" (base64), "width", "height"}], "metrics": {"images",
"batch_size", "inference_ms", "device"}}`, like our `POST /upscale`. Batching is LitServe's own
(`max_batch_size`, `batch_timeout`); `GET /health` is 200 once the inference worker is up.
The weights come from the model store (`ModelStore.load`), never from a fresh init. The PNG
codec is our service's own by default (`--codec pil` for Pillow's).
"""

from __future__ import annotations

import argparse
import base64
import io
import time
from typing import Callable

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException
from litserve import server as litserve_server
from PIL import Image

from model_store import ModelStore
from upgrader.architectures import INPUT_SIZE
from upgrader.imaging import to_float

# LitServe 0.2's HTTP layer hands the inference worker `await request.json()` (or a form), so a
# raw PNG body cannot reach `decode_request`. Forward the raw bytes instead: this is the cheapest
# way in (no base64/JSON wrapper our service does not pay) and keeps the client identical for both
# servers. API server processes are forked after this module is imported, so they all see it.
_prepare_json_or_form = litserve_server.BaseRequestHandler._prepare_request


async def _prepare_raw_image_or_json(self, request, request_type):
    if request.headers.get("content-type", "").startswith("image/"):
        return await request.body()
    return await _prepare_json_or_form(self, request, request_type)


litserve_server.BaseRequestHandler._prepare_request = _prepare_raw_image_or_json


def _pil_decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if image.size != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected {INPUT_SIZE}x{INPUT_SIZE}")
    return np.asarray(image.convert("RGB"))


def _pil_encode(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def image_codec(name: str) -> tuple[Callable[[bytes], np.ndarray], Callable[[torch.Tensor], bytes]]:
    """(decode: PNG -> uint8 HxWx3, encode: uint8 3xHxW -> PNG). "service" is our service's own codec,
    so a comparison measures the serving machinery, not the PNG library; "pil" is what a plain
    LitServe deployment would write."""
    if name == "pil":
        return _pil_decode, _pil_encode
    from service.runtime.codec import decode_image, encode_png

    return (lambda data: decode_image(data, INPUT_SIZE, 0)), encode_png


class UpscaleAPI(ls.LitAPI):
    """decode (PNG -> uint8 8x8x3), batch (stack, to float), predict, unbatch, encode (-> base64 PNG)."""

    def __init__(self, store: str, model: str, version: str, threads: int, codec: str, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.store_root, self.model_name, self.version, self.threads, self.codec = store, model, version, threads, codec

    def setup(self, device) -> None:
        torch.set_num_threads(self.threads)
        self.device = torch.device(device)
        self.decode_png, self.encode_png = image_codec(self.codec)
        self.model, manifest = ModelStore(self.store_root).load(self.model_name, self.version, self.device)
        self.model_info = {"name": manifest["name"], "version": manifest["version"]}

    # Unannotated on purpose: LitServe turns this annotation into the FastAPI endpoint's parameter type.
    def decode_request(self, request) -> np.ndarray:
        """`request` is the raw PNG body (bytes), see `_prepare_raw_image_or_json`."""
        try:
            return self.decode_png(request)
        except Exception as exc:  # either codec's error: the client sent something that is not an 8x8 image
            raise HTTPException(400, f"image 0: {exc}") from None

    def batch(self, inputs: list[np.ndarray]) -> torch.Tensor:
        return to_float(torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2)).to(self.device)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            pixels = self.model(x).mul_(255).round_().clamp_(0, 255).to(torch.uint8).cpu()
        return pixels, len(x), (time.perf_counter() - start) * 1000

    def unbatch(self, output: tuple[torch.Tensor, int, float]) -> list[tuple[torch.Tensor, int, float]]:
        pixels, batch_size, inference_ms = output
        return [(image, batch_size, inference_ms) for image in pixels]

    def encode_response(self, output: tuple[torch.Tensor, int, float]) -> dict:
        image, batch_size, inference_ms = output
        png = base64.b64encode(self.encode_png(image)).decode()
        return {
            "model": self.model_info,
            "images": [{"index": 0, "png": png, "width": image.shape[2], "height": image.shape[1]}],
            "metrics": {"images": 1, "batch_size": batch_size, "inference_ms": round(inference_ms, 3), "device": str(self.device)},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="model store root")
    parser.add_argument("--model", required=True, help="model name in the store")
    parser.add_argument("--version", default="latest", help="version number or alias")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads in the inference worker")
    parser.add_argument("--codec", choices=("service", "pil"), default="service", help="PNG codec: our service's (default) or plain PIL")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds LitServe waits to fill a batch")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    api = UpscaleAPI(args.store, args.model, args.version, args.threads, args.codec, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30)
    server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False)


if __name__ == "__main__":
    main()
