"""Service settings: environment variables with the prefix UPGRADER_ (and CLI flags in __main__).

Every field is documented here; docs/configuration.md is generated from these fields (docs/hooks/generated.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from upgrader.cpus import usable_cpus

# model_store's default root, spelled out: importing model_store imports torch, and the worker
# supervisor reads these settings without needing torch (it held ~540 MB RSS doing nothing).
DEFAULT_STORE = Path(__file__).resolve().parent.parent / "store"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UPGRADER_", extra="ignore")

    store: str = Field(str(DEFAULT_STORE), description="Model store: a directory or s3://bucket/prefix (the trainer publishes there). S3 endpoint and credentials come from the AWS variables (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).")
    model_cache: Path = Field(Path.home() / ".cache" / "upgrader" / "models", description="Local copies of the versions read from a remote (s3://) store, re-verified on every load; unused for a directory store.")
    default_model: str | None = Field(None, description="Model served when a request names none; unset: the model whose serving version gains most over bicubic on its validation images.")
    host: str = Field("127.0.0.1", description="Address uvicorn binds to (`python -m service --host`).")
    port: int = Field(8000, ge=0, le=65535, description="Port uvicorn listens on (`python -m service --port`).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="Port of the Open Inference Protocol over gRPC (KServe's `inference.GRPCInferenceService` and the standard gRPC health service; docs/oip.md), on the same host and worker processes as HTTP, behind the same batcher, API keys and limits; 8001 as Triton. 0: no gRPC.")
    max_batch_images: int = Field(64, ge=1, description="Most images one model forward pass takes (requests are merged up to this and split beyond it).")
    max_wait_ms: float = Field(2.0, ge=0, description="How long the batcher lets a batch grow (from its oldest image) while work is waiting before it runs a partial batch; also the longest a batch waits for the clients just answered, for a model whose forward pass has a large fixed cost (measured at load; see service.runtime.batching).")
    idle_dispatch: bool = Field(True, description="When the inference worker is idle and nothing is queued, run an arriving request at once (the batching window then applies only while work is waiting); false: every batch waits up to max_wait_ms for company.")
    max_queue_images: int = Field(1024, ge=1, description="Images waiting per loaded model version; past it requests get 503 + Retry-After at once.")
    max_images_per_request: int = Field(256, ge=1, description="Most images (and as many references) one request may carry.")
    max_image_bytes: int = Field(64 * 1024, ge=64, description="Largest encoded image (or reference) accepted, in bytes.")
    max_image_pixels: int = Field(512 * 512, ge=64, description="Most input pixels one image may have with tile=true (refused from its declared size, before decoding); 512x512 becomes 2048x2048.")
    max_whole_image_pixels: int = Field(2048 * 1024, ge=64, description="Most input pixels one image, and all images of one request together, may have for a model that takes any size (photo_residual: whole-image inference, with or without tile=true), refused from the declared sizes before decoding. 2048x1024 (Full HD fits) becomes 8192x4096: about 14 s of one core at the measured 2.4 output megapixels a second for large images (bench/bench_photo_service.py), half the default request_timeout_s, leaving the other half for queueing behind other work.")
    max_forward_pixels: int = Field(512 * 512, ge=4096, description="Most input pixels of one forward pass of a model that takes any size, all images of the batch (and the ensemble's views) together: the memory bound of whole-image inference (photo_residual 64x8: about 1-2 KB per input pixel). A larger image is cut into overlapping windows within it, and the stitched result equals the whole-image forward.")
    max_request_pixels: int = Field(1024 * 1024, ge=64, description="Most input pixels of all images of one tile=true request together (refused before any is decoded); a request to a model that takes any size has max_whole_image_pixels instead.")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes (413 beyond, checked while reading).")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline for a request's images to be queued and inferred; past it 504.")
    poll_interval_s: float = Field(2.0, gt=0, description="How often the store is scanned for new versions and aliases.")
    poll_max_backoff_s: float = Field(30.0, gt=0, description="While the store cannot be read, scans back off (doubling from poll_interval_s) up to this.")
    extra_loaded_versions: int = Field(2, ge=0, description="Versions besides the serving and aliased ones kept loaded for requests naming them (least recently used unloaded first).")
    workers: int | None = Field(None, ge=1, description="Server processes on the port (one SO_REUSEPORT socket each), each with its own batcher and copy of the models; unset: 2 with 2+ usable CPUs (one Python process tops out near one core of HTTP work and starves its inference thread of the GIL), 1 on CUDA (one process keeps the GPU's batches whole).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op CPU threads per worker (torch.set_num_threads); unset: (usable CPUs - 1) / workers (at least 1), leaving a core to HTTP, decoding and encoding; usable CPUs are the process's affinity mask (a container's cpuset), capped by its cgroup CPU quota (upgrader/cpus.py), not the host's count.")
    thread_nice: int = Field(10, ge=0, le=19, description="How much lower than its event loop a worker's helper and inference threads run (Linux nice, per thread): the loop admits or refuses an overload herd first. 0: the same.")
    png_compression: int = Field(0, ge=0, le=9, description="zlib level of the returned PNGs: 0 stores the pixels (fastest; a 32x32 PNG is ~3.1 KB), 1-9 deflate them (~10% smaller, ~20x slower to encode).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Inference device; auto picks CUDA when available.")
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description="Precision of the forward pass: bfloat16 runs it under bf16 autocast (outputs still float32, then 8-bit). auto: bfloat16 on a CPU that computes bf16 natively (AVX512-BF16 or AMX, as OpenVINO does there), where subpixel_residual runs ~1.8x faster for <0.001 dB on CIFAR-10 (bench/bench_precision.py); float32 elsewhere, CUDA included.")
    cpu_forward: Literal["auto", "trace", "frozen", "openvino"] = Field("auto", description="What runs a model on the CPU: auto times every candidate at load (TorchScript trace, frozen trace, OpenVINO; NCHW and channels_last) and keeps the fastest; a name pins that one (its memory format still timed), e.g. for the same forward on every replica.")
    forward_choices: Path | None = Field(None, description="JSON file recording the CPU forward chosen for each version and its fixed cost (the batcher's regrouping wait), keyed by what the choice depends on (weights, threads, precision, CPU model, torch and OpenVINO versions): the first worker to load a version on a machine times the candidates and writes the choice under a file lock, and every later worker and restart reads it and builds that forward without timing; unset: forward-choices.json in model_cache.")
    admin_token: SecretStr | None = Field(None, description="Bearer token for admin endpoints (PUT aliases); unset: admin endpoints answer 403.")
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field((), description="Comma-separated client keys; when set, every endpoint but /healthz, /readyz and /v2/health/* needs one (Authorization: Bearer or X-API-Key): /upscale, /v2..., /models..., /docs, /openapi.json and /metrics (unless UPGRADER_METRICS_PUBLIC).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 answers.")
    max_active_images: int = Field(512, ge=1, description="Images per worker being read, decoded, queued or inferred at once, counted before a body is read from its Content-Length (one image per 300 bytes, at most the request limit); requests beyond it wait in line (body unread).")
    max_waiting_requests: int = Field(32, ge=0, description="Upscale requests per worker waiting for a slot (body unread); past it requests get 503 + Retry-After before their body is read.")
    max_connections: int = Field(1000, ge=1, description="Connections (and requests in flight) one worker takes (uvicorn's limit_concurrency: beyond it uvicorn answers 503 at once); the nginx proxy in front (deploy/nginx) holds all its connections to this many per replica, answering 503 + Retry-After in the service's JSON shape beyond.")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field((), description="Comma-separated origins (https://app.example.com) whose browser apps may call the API across origins (CORS, Starlette's middleware): preflights are answered and answers carry Access-Control-Allow-Origin; `*` allows any origin; unset: no CORS headers.")
    header_timeout_s: int = Field(10, ge=1, description="Seconds a client has to send a request's headers; past it the nginx proxy in front (deploy/nginx) closes the connection: slow clients (slowloris) hold a connection of the proxy, never one of a worker.")
    body_timeout_s: int = Field(20, ge=1, description="Seconds the nginx proxy in front (deploy/nginx) waits between two reads of a request body before answering 408 and closing; the proxy reads a whole body before it passes the request on, so a slow body never reaches a worker.")
    metrics_public: bool = Field(False, description="Serve /metrics without an API key even when UPGRADER_API_KEYS is set (for a Prometheus scraper on a trusted network).")
    log_level: str = Field("INFO", description="Log level of the JSON logs (DEBUG, INFO, WARNING, ...).")

    def forward_choices_file(self) -> Path:
        return self.forward_choices or self.model_cache / "forward-choices.json"

    def inference_threads(self) -> int:
        return self.torch_threads or max(1, (usable_cpus() - 1) // (self.workers or 1))

    @field_validator("store", mode="before")
    @classmethod
    def _path_is_a_location(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            return tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())
        return value

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
