"""Models that take any size (photo_residual) in the service: whole-image inference, windows within the pixel budget
that stitch to the whole-image forward, batching by shape, GET /models' input and degradation, the size limit."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_support import assert_error, in_process_client, multipart, png_bytes, publish
from test_tiling import photo

from model_store import ModelStore
from service.runtime import wholeimage
from service.runtime.batching import Batcher
from service.observability.metrics import Metrics
from service.runtime.upscaler import BatchOutput, Upscaler, fastest_cpu_forward, receptive_radius
from upgrader.architectures import build_model, parameter_count
from upgrader.imaging import to_float

PARAMS = {"width": 8, "depth": 2}  # small and fast; the served one is 64x8 (runs/photo)


def photo_model(seed: int = 0, residual_std: float = 0.05, **params) -> torch.nn.Module:
    """An untrained photo_residual whose residual branch is not zero (a fresh one, residual_std 0, is exactly bicubic)."""
    torch.manual_seed(seed)
    model = build_model("photo_residual", **(params or PARAMS)).eval()
    torch.nn.init.normal_(model.to_subpixels.weight, std=residual_std)
    return model


def publish_photo(store: ModelStore, name: str = "photo", seed: int = 0, residual_std: float = 0.05,
                  degradation: str = "bicubic-matlab-x4") -> torch.nn.Module:
    """A photo_residual version with the manifest fields trainer/photo.py writes (any H x W, its degradation)."""
    model = photo_model(seed, residual_std)
    manifest = {
        "architecture": {"name": "photo_residual", "params": PARAMS}, "parameter_count": parameter_count(model),
        "input_shape": [3, None, None], "output_shape": [3, None, None], "degradation": degradation, "scale": 4,
        "recipe": {"recipe": "trainer.photo"}, "dataset": {"name": "sr-natural"},
        "metrics": {"heldout_photos_x4": {"model": {"psnr_y": 27.0}, "bicubic": {"psnr_y": 26.0}, "images": 1}},
        "device": "cpu", "wall_time_s": 0.0, "torch_version": torch.__version__,
    }
    store.publish(name, model.state_dict(), manifest)
    return model


def forward(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The model's whole-image output for uint8 3 x H x W, as 8-bit."""
    with torch.inference_mode():
        out = model(to_float(torch.from_numpy(image)[None]))[0]
    return out.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def decoded(image_json: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(image_json["png"]))) as image:
        assert image.size == (image_json["width"], image_json["height"])
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


# ---- geometry -------------------------------------------------------------------------------
def test_receptive_radius_bounds_what_an_output_pixel_sees():
    model = photo_model()
    halo = receptive_radius(model)
    assert halo == 2 + 2 * PARAMS["depth"] + 1  # head, two convs a block, the body's last conv, the tail
    image = photo(48, 48)
    changed = image.copy()
    changed[:, 47, 47] = 255 - changed[:, 47, 47]  # one input pixel, at the far corner
    a, b = forward(model, image), forward(model, changed)
    differs = np.argwhere((a != b).any(axis=0))
    # Outputs of low-resolution positions further than the halo from (47, 47) cannot change.
    assert differs.size and differs.min() // 4 >= 47 - halo


@pytest.mark.parametrize("length,window,halo", [(10, 16, 3), (100, 32, 5), (33, 32, 5), (257, 64, 19), (64, 64, 19)])
def test_spans_cover_the_axis_once_with_a_halo_inside_every_window(length, window, halo):
    spans = wholeimage.spans(length, window, halo)
    assert spans[0].keep_from == 0 and spans[-1].keep_to == length
    for a, b in zip(spans, spans[1:]):
        assert a.keep_to == b.keep_from
    for s in spans:
        assert 0 <= s.start and s.start + min(window, length) <= length
        assert s.keep_from == 0 or s.keep_from - s.start >= halo
        assert s.keep_to == length or s.start + window - s.keep_to >= halo


@pytest.mark.parametrize("size", [(61, 97), (130, 40), (40, 40)])
def test_windows_stitch_to_the_whole_image_forward(size):
    """A budget far below the image: windows of 36x36 with a 7-pixel halo; the result equals one whole forward."""
    model = photo_model()
    halo = receptive_radius(model)
    image = photo(*size)
    plan = wholeimage.plan(*size, max_forward_pixels=36 * 36, ensemble=1, halo=halo)
    assert plan.tiles > 1 or size == (40, 40) and plan.tiles == 4
    windows = wholeimage.cut(image, plan)
    assert windows.shape[1:] == (3, *plan.window)
    outputs = np.stack([forward(model, w) for w in windows])
    stitched = wholeimage.stitch(outputs, plan)
    whole = forward(model, image)
    assert stitched.shape == (3, size[0] * 4, size[1] * 4)
    assert np.abs(stitched.astype(int) - whole).max() <= 1  # float rounding only
    assert (stitched == whole).mean() > 0.999


def test_windows_are_as_few_and_as_small_as_the_budget_allows():
    plan = wholeimage.plan(1024, 1024, max_forward_pixels=512 * 512, ensemble=1, halo=19)
    assert plan.tiles == 9 and plan.window == (367, 367)  # not 9 windows of 512x512: 1.2x the image computed, not 1.8x
    assert 9 * 367 * 367 < 1.2 * 1024 * 1024


def test_an_image_within_the_budget_is_one_window():
    plan = wholeimage.plan(300, 200, max_forward_pixels=300 * 200, ensemble=1, halo=19)
    assert plan.tiles == 1 and plan.window == (300, 200)
    plan = wholeimage.plan(300, 200, max_forward_pixels=300 * 200, ensemble=2, halo=19)
    assert plan.tiles > 1 and plan.window[0] * plan.window[1] * 2 <= 300 * 200


# ---- the batcher: one shape a batch, small requests not held behind a large image ----------
def test_batches_hold_one_shape_and_a_small_image_goes_before_a_large_ones_windows():
    ran: list[tuple[int, tuple[int, ...]]] = []

    def run_batch(images, ensemble, png):
        ran.append((len(images), images.shape[1:]))
        out = images.repeat(4, axis=-2).repeat(4, axis=-1)
        return BatchOutput(out, [None] * len(images))

    def limit(shape, ensemble):
        return max(1, 64 * 64 // (shape[-2] * shape[-1] * ensemble))

    async def scenario():
        batcher = Batcher("photo:1", run_batch, max_batch_images=64, max_wait_ms=1, max_queue_images=64, retry_after_s=1,
                          metrics=Metrics(), model="photo", version=1, batch_limit=limit)
        large = np.zeros((4, 3, 64, 64), np.uint8)  # four windows of a large image: one a batch
        small = [np.full((1, 3, 16, 16), i, np.uint8) for i in range(3)]  # three small photos: together
        jobs = [asyncio.ensure_future(batcher.submit(large, 1, 30, bulk=True, png=False))]
        await asyncio.sleep(0)
        jobs += [asyncio.ensure_future(batcher.submit(s, 1, 30, png=False)) for s in small]
        results = await asyncio.gather(*jobs)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert all(len(shapes) == 1 for shapes in [{shape} for _, shape in ran])
    # The first window may have started alone; then the three small photos ride together, before the other windows.
    small_at = ran.index((3, (3, 16, 16)))
    assert small_at <= 1 and sum(n for n, shape in ran if shape == (3, 64, 64)) == 4
    assert all(n == 1 for n, shape in ran if shape == (3, 64, 64))
    for i, result in enumerate(results[1:]):
        assert (result.images == i).all() and result.images.shape == (1, 3, 64, 64)


# ---- through the service -------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("whole") / "store")
    publish(store, "conv", "conv", seed=1, psnr=23.0)
    return store, publish_photo(store)


@pytest.fixture(scope="module")
def client(served):
    # A small pixel budget, so a 100x90 image is cut into windows here.
    with in_process_client(store=served[0].root, poll_interval_s=60, max_forward_pixels=64 * 64, max_whole_image_pixels=200 * 200) as client:
        yield client


@pytest.mark.parametrize("size", [(8, 8), (37, 23), (90, 100)])
@pytest.mark.parametrize("tile", ["", "&tile=true"])
def test_photo_model_upscales_any_size_whole(client, served, size, tile):
    image = photo(*size)
    response = client.post(f"/upscale?model=photo{tile}", files=multipart([png_bytes(image.transpose(1, 2, 0))]))
    assert response.status_code == 200, response.text
    body = response.json()
    out = body["images"][0]
    assert (out["height"], out["width"]) == (size[0] * 4, size[1] * 4)
    got, whole = decoded(out), forward(served[1], image)
    assert np.abs(got.astype(int) - whole).max() <= 1
    windows = wholeimage.plan(*size, max_forward_pixels=64 * 64, ensemble=1, halo=receptive_radius(served[1])).tiles
    assert body["metrics"]["tiles"] == windows and (windows > 1) == (size == (90, 100))


def test_several_photos_of_different_sizes_in_one_request(client, served):
    images = [photo(20, 30), photo(30, 20, seed=1), photo(20, 30, seed=2)]
    response = client.post("/upscale?model=photo", files=multipart([png_bytes(i.transpose(1, 2, 0)) for i in images]))
    assert response.status_code == 200, response.text
    for image, out in zip(images, response.json()["images"]):
        assert np.abs(decoded(out).astype(int) - forward(served[1], image)).max() <= 1


def test_photo_ensemble_of_a_non_square_image(client, served):
    image = photo(20, 30)
    response = client.post("/upscale?model=photo&ensemble=8", files=multipart([png_bytes(image.transpose(1, 2, 0))]))
    assert response.status_code == 200, response.text
    from upgrader.ensemble import VIEWS, dihedral, undo_dihedral

    x = to_float(torch.from_numpy(image)[None])
    with torch.inference_mode():
        expected = sum(undo_dihedral(served[1](dihedral(x, t, m)), t, m) for t, m in VIEWS[8]) / 8
    expected = expected[0].mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(decoded(response.json()["images"][0]).astype(int) - expected).max() <= 1


def test_photo_size_limit_is_its_own(client):
    big = png_bytes(np.zeros((201, 200, 3), np.uint8))
    assert_error(client.post("/upscale?model=photo", files=multipart([big])), 413, "dimensions_too_large", 0)
    ok = png_bytes(np.zeros((200, 200, 3), np.uint8))
    assert client.post("/upscale?model=photo", files=multipart([ok])).status_code == 200


def test_models_say_which_input_and_degradation(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert models["photo"]["input"] == "any" and models["photo"]["degradation"] == "bicubic-matlab-x4"
    assert models["conv"]["input"] == "8x8" and models["conv"]["degradation"] == "bilinear-antialiased"


def test_eight_by_eight_models_still_refuse_other_sizes_without_tile(client):
    image = png_bytes(photo(9, 8).transpose(1, 2, 0))
    assert_error(client.post("/upscale?model=conv", files=multipart([image])), 422, "wrong_size", 0)


def test_upscaler_batch_limit_is_a_pixel_budget(served):
    upscaler = Upscaler(served[0], "photo", 1, torch.device("cpu"), max_batch_images=64, max_forward_pixels=100 * 100)
    upscaler.any_size = True
    assert upscaler.batch_limit((3, 10, 10), 1) == 64
    assert upscaler.batch_limit((3, 50, 50), 1) == 4
    assert upscaler.batch_limit((3, 50, 50), 2) == 2
    assert upscaler.batch_limit((3, 500, 500), 1) == 1


@pytest.mark.parametrize("forward_", ["trace", "frozen", "openvino"])
def test_each_cpu_forward_of_an_any_size_model_runs_every_size(forward_):
    """Traced (or compiled, with dynamic height and width) on one size, the forward answers others as eager does."""
    model = photo_model()
    module, memory_format, chosen = fastest_cpu_forward(photo_model(), forwards=(forward_,), any_size=True)
    assert chosen == forward_
    for size in [(17, 41), (96, 96), (130, 64)]:
        x = to_float(torch.from_numpy(photo(*size))[None])
        with torch.inference_mode():
            got, expected = module(x.contiguous(memory_format=memory_format)), model(x)
        assert got.shape == (1, 3, size[0] * 4, size[1] * 4)
        assert (got - expected).abs().max() < 1e-4


def test_photo_request_limit_counts_all_images_together(client):
    half = png_bytes(np.zeros((150, 150, 3), np.uint8))  # 22,500 pixels each, 40,000 allowed a request here
    assert_error(client.post("/upscale?model=photo", files=multipart([half, half])), 413, "too_many_pixels")
