"""The model contract (after LitServe's LitAPI): setup, decode, predict, encode.

An `Upscaler` is one loaded (model, version) on one device. It knows nothing about
queues or HTTP: `service.batching` calls `run_batch` on its worker thread with images
merged from many requests.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from model_store import ModelStore
from service import codec
from upgrader.architectures import INPUT_SHAPE, INPUT_SIZE
from upgrader.ensemble import self_ensemble
from upgrader.imaging import to_float

log = logging.getLogger("service.upscaler")


def pick_device(requested: str) -> torch.device:
    """auto: CUDA when present, else CPU; cuda without CUDA is a configuration error, said at startup."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("UPGRADER_DEVICE=cuda but torch sees no CUDA device")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class BatchOutput:
    images: torch.Tensor  # uint8 N x 3 x 32 x 32 on the CPU, exactly what the PNGs hold
    pngs: list[bytes]


class Upscaler:
    """One (model, version) on one device."""

    def __init__(self, store: ModelStore, name: str, version: int, device: torch.device, max_batch_images: int, amp_bf16: bool = False):
        self.store, self.name, self.version, self.device = store, name, version, device
        self.max_batch_images = max_batch_images
        self.amp_bf16 = amp_bf16 and device.type == "cuda"
        self.model: torch.nn.Module | None = None
        self.manifest: dict = {}

    def setup(self) -> None:
        """Verify every artifact, rebuild the architecture and load the weights onto the device."""
        self.store.verify(self.name, self.version)
        self.model, self.manifest = self.store.load(self.name, self.version, self.device)
        if self.device.type == "cuda":
            # Requests are copied into one pinned buffer so the host->device copy is asynchronous.
            self._pinned = torch.empty((self.max_batch_images, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8).pin_memory()
        # One image through the whole path now, so the first request does not pay for lazy initialisation.
        blank = codec.encode_png(torch.zeros(INPUT_SHAPE, dtype=torch.uint8))
        self.run_batch(codec.stack_images([self.decode(blank, 0)]))

    @staticmethod
    def decode(data: bytes, item: int, max_bytes: int | None = None) -> np.ndarray:
        return codec.decode_image(data, INPUT_SIZE, item, "image", max_bytes)

    def predict(self, batch: torch.Tensor, ensemble: int = 1) -> torch.Tensor:
        """float N x 3 x 8 x 8 in [0, 1] on the device -> float N x 3 x 32 x 32."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp_bf16 else nullcontext()
        with autocast:
            outputs = self_ensemble(self.model, batch) if ensemble == 8 else self.model(batch)
        return outputs.float()

    @staticmethod
    def encode(image: torch.Tensor) -> bytes:
        return codec.encode_png(image)

    def run_batch(self, images: torch.Tensor, ensemble: int = 1) -> BatchOutput:
        """uint8 N x 3 x 8 x 8 (CPU) -> outputs and PNGs. Runs on the worker thread."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                staged = self._pinned[: len(images)]
                staged.copy_(images)
                batch = staged.to(self.device, non_blocking=True)
            else:
                batch = images
            outputs = codec.quantize(self.predict(to_float(batch), ensemble))
            if self.device.type == "cuda":
                host = torch.empty(outputs.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(outputs, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
                outputs = host
        return BatchOutput(outputs, [self.encode(image) for image in outputs])
