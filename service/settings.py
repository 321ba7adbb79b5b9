"""Service settings: environment variables with the prefix UPGRADER_ (and CLI flags in __main__).

Every field is documented here; the README's settings table repeats these descriptions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model_store import default_root


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UPGRADER_", extra="ignore")

    store: Path = Field(default_factory=default_root, description="Model store root directory (the trainer publishes there).")
    default_model: str | None = Field(None, description="Model served when a request names none; unset: the model whose serving version has the best validation PSNR.")
    host: str = Field("127.0.0.1", description="Address uvicorn binds to (`python -m service --host`).")
    port: int = Field(8000, ge=0, le=65535, description="Port uvicorn listens on (`python -m service --port`).")
    max_batch_images: int = Field(64, ge=1, description="Most images one model forward pass takes (requests are merged up to this and split beyond it).")
    max_wait_ms: float = Field(2.0, ge=0, description="How long the batcher waits for more images after the first one queued before it runs a partial batch.")
    max_queue_images: int = Field(1024, ge=1, description="Images waiting per loaded model version; past it requests get 503 + Retry-After at once.")
    max_images_per_request: int = Field(256, ge=1, description="Most images (and as many references) one request may carry.")
    max_image_bytes: int = Field(64 * 1024, ge=64, description="Largest encoded image (or reference) accepted, in bytes.")
    max_image_pixels: int = Field(512 * 512, ge=64, description="Most input pixels one image may have with tile=true (refused from its declared size, before decoding); 512x512 becomes 2048x2048.")
    max_request_pixels: int = Field(1024 * 1024, ge=64, description="Most input pixels of all images of one tile=true request together (refused before any is decoded).")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes (413 beyond, checked while reading).")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline for a request's images to be queued and inferred; past it 504.")
    poll_interval_s: float = Field(2.0, gt=0, description="How often the store is scanned for new versions and aliases.")
    extra_loaded_versions: int = Field(2, ge=0, description="Versions besides the serving and aliased ones kept loaded for requests naming them (least recently used unloaded first).")
    workers: int | None = Field(None, ge=1, description="Server processes on the port (one SO_REUSEPORT socket each), each with its own batcher and copy of the models; unset: 2 on a CPU with 2+ cores (one Python process tops out near one core of HTTP work and starves its inference thread of the GIL), 1 on CUDA (one process keeps the GPU's batches whole).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op CPU threads per worker (torch.set_num_threads); unset: (CPU count - 1) / workers (at least 1), leaving a core to HTTP, decoding and encoding.")
    png_compression: int = Field(0, ge=0, le=9, description="zlib level of the returned PNGs: 0 stores the pixels (fastest; a 32x32 PNG is ~3.1 KB), 1-9 deflate them (~10% smaller, ~20x slower to encode).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Inference device; auto picks CUDA when available.")
    amp_bf16: bool = Field(False, description="On CUDA, run the forward pass under bf16 autocast.")
    admin_token: SecretStr | None = Field(None, description="Bearer token for admin endpoints (PUT aliases); unset: admin endpoints answer 403.")
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field((), description="Comma-separated client keys; when set, /upscale needs one (Authorization: Bearer or X-API-Key).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 answers.")
    log_level: str = Field("INFO", description="Log level of the JSON logs (DEBUG, INFO, WARNING, ...).")

    def inference_threads(self) -> int:
        return self.torch_threads or max(1, ((os.cpu_count() or 1) - 1) // (self.workers or 1))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value):
        return value or None

    @model_validator(mode="after")
    def _queue_fits_a_request(self):
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must be >= max_images_per_request ({self.max_images_per_request}),"
                " or a full-size request could never be queued"
            )
        return self
