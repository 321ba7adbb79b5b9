"""Image bytes <-> uint8 tensors, refusing anything that is not a small, sane image.

Decoding opens the image lazily (PIL reads only the header), checks the declared size
*before* any pixel is decompressed, then decodes. So a decompression bomb or a PNG that
declares 100000 x 100000 pixels costs a header parse, not memory.

Encoding writes the PNG by hand: a 32 x 32 RGB PNG is a header, one zlib stream of
unfiltered scanlines and an end chunk. That is ~7x faster than PIL's save machinery and
encoding is on the inference thread's critical path (decoded by any PNG reader, exactly).
The zlib level defaults to 0 (stored): deflate shrinks a 32 x 32 output by only ~10%
(3.1 -> 2.8 KB) and costs ~20x the rest of the encoding.

The common input, an 8-bit PNG of the right size, is decoded by libpng through TorchCodec
(`_decode_png`), which releases the GIL: PIL's Python around each tiny image held it for ~25 us an
image, and a worker's event loop waited up to the 5-ms switch interval behind a 64-image request's
decoding every time it woke (`bench/overload.py` traces it). Anything else (other formats,
16-bit or interlaced PNGs, wrong sizes, corrupt data) takes PIL's path, which names what is wrong,
and so does everything where TorchCodec does not load (it needs torch >= 2.11).

Pixels travel as numpy arrays, not tensors, between the HTTP side and the worker thread:
a numpy call on a small array is ~10x cheaper than a torch op and, unlike one, does not
release the GIL (each release invites the worker thread in and the event loop then waits
to get the GIL back).
"""

from __future__ import annotations

import functools
import io
import logging
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from service.errors import ApiError
from service.runtime.inputs import jpeg_quality

log = logging.getLogger("service.runtime.codec")

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
# Wider or taller than this, an image is refused as too large rather than as the wrong
# size: it is a decompression bomb or a client sending full-size photos.
MAX_DECLARED_SIDE = 1024
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _looks_like_image(data: bytes) -> bool:
    """The magic bytes of an accepted format: a header that then fails to parse is corrupt, not foreign."""
    return data.startswith((_PNG_SIGNATURE, b"\xff\xd8\xff", b"BM")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _frames(image: Image.Image) -> int:
    """How many frames an opened image holds (APNG, animated WebP or GIF: more than one); 1 where that cannot be read."""
    try:
        return int(getattr(image, "n_frames", 1)) if getattr(image, "is_animated", False) else 1
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        return 1


def _refuse_animated(image: Image.Image, item: int, what: str) -> None:
    if (frames := _frames(image)) > 1:
        raise ApiError(422, "animated_image", f"{what} {item} is an animated {image.format} ({frames} frames); animated images are "
                       "not upscaled: send one frame as a still image", item)


def _animated_gif(data: bytes, item: int, what: str) -> None:
    """GIF is not an accepted format; an animated one is refused as animated, which says more than 'not a PNG'."""
    if not data.startswith(b"GIF8"):
        return
    try:
        with Image.open(io.BytesIO(data), formats=("GIF",)) as image:
            _refuse_animated(image, item, what)
    except ApiError:
        raise
    except Exception:  # noqa: BLE001 - not a readable GIF: refused as an unsupported format by the caller
        return


def _open(data: bytes, item: int, what: str, max_bytes: int | None) -> Image.Image:
    """Encoded bytes -> a lazily opened PIL image (header parsed, no pixel decompressed yet); animated images refused."""
    if not data:
        raise ApiError(400, "empty_image", f"{what} {item} is empty", item)
    if max_bytes is not None and len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"{what} {item} is {len(data)} bytes; the limit is {max_bytes}", item)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: header only
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "dimensions_too_large", f"{what} {item}: {exc}", item) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error):
        if _looks_like_image(data):
            raise ApiError(400, "corrupt_image", f"{what} {item} has a truncated or corrupt header", item) from None
        _animated_gif(data, item, what)
        raise ApiError(415, "unsupported_image", f"{what} {item} is not a PNG, JPEG, WebP or BMP image", item) from None
    try:
        _refuse_animated(image, item, what)
    except ApiError:
        image.close()
        raise
    return image


def _load(image: Image.Image, item: int, what: str) -> np.ndarray:
    try:
        image.load()
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise ApiError(400, "corrupt_image", f"{what} {item} is truncated or corrupt ({exc})", item) from None


def _png_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, interlace) from the IHDR chunk every PNG starts with, or None."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return width, height, depth, colour, interlace


@functools.cache
def _libpng():
    """TorchCodec's decode_png if it loads and decodes a probe image exactly here, else None (PIL decodes everything)."""
    probe = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    try:
        from torchcodec.decoders import decode_png

        decoded = decode_png(torch.frombuffer(bytearray(encode_png(probe)), dtype=torch.uint8), mode="RGB")
        if not np.array_equal(decoded.numpy(), probe):
            raise ValueError("the probe image decoded to other pixels")
    except Exception as exc:  # noqa: BLE001 - not installed, built for another torch, or wrong: PIL is always there
        log.warning("PNG inputs decoded by PIL: TorchCodec's libpng decoder is unavailable",
                    extra={"png_decoder": "pil", "reason": repr(exc)[:300]})
        return None
    log.info("PNG inputs decoded by TorchCodec (libpng, without the GIL)", extra={"png_decoder": "torchcodec"})
    return decode_png


def png_decoder() -> str:
    """Which decoder 8-bit PNG inputs go through here: "torchcodec" or "pil". Probed (and logged) once, on the first call."""
    return "pil" if _libpng() is None else "torchcodec"


def _decode_png(data: bytes, size: int) -> np.ndarray | None:
    """A well-formed 8-bit, non-interlaced size x size PNG -> uint8 H x W x 3 by libpng (grey, palette and
    alpha converted as PIL converts them), or None for anything else: the caller's PIL path decides."""
    header = _png_header(data)
    if header is None or header[:3] != (size, size, 8) or header[3] not in (0, 2, 3, 4, 6) or header[4] != 0:
        return None
    if b"acTL" in data[: data.find(b"IDAT")]:  # an animated PNG: PIL's path refuses it
        return None
    if (decode_png := _libpng()) is None:
        return None
    try:
        decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    except (RuntimeError, ValueError):  # corrupt or truncated: PIL's path says how
        return None
    return decoded.permute(1, 2, 0).numpy()


def decode_image(data: bytes, size: int, item: int, what: str = "image", max_bytes: int | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 array size x size x 3, or ApiError naming the item and what is wrong."""
    if (max_bytes is None or len(data) <= max_bytes) and (decoded := _decode_png(data, size)) is not None:
        return decoded
    with _open(data, item, what, max_bytes) as image:
        width, height = image.size
        if max(width, height) > MAX_DECLARED_SIDE:
            raise ApiError(413, "dimensions_too_large", f"{what} {item} declares {width}x{height} pixels; it must be {size}x{size}", item)
        if (width, height) != (size, size):
            raise ApiError(422, "wrong_size", f"{what} {item} is {width}x{height}; it must be {size}x{size}", item)
        return _load(image, item, what)


def declared_size(data: bytes, item: int, what: str = "image", max_bytes: int | None = None) -> tuple[int, int]:
    """(width, height) from the header alone: limits are checked on it before anything is decompressed."""
    with _open(data, item, what, max_bytes) as image:
        return image.size


def decode_any(data: bytes, item: int, what: str = "image", max_pixels: int | None = None,
               size: tuple[int, int] | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Encoded bytes of any size -> uint8 H x W x 3. Refused from the header when over `max_pixels`
    or, when `size` (width, height) is given, not exactly that size."""
    with _open(data, item, what, max_bytes) as image:
        width, height = image.size
        if size is not None and (width, height) != size:
            raise ApiError(422, "wrong_size", f"{what} {item} is {width}x{height}; it must be {size[0]}x{size[1]}", item)
        if max_pixels is not None and width * height > max_pixels:
            raise ApiError(413, "dimensions_too_large", f"{what} {item} declares {width}x{height} = {width * height} pixels; "
                           f"the limit is {max_pixels} per image", item)
        return _load(image, item, what)


@dataclass
class PhotoMeta:
    """What a photo's RGB pixels leave out, for its answer (service.runtime.formats): its alpha channel and whether it was
    grey; and, for a JPEG, the quality its quantization tables were scaled from (service.runtime.inputs)."""

    alpha: np.ndarray | None  # uint8 H x W, None for an opaque image
    grey: bool  # greyscale in (L, LA, 1, 16-bit grey): greyscale back
    jpeg_quality: int | None = None

    @property
    def plain(self) -> bool:
        return self.alpha is None and not self.grey


_SRGB = ImageCms.createProfile("sRGB")


def to_srgb(image: Image.Image) -> Image.Image:
    """An RGB, RGBA or CMYK image with an embedded ICC profile, converted from it to sRGB (alpha kept); others as they are.

    The model was trained on sRGB pixels and every answer is untagged sRGB. A profile that names itself sRGB is
    skipped (the conversion would be the identity); one littleCMS cannot read is ignored, the pixels taken as sRGB."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if ImageCms.getProfileDescription(source).strip().startswith("sRGB"):
            return image
        alpha = image.getchannel("A") if image.mode == "RGBA" else None
        base = image.convert("RGB") if alpha is not None else image
        converted = ImageCms.profileToProfile(base, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        log.warning("ICC profile not applied; pixels taken as sRGB", extra={"reason": repr(exc)[:200]})
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def decode_photo(data: bytes, item: int, what: str = "image", max_pixels: int | None = None,
                 size: tuple[int, int] | None = None, max_bytes: int | None = None) -> tuple[np.ndarray, PhotoMeta]:
    """A photo of any size -> (uint8 H x W x 3 sRGB, what its answer needs besides): its EXIF orientation applied, its
    ICC profile converted to sRGB, its alpha channel (RGBA, LA, PA, a palette with transparency) and greyness kept
    apart. Limits as decode_any, on the declared size (before rotation: the same pixel count)."""
    with _open(data, item, what, max_bytes) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ApiError(413, "dimensions_too_large", f"{what} {item} declares {width}x{height} = {width * height} pixels; "
                           f"the limit is {max_pixels} per image", item)
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)
            if size is not None and oriented.size != size:
                raise ApiError(422, "wrong_size", f"{what} {item} is {oriented.width}x{oriented.height}; it must be {size[0]}x{size[1]}", item)
            pixels, meta = _split(to_srgb(oriented))
            if image.format == "JPEG":
                meta.jpeg_quality = jpeg_quality(getattr(image, "quantization", None))
            return pixels, meta
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
            raise ApiError(400, "corrupt_image", f"{what} {item} is truncated or corrupt ({exc})", item) from None


def _split(image: Image.Image) -> tuple[np.ndarray, PhotoMeta]:
    mode = image.mode
    grey = mode in ("1", "L", "LA", "La", *_SIXTEEN_BIT_MODES)
    if mode == "P" and "transparency" in image.info or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    alpha = np.asarray(image.getchannel("A")) if mode in ("RGBA", "RGBa", "LA", "La") else None
    if mode in ("LA", "La"):
        image = image.convert("L")
    elif mode in ("RGBA", "RGBa"):
        image = image.convert("RGB")
    return _to_rgb(image), PhotoMeta(alpha, grey)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any mode -> uint8 H x W x 3. 16-bit grey is scaled (PIL would clip it); alpha is dropped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def stack_images(arrays: list[np.ndarray]) -> np.ndarray:
    """H x W x 3 arrays -> uint8 N x 3 x H x W (the model's layout), contiguous: torch.from_numpy takes it as is."""
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8 by rounding: what the client's PNG holds."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def encode_png(image: np.ndarray | torch.Tensor, level: int = 0) -> bytes:
    """uint8 3 x H x W (numpy or CPU tensor) -> PNG bytes (8-bit RGB, filter type 0 on every scanline, zlib `level`)."""
    return encode_pngs(np.asarray(image)[None], level)[0]


def encode_pngs(images: np.ndarray, level: int = 0) -> list[bytes]:
    """uint8 N x 3 x H x W -> one PNG each, as encode_png. The scanlines of the whole batch are laid out by one
    numpy copy and the constant chunks are built once: per image only zlib and the CRC run (~7 us, GIL held)."""
    count, channels, height, width = images.shape
    rows = np.zeros((count, height, 1 + width * channels), dtype=np.uint8)  # column 0: each scanline's filter byte
    rows[:, :, 1:] = images.transpose(0, 2, 3, 1).reshape(count, height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no interlace
    start, end, idat_crc = _PNG_SIGNATURE + _chunk(b"IHDR", header), _chunk(b"IEND", b""), zlib.crc32(b"IDAT")
    pngs = []
    for scanlines in rows:
        data = zlib.compress(scanlines.tobytes(), level)
        pngs.append(b"".join((start, struct.pack(">I", len(data)), b"IDAT", data, struct.pack(">I", zlib.crc32(data, idat_crc)), end)))
    return pngs
