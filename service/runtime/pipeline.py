"""The inference pipeline every transport runs, after admission: decode -> submit -> encode.

`/upscale`, `/bicubic` and the Open Inference Protocol (REST and gRPC) hand it encoded images or pixel
arrays and get outputs back; what runs in between depends on the model:

* 8x8 models (`upscale_small`): the images are decoded as 8x8 and queued as one job on the version's batcher;
* `tile=true` on an 8x8 model (`upscale_tiled`): any size, cut into 8x8 tiles that ride the batcher and are
  blended back (service.runtime.tiling);
* models that take any size (`upscale_whole`): each image whole in one forward, or in windows within the
  pixel budget (service.runtime.wholeimage).

Errors are `ApiError`s naming the image (`item`) and what is wrong; a client that leaves raises ClientLeft.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from service.errors import ApiError
from model_store import LATEST
from service.runtime import codec, formats, inputs, tiling, wholeimage
from service.runtime.cancellation import ClientGone
from service.runtime.priority import off_loop
from service.runtime.registry import Served
from service.runtime.upscaler import Upscaler
from service.settings import Settings
from upgrader.architectures import OUTPUT_SIZE, fully_convolutional
from upgrader.imaging import psnr_per_image, ssim_per_image, to_float

INLINE_DECODE_LIMIT = 4  # decoding costs ~0.1 ms an image (encoding the answer ~15 us): beyond a few, off the event loop
PNG = formats.Output("png", None, False)


@dataclass
class EncodedImages:
    """A request's images as the client sent them (PNG, JPEG, WebP, BMP), and optional references, one per image."""

    images: list[bytes]
    references: list[bytes] | None = None


@dataclass
class Upscaled:
    outputs: np.ndarray | list[np.ndarray]  # uint8 N x 3 x 32 x 32, or 3 x 4H x 4W per image of any size
    encoded: list[bytes]  # each output in the answer's format (service.runtime.formats)
    batch_size: int
    queue_s: float
    inference_s: float
    tiles: int | None = None
    scores: list[tuple[float, float]] | None = None  # (PSNR, SSIM) of each output against its reference
    version: int | None = None  # the version that answered, when the pipeline chose it (service.runtime.inputs)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [tuple(o.shape[-2:]) for o in self.outputs]


async def upscale(served: Served, body: EncodedImages, *, ensemble: int, tile: bool, deadline: float, settings: Settings,
                  gone: ClientGone | None, output: formats.Output = PNG, manager=None, version: str = LATEST) -> Upscaled:
    """Encoded images -> their upscales through `served`, encoded as `output`, scored against references if given.

    A model that takes any size upscales whole images, tile=true or not; an 8x8 model takes 8x8 images, or
    any size as 8x8 tiles with tile=true. Given the `manager` and the version the request named, clean photos may be
    handed to the model's clean version (service.runtime.inputs)."""
    if served.any_size:
        check_pixels(body.images, settings.max_whole_image_pixels, settings.max_whole_image_pixels)
        choose = None
        if manager is not None and inputs.routes_inputs(served):
            def choose(images, metas):
                return inputs.version_for(manager, served, version, images, [meta.jpeg_quality for meta in metas])
        done = await upscale_whole(served, body, ensemble, deadline, settings, gone, output, choose)
    elif tile:
        check_pixels(body.images, settings.max_image_pixels, settings.max_request_pixels)
        done = await upscale_tiled(served, body, ensemble, deadline, settings, gone, output)
    else:
        done = await upscale_small(served, body, ensemble, deadline, settings, gone, output)
    return done


async def upscale_pixels(served: Served, pixels: np.ndarray | list[np.ndarray], *, deadline: float, settings: Settings,
                         gone: ClientGone | None, png: bool) -> tuple[np.ndarray | list[np.ndarray], list[bytes]]:
    """uint8 N x 3 x H x W (or a list of 3 x H x W of different sizes, for an any-size model) -> (their 4x upscales, PNGs
    if `png`): the OIP's tensors, through the model as they are. An 8x8 model answers one N x 3 x 32 x 32 array, an
    any-size model one 3 x 4H x 4W array per image."""
    if not served.any_size:
        result = await served.batcher.submit(pixels, 1, deadline - time.perf_counter(), png=png, gone=gone)
        return result.images, result.pngs
    done = await wholeimage.upscale_whole(served.batcher, list(pixels), 1, deadline - time.perf_counter(), settings.max_forward_pixels,
                                          served.halo, gone)
    pngs = await encode_all(done.images, None, PNG, settings) if png else []
    return done.images, pngs


async def decode_images(served: Served, blobs: list[bytes], settings: Settings) -> np.ndarray | list[np.ndarray]:
    """Encoded images -> as `served` takes them: uint8 N x 3 x 8 x 8 for an 8x8 model; for an any-size one, uint8 3 x H x W
    each, whole (EXIF orientation applied, converted to sRGB RGB, at most `max_whole_image_pixels` each)."""
    if not served.any_size:
        return await decode_all(Upscaler.decode, blobs, settings)
    check_pixels(blobs, settings.max_whole_image_pixels, settings.max_whole_image_pixels)
    return await decode_photos(blobs, settings.max_whole_image_pixels)


async def encode_all(images, metas: list[codec.PhotoMeta] | None, output: formats.Output, settings: Settings) -> list[bytes]:
    """Each output in the answer's format (off the event loop: a large photo's encoding takes a while)."""
    return await off_loop(lambda: [formats.encode(image, output, metas[i] if metas else None, settings.png_compression)
                                   for i, image in enumerate(images)])


async def upscale_small(served: Served, body: EncodedImages, ensemble: int, deadline: float, settings: Settings,
                        gone: ClientGone | None, output: formats.Output = PNG) -> Upscaled:
    """8x8 images: one job on the batcher (dropped if the client leaves while it waits: `gone`)."""
    inputs = await decode_all(Upscaler.decode, body.images, settings)
    references = await decode_all(decode_reference, body.references, settings) if body.references else None
    png = output.format == "png"  # the worker thread encodes PNGs as it goes; other formats are encoded here
    result = await served.batcher.submit(inputs, ensemble, deadline - time.perf_counter(), png=png, gone=gone)
    encoded = result.pngs if png else await encode_all(result.images, None, output, settings)
    scores = await off_loop(score, result.images, references) if references is not None else None
    return Upscaled(result.images, encoded, result.batch_size, result.queue_s, result.inference_s, scores=scores)


async def upscale_tiled(served: Served, body: EncodedImages, ensemble: int, deadline: float, settings: Settings,
                        gone: ClientGone | None, output: formats.Output = PNG) -> Upscaled:
    """Images of any size through an 8x8 model: tiles through the batcher, stitched (service.runtime.tiling)."""
    images, references, metas = await decode_with_references(body, settings, settings.max_image_pixels)
    overlapping = fully_convolutional(served.manifest.get("architecture", {}).get("name", ""))
    tiled = await tiling.upscale_tiles(served.batcher, images, overlapping, ensemble, deadline - time.perf_counter(),
                                       settings.max_batch_images, gone)
    encoded = await encode_all(tiled.images, metas, output, settings)
    scores = await off_loop(score_each, tiled.images, references) if references is not None else None
    return Upscaled(tiled.images, encoded, tiled.batch_size, tiled.queue_s, tiled.inference_s, tiled.tiles, scores)


async def upscale_whole(served: Served, body: EncodedImages, ensemble: int, deadline: float, settings: Settings,
                        gone: ClientGone | None, output: formats.Output = PNG, choose=None) -> Upscaled:
    """Images of any size through a model that takes any size: whole, or in windows within the pixel budget
    (service.runtime.wholeimage); `choose(images, metas)`, if given, picks the version once they are decoded."""
    images, references, metas = await decode_with_references(body, settings, settings.max_whole_image_pixels)
    async with (choose(images, metas) if choose is not None else as_is(served)) as chosen:
        done = await wholeimage.upscale_whole(chosen.batcher, images, ensemble, deadline - time.perf_counter(),
                                              settings.max_forward_pixels, chosen.halo, gone)
    encoded = await encode_all(done.images, metas, output, settings)
    scores = await off_loop(score_each, done.images, references) if references is not None else None
    return Upscaled(done.images, encoded, done.batch_size, done.queue_s, done.inference_s, done.tiles, scores, chosen.version)


@contextlib.asynccontextmanager
async def as_is(served: Served):
    yield served


# ---- decoding -----------------------------------------------------------------------
def decode_reference(data: bytes, item: int, max_bytes: int | None = None):
    return codec.decode_image(data, OUTPUT_SIZE, item, "reference", max_bytes)


async def decode_all(decode, blobs: list[bytes], settings: Settings) -> np.ndarray:
    def run() -> np.ndarray:
        return codec.stack_images([decode(data, item, settings.max_image_bytes) for item, data in enumerate(blobs)])

    return run() if len(blobs) <= INLINE_DECODE_LIMIT else await off_loop(run)


def check_pixels(blobs: list[bytes], max_image_pixels: int, max_request_pixels: int) -> list[tuple[int, int]]:
    """Declared (width, height) of every image from its header, refused over the pixel limits before any is decoded."""
    sizes = []
    for item, data in enumerate(blobs):
        width, height = codec.declared_size(data, item)
        if width * height > max_image_pixels:
            raise ApiError(413, "dimensions_too_large", f"image {item} declares {width}x{height} = {width * height} pixels; "
                           f"the limit is {max_image_pixels} per image", item)
        sizes.append((width, height))
    total = sum(w * h for w, h in sizes)
    if total > max_request_pixels:
        raise ApiError(413, "too_many_pixels", f"the images of this request have {total} pixels together; the limit is "
                       f"{max_request_pixels} per request")
    return sizes


async def decode_photos(blobs: list[bytes], max_pixels: int) -> list[np.ndarray]:
    """Photos of any size -> uint8 3 x H x W each (EXIF orientation applied, sRGB)."""
    def run():
        return [np.ascontiguousarray(codec.decode_photo(data, item, "image", max_pixels)[0].transpose(2, 0, 1))
                for item, data in enumerate(blobs)]

    return await off_loop(run)


async def decode_with_references(body: EncodedImages, settings: Settings, max_pixels: int
                                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[codec.PhotoMeta]]:
    """Photos of any size (up to `max_pixels`) -> uint8 3 x H x W each (EXIF orientation applied, sRGB), with what their
    answers need (alpha, greyness: codec.decode_photo); references must be 4x their image's width and height."""
    def run():
        photos = [codec.decode_photo(data, item, "image", max_pixels) for item, data in enumerate(body.images)]
        images = [image for image, _ in photos]
        references = None
        if body.references is not None:
            references = [codec.decode_photo(data, item, "reference", size=(image.shape[1] * tiling.SCALE, image.shape[0] * tiling.SCALE))[0]
                          for item, (data, image) in enumerate(zip(body.references, images, strict=True))]
            references = [np.ascontiguousarray(r.transpose(2, 0, 1)) for r in references]
        return [np.ascontiguousarray(i.transpose(2, 0, 1)) for i in images], references, [meta for _, meta in photos]

    return await off_loop(run)


# ---- scoring ------------------------------------------------------------------------
def score(outputs: np.ndarray, references: np.ndarray) -> list[tuple[float, float]]:
    """PSNR and SSIM of each output (as the client receives it, quantised) against its reference."""
    a, b = to_float(torch.from_numpy(outputs)), to_float(torch.from_numpy(references))
    return list(zip(psnr_per_image(a, b).tolist(), ssim_per_image(a, b).tolist(), strict=True))


def score_each(outputs: np.ndarray | list[np.ndarray], references: np.ndarray | list[np.ndarray]) -> list[tuple[float, float]]:
    """`score` for a batch of equal sizes, or image by image for images of different sizes."""
    if isinstance(outputs, np.ndarray):
        return score(outputs, references)
    return [score(o[None], r[None])[0] for o, r in zip(outputs, references, strict=True)]
