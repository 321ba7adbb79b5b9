"""Request and response models: what clients send and get, and what /docs shows."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from upgrader.ensemble import ENSEMBLE_SIZES


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. wrong_size, unsupported_image, queue_full.", examples=["wrong_size"])
    message: str = Field(description="What is wrong, naming the offending thing.", examples=["image 2 is 9x8; it must be 8x8"])
    item: int | None = Field(None, description="Index of the offending image (or reference) in the request, when there is one.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class UpscaleQuery(BaseModel):
    """The query parameters of POST /upscale (read by `query_of`; documented from this model by `query_parameters`)."""

    model: str | None = Field(None, description="Model name; default UPGRADER_DEFAULT_MODEL, else the largest validation gain over bicubic.")
    version: str = Field("latest", description="Version number or alias (latest, stable, ...).", pattern=VERSION_PATTERN)
    ensemble: int = Field(1, description="Average the model over this many flips/rotations of each input, at as many times the "
                          "compute: 2 (the mirror), 4 (both mirrors) or 8 (every flip and rotation); measured on CIFAR-10 "
                          "+0.04, +0.06 and +0.07 dB for the default model.", json_schema_extra={"enum": list(ENSEMBLE_SIZES)})
    tile: bool = Field(False, description="true: images of any size (up to UPGRADER_MAX_IMAGE_PIXELS each, UPGRADER_MAX_REQUEST_PIXELS "
                       "together) are cut into 8x8 tiles, every tile goes through the batcher, and the 4x result is stitched "
                       "(overlapping, blended tiles for fully convolutional models). Ignored by a model that takes any size "
                       "(GET /models: input any, e.g. photo_residual): it upscales every image whole, up to "
                       "UPGRADER_MAX_WHOLE_IMAGE_PIXELS.")

    format: str | None = Field(None, description="Output format: png (default), webp, jpeg (or jpg), avif (where the server's Pillow "
                               "has it, else 406). Unset: the first of these Accept "
                               "names, else png. Not offered: 406. The one image itself comes back when Accept names its type "
                               "(or image/*), else JSON.")
    quality: int | None = Field(None, ge=1, le=100, description="Quality of a lossy format: jpeg (default 90), avif (default 75), "
                                "webp (given: lossy at this quality; unset: lossless). On png: 422.")

    @field_validator("ensemble")
    @classmethod
    def _an_ensemble_size(cls, value: int) -> int:
        if value not in ENSEMBLE_SIZES:
            raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}, not {value}")
        return value


class UpscaleJSONRequest(BaseModel):
    """The JSON body form of POST /upscale."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description="Base64-encoded 8x8 images (PNG, JPEG, WebP or BMP).")
    references: list[str] | None = Field(None, description="Optional base64 32x32 references aligned with `images`; adds psnr/ssim per output.")


class ModelRef(BaseModel):
    name: str
    version: int


class UpscaledImage(BaseModel):
    index: int = Field(description="Position of the input image in the request.")
    png: str | None = Field(None, description="The 32x32 output (4x the input with tile=true or a model that takes any size), "
                            "base64-encoded PNG (the default format).")
    data: str | None = Field(None, description="The output in the format asked for (format=webp, jpeg or avif, or Accept), base64; "
                             "absent for PNG, which is in `png`.")
    media_type: str | None = Field(None, description="The media type of `data` (image/webp, image/jpeg, image/avif); absent for PNG.")
    width: int = 32
    height: int = 32
    psnr: float | None = Field(None, description="PSNR in dB against the reference (only when references were sent).")
    ssim: float | None = Field(None, description="SSIM against the reference (only when references were sent).")


class UpscaleMetrics(BaseModel):
    images: int
    tiles: int | None = Field(None, description="tile=true only: the 8x8 tiles the images were cut into.")
    batch_size: int = Field(description="Images in the (largest) batch this request's images rode in.")
    queue_ms: float = Field(description="From queueing to the start of the first batch it rode in.")
    inference_ms: float = Field(description="Wall time of the batches it rode in (forward pass and PNG encoding); tile=true: from its "
                              "first batch's start to its last tile's output.")
    total_ms: float = Field(description="From the request's arrival to the response being ready.")
    device: str
    precision: Literal["float32", "bfloat16"] = Field(description="Of the forward pass (UPGRADER_PRECISION); outputs are 8-bit either way.")


class UpscaleResponse(BaseModel):
    model: ModelRef
    images: list[UpscaledImage]
    metrics: UpscaleMetrics


class VersionInfo(BaseModel):
    version: int
    status: Literal["serving", "loaded", "loading", "available", "failed"] = Field(
        description="serving: answers version=latest; loaded: in memory; available: in the store, loads on demand; failed: refused, see error.")
    error: str | None = Field(None, description="Why the version was refused (failed only).")
    created_at: str | None = None
    aliases: list[str] = Field(default_factory=list)
    dataset: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = Field(None, description="Validation metrics of the model and of bicubic (and self_ensemble when measured).")
    evaluation: str | None = Field(None, description="How `metrics` were measured; absent for versions measured on exact float "
                                   "inputs and outputs (before 8-bit, as-served evaluation).")
    weights_sha256: str | None = None
    epochs_completed: int | None = None


class VersionDetail(VersionInfo):
    manifest: dict[str, Any] = Field(description="The full manifest as stored.")


DEFAULT_DEGRADATION = "bilinear-antialiased"  # how the 8x8 models' inputs were made (upgrader.imaging.downsample)


class ModelInfo(BaseModel):
    name: str
    architecture: dict[str, Any] | None = None
    input: Literal["8x8", "any"] = Field("8x8", description="8x8: images of exactly 8x8 (any size with tile=true, cut into 8x8 tiles); "
                                         "any: images of any size, upscaled whole (large ones in overlapping windows), tile ignored.")
    degradation: str = Field(DEFAULT_DEGRADATION, description="How the low-resolution inputs were made from the originals the model was "
                             "trained to restore: bilinear-antialiased (upgrader.imaging.downsample, the 8x8 models) or "
                             "bicubic-matlab-x4 (MATLAB's imresize bicubic, upgrader.imaging.bicubic_degrade: photo_residual). "
                             "A model does best on inputs made that way.")
    parameter_count: int | None = None
    input_routing: str | None = Field(None, description="For a photo model trained on realistic inputs with a `clean` alias: which "
                                      "version answers which photos when a request names no version (service.runtime.inputs).")
    is_default: bool
    serving_version: int | None = Field(description="The version answering version=latest.")
    loaded_versions: list[int]
    aliases: dict[str, int] = Field(description="Aliases including the implicit latest (= serving_version).")
    versions: list[VersionInfo]


class ModelList(BaseModel):
    default_model: str | None = Field(description="Served when a request names no model.")
    device: str = Field(description="Where the models run: cpu or cuda:N.")
    precision: Literal["float32", "bfloat16"] = Field(description="Of every forward pass (UPGRADER_PRECISION). Published metrics are measured in "
                                                     "float32; bench/bench_precision.py measures what bfloat16 changes.")
    models: list[ModelInfo]


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | str = Field(description="A version number or an existing alias (e.g. latest).", examples=[3])


class AliasResponse(BaseModel):
    name: str
    alias: str
    version: int


class Health(BaseModel):
    status: Literal["ok", "ready"]
    default_model: str | None = None
    loaded: dict[str, list[int]] | None = None


def query_of(model: type[BaseModel], query_params) -> BaseModel:
    """The query string validated into `model`; 422 (a RequestValidationError, answered as FastAPI answers its own) if not.

    The inference routes read their query here rather than declaring it as a FastAPI parameter: FastAPI's
    per-request dependency solving for a query model cost ~100 us of the event loop per request, as much as
    decoding, batching and answering an 8x8 image together (`bench/bench_service.py`)."""
    try:
        return model.model_validate(dict(query_params))
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("query", *error["loc"])} for error in exc.errors()]) from None


def query_parameters(model: type[BaseModel]) -> list[dict]:
    """`model`'s fields as OpenAPI query parameters, for the routes that read their query with `query_of`."""
    schema = model.model_json_schema()
    return [{"name": name, "in": "query", "required": name in schema.get("required", ()), "description": field.get("description", ""),
             "schema": {key: value for key, value in field.items() if key != "description"}}
            for name, field in schema["properties"].items()]
