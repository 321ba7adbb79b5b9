"""Images of any size: tiling geometry, blending, POST /upscale?tile=true and /bicubic over a real server, pixel limits,
and a large image's bounded share of each batch."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_service_codec import png_with_declared_size
from test_service_support import LiveServer, assert_error, expected_outputs, multipart, png_bytes, png_list, publish, small_inputs

from model_store import ModelStore
from service.runtime import batching, tiling
from service.runtime.batching import Batcher
from service.observability.metrics import Metrics
from service.runtime.upscaler import Upscaler
from upgrader.architectures import fully_convolutional
from upgrader.imaging import to_float

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)
pngs = pytest.fixture(scope="module", name="pngs")(png_list)


def nearest_4x(images: np.ndarray) -> np.ndarray:
    """A stand-in 'model' whose right answer for any image is known: pixel replication, N x 3 x h x w -> 4h x 4w."""
    return images.repeat(4, axis=-2).repeat(4, axis=-1)


PHOTO = Path(__file__).resolve().parent.parent / "service" / "static" / "examples" / "astronaut-256x256.png"


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A real photo crop (the page's astronaut example) as uint8 3 x H x W, so tiles differ from each other."""
    with Image.open(PHOTO) as image:
        pixels = np.asarray(image.convert("RGB"))
    y, x = 20 + seed * 7, 30 + seed * 11
    return np.ascontiguousarray(pixels[y : y + height, x : x + width].transpose(2, 0, 1))


def decoded(image_json: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(image_json["png"]))) as image:
        assert image.size == (image_json["width"], image_json["height"])
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


# ---- geometry -------------------------------------------------------------------------------
@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (1, 1), (13, 21), (32, 16), (9, 40)])
def test_cut_and_stitch_reassemble_any_size_exactly(size, overlapping):
    image = photo(*size)
    plan = tiling.layout(*size, overlapping)
    tiles = tiling.cut(image, plan)
    assert tiles.shape == (plan.tiles, 3, 8, 8) and tiles.dtype == np.uint8
    # Pixel replication is consistent across tiles, so any correct cut + blend gives exactly the global answer.
    assert np.array_equal(tiling.stitch(nearest_4x(tiles), plan), nearest_4x(image))


def test_layouts_count_tiles_and_only_fully_convolutional_models_overlap():
    assert tiling.layout(8, 8, False).tiles == tiling.layout(8, 8, True).tiles == 1
    assert (tiling.layout(17, 9, False).rows, tiling.layout(17, 9, False).cols) == (3, 2)
    assert (tiling.layout(16, 16, True).rows, tiling.layout(16, 16, True).cols) == (3, 3)  # every 4 pixels
    assert fully_convolutional("subpixel_residual")
    assert not any(fully_convolutional(name) for name in ("fc", "conv", "resnet18"))


def test_overlapping_tiles_blend_to_a_weighted_average_not_a_blur():
    """Each output pixel lies between the tile outputs covering it, and where the tiles agree the blend is exact."""
    plan = tiling.layout(16, 16, True)
    outputs = np.zeros((plan.tiles, 3, 32, 32), np.uint8)
    outputs[::2] = 200  # neighbours disagree: 0 vs 200
    stitched = tiling.stitch(outputs, plan)
    assert stitched.min() >= 0 and stitched.max() <= 200 and 0 < stitched.mean() < 200
    assert np.array_equal(tiling.stitch(np.full_like(outputs, 77), plan), np.full((3, 64, 64), 77, np.uint8))


# ---- over HTTP -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("tiling") / "store")
    models = {name: publish(store, name, name, seed=i + 1, psnr=20.0 + i)[1] for i, name in enumerate(["conv", "subpixel_residual"])}
    return store, models


@pytest.fixture(scope="module")
def live(served):
    with LiveServer(store=served[0].root, poll_interval_s=60, max_image_pixels=40 * 40, max_request_pixels=3 * 40 * 40) as server:
        yield server


def in_process(model: torch.nn.Module, image: np.ndarray, overlapping: bool) -> np.ndarray:
    """What tiling must give: the model on every tile (quantised like the service), stitched."""
    plan = tiling.layout(image.shape[1], image.shape[2], overlapping)
    outputs = expected_outputs(model, torch.from_numpy(tiling.cut(image, plan).copy())).numpy()
    return tiling.stitch(outputs, plan)


def test_an_8x8_image_with_tile_true_is_exactly_the_untiled_answer(live, pngs):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for model in ("conv", "subpixel_residual"):
            plain = client.post(f"/upscale?model={model}", files=multipart(pngs[:3])).json()
            tiled = client.post(f"/upscale?model={model}&tile=true", files=multipart(pngs[:3])).json()
            assert [i["png"] for i in tiled["images"]] == [i["png"] for i in plain["images"]]
            assert "tiles" not in plain["metrics"] and tiled["metrics"]["tiles"] == 3


@pytest.mark.parametrize("model,overlapping", [("conv", False), ("subpixel_residual", True)])
def test_any_size_is_tiled_through_the_model_and_stitched(live, served, model, overlapping):
    images = [photo(20, 13, seed=1), photo(8, 37, seed=2), photo(5, 3, seed=3)]
    with httpx.Client(base_url=live.url, timeout=60) as client:
        response = client.post(f"/upscale?model={model}&tile=true", files=multipart([png_bytes(i.transpose(1, 2, 0)) for i in images]))
    assert response.status_code == 200, response.text
    body = response.json()
    plans = [tiling.layout(i.shape[1], i.shape[2], overlapping) for i in images]
    assert body["metrics"]["tiles"] == sum(p.tiles for p in plans)
    for image, got in zip(images, body["images"], strict=True):
        assert (got["height"], got["width"]) == (4 * image.shape[1], 4 * image.shape[2])
        expected = in_process(served[1][model], image, overlapping)
        assert np.abs(decoded(got).astype(int) - expected.astype(int)).max() <= 1  # batch order can flip a rounding


def test_tiled_references_score_and_bicubic_is_pillows(live):
    image = photo(12, 20)
    reference = photo(48, 80, seed=4)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        files = multipart([png_bytes(image.transpose(1, 2, 0))], references=[png_bytes(reference.transpose(1, 2, 0))])
        model = client.post("/upscale?model=conv&tile=true", files=files).json()["images"][0]
        bicubic = client.post("/bicubic?tile=true", files=files).json()
        assert bicubic["model"] == {"name": "bicubic", "version": 0}
        pil = Image.fromarray(image.transpose(1, 2, 0)).resize((80, 48), Image.Resampling.BICUBIC)
        assert np.array_equal(decoded(bicubic["images"][0]), np.asarray(pil).transpose(2, 0, 1))
        for result in (model, bicubic["images"][0]):
            a, b = to_float(torch.from_numpy(decoded(result).copy())[None]), to_float(torch.from_numpy(reference)[None])
            assert result["psnr"] == pytest.approx(float(-10 * torch.log10((a - b).pow(2).mean())), abs=1e-3)
            assert 0 < result["ssim"] < 1
        wrong = multipart([png_bytes(image.transpose(1, 2, 0))], references=[png_bytes(reference[:, :40].transpose(1, 2, 0))])
        assert_error(client.post("/upscale?model=conv&tile=true", files=wrong), 422, "wrong_size", 0)
        # Without tile=true nothing changed: a larger image is the wrong size, as before.
        assert_error(client.post("/upscale?model=conv", files=multipart([png_bytes(image.transpose(1, 2, 0))])), 422, "wrong_size", 0)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose pixel data is one tiny row: decoding it would fail as corrupt."""
    return png_with_declared_size(width, height)


def test_pixel_limits_are_refused_from_the_declared_size_before_decoding(live):
    small = png_bytes(photo(40, 40).transpose(1, 2, 0))
    with httpx.Client(base_url=live.url, timeout=60) as client:
        # 41 x 40 > 1600 pixels: refused as too large (413), not as corrupt (400), so nothing was decoded.
        assert_error(client.post("/upscale?tile=true", files=multipart([small, header_only_png(41, 40)])), 413, "dimensions_too_large", 1)
        assert_error(client.post("/bicubic?tile=true", files=multipart([header_only_png(4000, 4000)])), 413, "dimensions_too_large", 0)
        # Three images at the per-image limit fit the request limit; a fourth header-only one is refused before decoding.
        assert client.post("/upscale?tile=true", files=multipart([small] * 3)).status_code == 200
        error = assert_error(client.post("/upscale?tile=true", files=multipart([small] * 3 + [header_only_png(8, 8)])), 413, "too_many_pixels")
        assert "4864" in error["message"]
        # Images larger than the 8x8 byte limit are fine with tile=true (the body limit bounds them).
        noisy = png_bytes(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
        assert client.post("/upscale?tile=true&model=conv", content=noisy, headers={"content-type": "image/png"}).status_code == 200


# ---- a large image does not starve small requests ----------------------------------------------
async def _race(upscaler: Upscaler, share: float) -> tuple[list[str], list[int]]:
    """A 640-tile bulk job, then one small request; returns the order they finished in and every batch's bulk count."""
    old, batching.BULK_SHARE = batching.BULK_SHARE, share
    batches: list[int] = []

    def run_batch(images, ensemble, png):
        batches.append(len(images))
        return upscaler.run_batch(images, ensemble, png)

    batcher = Batcher("conv:1", run_batch, max_batch_images=64, max_wait_ms=5, max_queue_images=2048, retry_after_s=1,
                      metrics=Metrics(), model="conv", version=1)
    tiles = np.ascontiguousarray(np.broadcast_to(photo(8, 8)[None], (640, 3, 8, 8)))
    done: list[str] = []

    async def submit(name, images, bulk):
        result = await batcher.submit(images, 1, 60, bulk=bulk)
        done.append(name)
        return result

    try:
        # Both queued before the batcher forms its first batch: the large image first.
        large = asyncio.create_task(submit("large", tiles, True))
        small = await asyncio.create_task(submit("small", tiles[:1], False))
        await large
        assert small.images.shape == (1, 3, 32, 32)
    finally:
        batching.BULK_SHARE = old
        await batcher.close()
    return done, batches


def test_a_large_image_takes_at_most_its_share_of_a_batch_while_others_wait(served):
    store = served[0]
    upscaler = Upscaler(store, "conv", 1, torch.device("cpu"), 64)
    upscaler.setup()
    # 32 tiles (half the batch), the small request, then the large image fills the rest of the batch and every later one.
    done, batches = asyncio.run(_race(upscaler, 0.5))
    assert done == ["small", "large"] and batches == [64] * 10 + [1]
    done, batches = asyncio.run(_race(upscaler, 1.0))  # no cap: first come first served, the small request waits for all 640 tiles
    assert done == ["large", "small"] and batches == [64] * 10 + [1]


def test_every_body_form_works_tiled_and_bicubic_answers_8x8_like_before(live, served, pngs):
    image = photo(9, 17, seed=5)
    data = png_bytes(image.transpose(1, 2, 0))
    expected = in_process(served[1]["conv"], image, overlapping=False)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        raw = client.post("/upscale?model=conv&tile=true", content=data, headers={"content-type": "image/png", "accept": "image/png"})
        assert raw.headers["x-upgrader-model"] == "conv:1" and "inference;dur=" in raw.headers["server-timing"]
        with Image.open(io.BytesIO(raw.content)) as out:
            assert np.abs(np.asarray(out).transpose(2, 0, 1).astype(int) - expected.astype(int)).max() <= 1
        as_json = client.post("/upscale?model=conv&tile=true", json={"images": [base64.b64encode(data).decode()]}).json()
        assert np.abs(decoded(as_json["images"][0]).astype(int) - expected.astype(int)).max() <= 1
        small = client.post("/bicubic", files=multipart(pngs[:2])).json()
        assert [(i["width"], i["height"]) for i in small["images"]] == [(32, 32), (32, 32)]
        assert_error(client.post("/bicubic", files=multipart([data])), 422, "wrong_size", 0)
