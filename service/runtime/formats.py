"""What POST /upscale answers in: the output format (PNG, WebP, JPEG, AVIF), and a photo's alpha and greyness restored.

The format comes from the `format` query parameter, else from the first image type in `Accept` that is offered,
else PNG. One image whose format `Accept` names (or `image/*`) is answered as that image itself; anything else as
JSON, each image base64 in it (`png` for PNG, `data` with its `media_type` for the others). What is not offered
(an unknown format, AVIF where Pillow was built without it, an Accept of image types none of which is offered) is
refused with 406.

* PNG: lossless. An opaque colour image goes through codec.encode_png (zlib level UPGRADER_PNG_COMPRESSION, 0 by
  default: fastest, largest); one with alpha or in greyscale through Pillow (level 1).
* WebP: lossless unless `quality` is given (1-100: lossy at that quality).
* JPEG: `quality` (default 90); no alpha in JPEG: an image's alpha channel is dropped.
* AVIF (where `PIL.features.check("avif")`): `quality` (default 75).

A photo's alpha channel (RGBA, LA, a palette with transparency) is upscaled by Pillow's bicubic to the output's
size, pixel centres aligned with the model's (both map output pixel i to input (i + 0.5) / 4 - 0.5), and put back;
a greyscale photo comes back greyscale (the luma of the model's RGB output, ITU-R 601, as Pillow converts).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

from service.runtime import codec
from service.errors import ApiError, echo

MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg", "avif": "image/avif"}
ALIASES = {"jpg": "jpeg"}
DEFAULT_QUALITY = {"jpeg": 90, "avif": 75}
LOSSY = ("webp", "jpeg", "avif")
PIL_PNG_LEVEL = 1  # Pillow's PNGs (alpha, greyscale): deflate level 1, several times smaller than stored, fast


def offered() -> dict[str, str]:
    """Format name -> media type of every output format this server can write."""
    return {name: media for name, media in MEDIA_TYPES.items() if name != "avif" or features.check("avif")}


@dataclass(frozen=True)
class Output:
    format: str  # png, webp, jpeg or avif
    quality: int | None  # None: the format's default (lossless WebP)
    raw: bool  # answer with the image itself (one image, and Accept asks for it); else JSON

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


def _accepted(accept: str) -> list[str]:
    """The media types of an Accept header with q > 0, highest q first (ties in order)."""
    entries = []
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if media and q > 0:
            entries.append((-q, position, media.lower()))
    return [media for _, _, media in sorted(entries)]


def negotiate(accept: str, fmt: str | None, quality: int | None, count: int) -> Output:
    """The answer's format and form for a request of `count` images, or 406 (not offered) / 422 (quality on PNG)."""
    types = _accepted(accept)
    json_ok = not types or any(t in ("application/json", "*/*", "application/*") or t.endswith("+json") for t in types)
    images = [t for t in types if t.startswith("image/")]
    available = offered()
    if fmt is not None:
        name = ALIASES.get(fmt.lower(), fmt.lower())
        if name not in available:
            raise ApiError(406, "format_not_offered", f"format {echo(fmt)} is not offered; this server writes {', '.join(available)}")
    else:
        by_media = {media: name for name, media in available.items()}
        name = next((by_media[t] for t in images if t in by_media), "png")
    wants_image = any(t in (available[name], "image/*") for t in images)
    if images and not wants_image and not json_ok:
        raise ApiError(406, "not_acceptable", f"Accept: {echo(accept)} names no image type written here for this request; offered: "
                       f"{', '.join(available.values())} (one image), or application/json")
    if wants_image and count > 1:
        if not json_ok:
            raise ApiError(406, "not_acceptable", f"Accept: {available[name]} answers one image; this request has {count} "
                           "(accept application/json for several)")
        wants_image = False
    if quality is not None and name not in LOSSY:
        raise ApiError(422, "invalid_parameter", f"quality applies to {', '.join(LOSSY)}; {name} is lossless")
    return Output(name, quality, wants_image)


def encode(image: np.ndarray, output: Output, meta: codec.PhotoMeta | None = None, png_level: int = 0) -> bytes:
    """uint8 3 x H x W (the model's RGB output) -> bytes in `output`'s format, with `meta`'s alpha and greyness restored."""
    if output.format == "png" and (meta is None or meta.plain):
        return codec.encode_png(image, png_level)
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    if meta is not None and meta.grey:
        pil = pil.convert("L")
    if meta is not None and meta.alpha is not None and output.format != "jpeg":
        alpha = Image.fromarray(meta.alpha).resize(pil.size, Image.Resampling.BICUBIC)
        pil.putalpha(alpha)
    buffer = io.BytesIO()
    if output.format == "png":
        pil.save(buffer, "PNG", compress_level=PIL_PNG_LEVEL)
    elif output.format == "webp":
        if output.quality is None:
            # quality is effort when lossless (0: the fastest); exact keeps the colour under fully transparent pixels
            pil.save(buffer, "WEBP", lossless=True, quality=0, method=1, exact=True)
        else:
            pil.save(buffer, "WEBP", quality=output.quality, method=4)
    elif output.format == "jpeg":
        pil.save(buffer, "JPEG", quality=output.quality or DEFAULT_QUALITY["jpeg"])
    else:
        pil.save(buffer, "AVIF", quality=output.quality or DEFAULT_QUALITY["avif"], speed=8)
    return buffer.getvalue()
