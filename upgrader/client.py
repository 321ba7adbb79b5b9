"""A Python client for the Upgrader service: `Client` (blocking) and `AsyncClient`, on httpx.

    from upgrader.client import Client

    with Client("http://127.0.0.1:8000") as client:
        result = client.upscale("photo.jpg", model="photo", format="webp")
        result.save("photo-x4.webp")

Each image goes to `POST /upscale` as one raw body (`Content-Type: image/...`) with `tile=true`, so images of any
size are taken (a photo model upscales them whole; an 8x8 model tiles them), and comes back as the image itself
in the format asked for (`format=` and `Accept`), untouched: the bytes the service wrote. Errors raise
`UpgraderError` (its `code`, `message`, `item` and HTTP `status` are the service's), as `RequestError` for a 4xx
(this request will not succeed as sent), `UnavailableError` for a 503 or a service that cannot be reached once the
retries are spent, `ServerError` for other 5xx. A 503 is retried after its `Retry-After`; a connection error with
exponential backoff (`RetryPolicy`).

This module imports nothing of the service: it needs httpx and, for `UpscaleResult.image()` and PIL inputs, Pillow.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import httpx

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "AsyncClient", "Client", "ModelInfo", "Models", "RequestError", "RetryPolicy", "ServerError", "UnavailableError", "UpgraderError",
    "UpscaleResult", "DEFAULT_URL", "FORMATS", "default_url",
]

DEFAULT_URL = "http://127.0.0.1:8000"
FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg", "avif": "image/avif"}
FORMAT_ALIASES = {"jpg": "jpeg"}
EXTENSIONS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg", "avif": ".avif"}

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, "Image.Image"]


def default_url() -> str:
    """`UPGRADER_URL`, else http://127.0.0.1:8000."""
    return os.environ.get("UPGRADER_URL") or DEFAULT_URL


# ---- errors ----------------------------------------------------------------------------
class UpgraderError(Exception):
    """What the service refused, in its words: `code` (e.g. `corrupt_image`), `message`, `item` (the image's index,
    if any) and the HTTP `status` (None when no answer came: the service could not be reached)."""

    def __init__(self, code: str, message: str, status: int | None = None, item: int | None = None, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status is not None else ""))
        self.code, self.message, self.status, self.item, self.retry_after_s = code, message, status, item, retry_after_s

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "item": self.item, "status": self.status}


class RequestError(UpgraderError):
    """A 4xx: this request will not succeed as sent (a corrupt image, an unknown model, a missing key, ...)."""


class UnavailableError(UpgraderError):
    """A 503 (overloaded, no model loaded, shutting down) still answered after the retries, or no answer at all
    (connection refused or dropped, timed out) after `RetryPolicy.attempts` tries."""


class ServerError(UpgraderError):
    """Another 5xx: a 504 `deadline_exceeded`, or a 500."""


def error_from(response: httpx.Response) -> UpgraderError:
    """The exception for an error answer: the service's `{"error": {"code", "message", "item"}}`, or the HTTP status's words."""
    code, message, item = f"http_{response.status_code}", response.reason_phrase or "error", None
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if isinstance(error, dict):
        code, message, item = str(error.get("code", code)), str(error.get("message", message)), error.get("item")
    elif isinstance(error, str):  # the Open Inference Protocol's shape
        message = error
    status = response.status_code
    kind = RequestError if status < 500 else UnavailableError if status == 503 else ServerError
    return kind(code, message, status, item, retry_after(response))


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# ---- retries ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """When a request is sent again.

    - No answer (connection refused, reset or dropped, a timeout): up to `attempts` tries in all, waiting
      `backoff_s`, then twice that, ... up to `max_backoff_s` between them.
    - 503 with `Retry-After`: sent again after that many seconds (at most `max_backoff_s`, at least 0.1), for
      up to `unavailable_s` seconds of waiting in all, then `UnavailableError`.
    - Every other answer is final. `/upscale` keeps no state, so sending an image again is safe.
    """

    attempts: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    unavailable_s: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.unavailable_s < 0:
            raise ValueError("RetryPolicy waits must be >= 0")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th try without an answer (1, 2, ...)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))

    def unavailable_wait(self, error: UpgraderError) -> float:
        return min(self.max_backoff_s, max(0.1, error.retry_after_s if error.retry_after_s is not None else self.backoff_s))


NO_RETRIES = RetryPolicy(attempts=1, unavailable_s=0)


class _Retrier:
    """The retry state of one call: what to wait before the next try, or the error to raise."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy, self.failures, self.waited_503 = policy, 0, 0.0

    def after_transport_error(self, exc: httpx.TransportError, method: str, url: str) -> float:
        self.failures += 1
        if self.failures >= self.policy.attempts:
            what = type(exc).__name__
            raise UnavailableError("unreachable", f"{method} {url}: no answer after {self.failures} tries ({what}: {exc})") from exc
        return self.policy.backoff(self.failures)

    def after_unavailable(self, error: UpgraderError) -> float:
        wait = self.policy.unavailable_wait(error)
        if self.waited_503 + wait > self.policy.unavailable_s:
            raise error
        self.waited_503 += wait
        return wait


# ---- results ---------------------------------------------------------------------------
@dataclass
class UpscaleResult:
    """One upscaled image as the service wrote it (`data`, in `media_type`), with what the service said about it."""

    data: bytes
    media_type: str
    model: str | None  # the model's name and version, from X-Upgrader-Model
    version: int | None
    timings_ms: dict[str, float] = field(default_factory=dict)  # Server-Timing: queue, inference, total (ms)
    batch: str | None = None  # Server-Timing's batch description, e.g. "1 images on cpu"
    headers: dict[str, str] = field(default_factory=dict)

    def image(self) -> Image.Image:
        """The answer opened with Pillow (decoded on first access to its pixels)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.data))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the image's header."""
        with self.image() as image:
            return image.size

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the bytes as received (no re-encoding) and returns the path."""
        path = Path(path)
        path.write_bytes(self.data)
        return path


def parse_server_timing(header: str) -> tuple[dict[str, float], str | None]:
    """`queue;dur=0.4, inference;dur=1.9, total;dur=3.1, batch;desc="2 images on cpu"` -> ({queue: 0.4, ...}, "2 images on cpu")."""
    timings, description = {}, None
    for entry in header.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                try:
                    timings[name] = float(value)
                except ValueError:
                    pass
            elif key == "desc" and name == "batch":
                description = value.strip('"')
    return timings, description


@dataclass
class ModelInfo:
    """One model of `GET /models`: `input` is "any" for a photo model (any size, whole) or "8x8"."""

    name: str
    input: str
    serving_version: int | None
    is_default: bool
    versions: list[int]
    aliases: dict[str, int]
    raw: dict[str, Any] = field(repr=False)


@dataclass
class Models:
    default_model: str | None
    device: str
    precision: str
    models: list[ModelInfo]

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)


def parse_models(payload: dict[str, Any]) -> Models:
    return Models(
        default_model=payload.get("default_model"), device=payload.get("device", ""), precision=payload.get("precision", ""),
        models=[ModelInfo(name=m["name"], input=m.get("input", "8x8"), serving_version=m.get("serving_version"),
                          is_default=bool(m.get("is_default")), versions=[v["version"] for v in m.get("versions", [])],
                          aliases=dict(m.get("aliases", {})), raw=m) for m in payload.get("models", [])],
    )


# ---- requests ---------------------------------------------------------------------------
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"),
          (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))
_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp",
             ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff", ".avif": "image/avif"}


UNKNOWN_IMAGE = "image/x-unknown"  # bytes of no known type: sent as an image all the same, for the service to say what it reads


def sniff_media_type(data: bytes, name: str | None = None) -> str:
    """The image type from the first bytes, else from the file name's suffix, else image/x-unknown (the service then
    answers 415 `unsupported_image` or 400 `empty_image` for what it cannot read)."""
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "image/avif"
    if name is not None:
        return _SUFFIXES.get(Path(name).suffix.lower(), UNKNOWN_IMAGE)
    return UNKNOWN_IMAGE


def read_image(image: ImageInput) -> tuple[bytes, str]:
    """(bytes, media type) of a path, bytes or PIL image (a PIL image is sent as PNG, losslessly)."""
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
        return data, sniff_media_type(data, os.fspath(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return data, sniff_media_type(data)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    raise TypeError(f"upscale takes a path, bytes or a PIL image, not {type(image).__name__}")


def output_format(format: str) -> str:
    name = FORMAT_ALIASES.get(format.lower(), format.lower())
    if name not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)} (or jpg)")
    return name


@dataclass(frozen=True)
class _UpscaleRequest:
    content: bytes
    params: dict[str, str]
    headers: dict[str, str]


def _upscale_request(image: ImageInput, model: str | None, version: int | str | None, format: str, quality: int | None,
                     tile: bool, ensemble: int | None) -> _UpscaleRequest:
    data, media_type = read_image(image)
    name = output_format(format)
    params = {"tile": "true" if tile else "false", "format": name}
    if model is not None:
        params["model"] = model
    if version is not None:
        params["version"] = str(version)
    if quality is not None:
        params["quality"] = str(quality)
    if ensemble is not None:
        params["ensemble"] = str(ensemble)
    return _UpscaleRequest(data, params, {"content-type": media_type, "accept": FORMATS[name]})


def _result(response: httpx.Response) -> UpscaleResult:
    model, version = None, None
    served = response.headers.get("x-upgrader-model")
    if served:
        model, _, number = served.rpartition(":")
        version = int(number) if number.isdigit() else None
    timings, batch = parse_server_timing(response.headers.get("server-timing", ""))
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    return UpscaleResult(response.content, media_type, model or None, version, timings, batch, dict(response.headers))


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout, retry: RetryPolicy | None) -> None:
        self.base_url = (base_url or default_url()).rstrip("/")
        self.retry = retry or RetryPolicy()
        self._headers = {"user-agent": "upgrader-client/0.1"}
        api_key = api_key if api_key is not None else os.environ.get("UPGRADER_API_KEY")
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(10.0, timeout))


class Client(_Base):
    """Blocking client. `base_url` defaults to `UPGRADER_URL` or http://127.0.0.1:8000; `api_key` (default
    `UPGRADER_API_KEY`; "" sends none) is sent as `Authorization: Bearer`; `timeout` (seconds) bounds each try;
    `retry` says what is retried (`RetryPolicy`)."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float | httpx.Timeout = 120.0,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, retry)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        retrier = _Retrier(self.retry)
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                time.sleep(retrier.after_transport_error(exc, method, f"{self.base_url}{path}"))
                continue
            if response.is_success:
                return response
            error = error_from(response)
            if isinstance(error, UnavailableError):
                time.sleep(retrier.after_unavailable(error))
                continue
            raise error

    def upscale(self, image: ImageInput, *, model: str | None = None, version: int | str | None = None, format: str = "png",
                quality: int | None = None, tile: bool = True, ensemble: int | None = None) -> UpscaleResult:
        """One image (a path, bytes or a PIL image) 4x through `model` (default: the service's), as `format`
        (png, webp, jpeg or avif; `quality` for the lossy ones)."""
        request = _upscale_request(image, model, version, format, quality, tile, ensemble)
        return _result(self._send("POST", "/upscale", content=request.content, params=request.params, headers=request.headers))

    def models(self) -> Models:
        """`GET /models`: every model, its versions, which is the default."""
        return parse_models(self._send("GET", "/models").json())


class AsyncClient(_Base):
    """The same as `Client`, for asyncio: `await client.upscale(...)`; many calls may run at once (`asyncio.gather`)."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float | httpx.Timeout = 120.0,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 100) -> None:
        super().__init__(base_url, api_key, timeout, retry)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=transport,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        retrier = _Retrier(self.retry)
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                await asyncio.sleep(retrier.after_transport_error(exc, method, f"{self.base_url}{path}"))
                continue
            if response.is_success:
                return response
            error = error_from(response)
            if isinstance(error, UnavailableError):
                await asyncio.sleep(retrier.after_unavailable(error))
                continue
            raise error

    async def upscale(self, image: ImageInput, *, model: str | None = None, version: int | str | None = None, format: str = "png",
                      quality: int | None = None, tile: bool = True, ensemble: int | None = None) -> UpscaleResult:
        """See `Client.upscale` (a path is read in a thread, off the event loop)."""
        arguments = (image, model, version, format, quality, tile, ensemble)
        if isinstance(image, (str, os.PathLike)):
            request = await asyncio.to_thread(_upscale_request, *arguments)
        else:
            request = _upscale_request(*arguments)
        response = await self._send("POST", "/upscale", content=request.content, params=request.params, headers=request.headers)
        return _result(response)

    async def models(self) -> Models:
        """See `Client.models`."""
        return parse_models((await self._send("GET", "/models")).json())
