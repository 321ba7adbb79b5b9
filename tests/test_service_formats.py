"""POST /upscale's formats: what people send (alpha, greyscale, palette, 16-bit, EXIF orientation, ICC profiles,
animations) and what they get back (PNG, WebP, JPEG, AVIF by `format` or Accept; 406 for what is not offered).
Every input is a real file written by Pillow."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
from PIL import Image, features
from test_service_support import assert_error, in_process_client, multipart, png_bytes, publish
from test_service_wholeimage import forward, publish_photo
from test_tiling import photo

from model_store import ModelStore
from service.runtime import formats


def linear_rgb_profile(description: str = "linear RGB (sRGB primaries, gamma 1.0)") -> bytes:
    """A minimal ICC v2 display profile: sRGB's D50 colorants with linear (gamma 1.0) tone curves, so its mid-grey 128
    is sRGB's 188."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = description.encode("ascii") + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + bytes(67)
    curve = b"curv" + bytes(4) + struct.pack(">I", 0)  # no entries: the identity
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text" + bytes(4) + b"none\0")]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
              + bytes(24) + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def saved(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def rgb_image(height: int = 20, width: int = 28, seed: int = 0) -> Image.Image:
    return Image.fromarray(photo(height, width, seed).transpose(1, 2, 0))


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def one(client, data: bytes, query: str = "", accept: str | None = None, model: str = "photo"):
    headers = {"accept": accept} if accept else {}
    return client.post(f"/upscale?model={model}{query}", files=multipart([data]), headers=headers)


def image_of(response) -> Image.Image:
    """The output image of a JSON answer (png or data) or of a raw one."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("image/"):
        return opened(response.content)
    entry = response.json()["images"][0]
    return opened(base64.b64decode(entry["png"] if "png" in entry else entry["data"]))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("formats") / "store")
    publish(store, "conv", "conv", seed=1, psnr=23.0)
    smooth = publish_photo(store, "smooth", residual_std=0.002)  # nearly bicubic: an output lossy formats can keep
    return store, publish_photo(store), smooth


@pytest.fixture(scope="module")
def client(served):
    with in_process_client(store=served[0].root, poll_interval_s=60) as client:
        yield client


def expected(served, image: np.ndarray) -> np.ndarray:
    """The photo model's 8-bit RGB output, H x W x 3."""
    return forward(served[1], np.ascontiguousarray(image.transpose(2, 0, 1))).transpose(1, 2, 0)


def close(a: np.ndarray, b: np.ndarray, levels: int = 1) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).max() <= levels


# ---- output formats ---------------------------------------------------------------------------
def test_png_by_default_and_webp_lossless_gives_the_same_pixels(client, served):
    source = rgb_image()
    want = expected(served, np.asarray(source))
    png = image_of(one(client, saved(source)))
    assert png.format == "PNG" and close(np.asarray(png), want)
    response = one(client, saved(source), "&format=webp")
    entry = response.json()["images"][0]
    assert "png" not in entry and entry["media_type"] == "image/webp"
    webp = image_of(response)
    assert webp.format == "WEBP" and np.array_equal(np.asarray(webp.convert("RGB")), np.asarray(png))


@pytest.mark.parametrize("fmt,media", [("webp", "image/webp"), ("jpeg", "image/jpeg"), ("jpg", "image/jpeg"), ("avif", "image/avif")])
def test_lossy_formats_with_quality(client, served, fmt, media):
    if fmt == "avif" and not features.check("avif"):
        pytest.skip("Pillow without AVIF here")
    source = rgb_image(32, 32)
    want = expected(served[::2], np.asarray(source)).astype(float)
    sizes, errors = [], []
    for quality in (20, 95):
        response = one(client, saved(source), f"&format={fmt}&quality={quality}", accept=media, model="smooth")
        assert response.headers["content-type"] == media and response.headers["x-upgrader-model"] == "smooth:1"
        image = opened(response.content)
        assert image.size == (128, 128)
        error = np.abs(np.asarray(image.convert("RGB")).astype(float) - want).mean()
        errors.append(error)
        sizes.append(len(response.content))
    assert sizes[0] < sizes[1] and errors[1] < errors[0] < 8 and errors[1] < 3  # the quality is applied, to the model's pixels


def test_accept_chooses_the_format_and_the_raw_answer(client):
    data = saved(rgb_image())
    response = one(client, data, accept="image/webp")
    assert response.headers["content-type"] == "image/webp" and opened(response.content).format == "WEBP"
    response = one(client, data, accept="image/jpeg;q=0.5, image/png")
    assert response.headers["content-type"] == "image/png"
    response = one(client, data, accept="image/webp, application/json")
    assert response.headers["content-type"] == "image/webp"
    response = one(client, data, "&format=jpeg", accept="application/json")
    assert response.json()["images"][0]["media_type"] == "image/jpeg"


def test_what_is_not_offered_is_406_with_the_error_body(client, monkeypatch):
    data = saved(rgb_image())
    body = assert_error(one(client, data, accept="image/gif"), 406, "not_acceptable")
    assert "image/png" in body["message"]
    body = assert_error(one(client, data, "&format=gif"), 406, "format_not_offered")
    assert "gif" in body["message"] and "webp" in body["message"]
    monkeypatch.setattr(formats.features, "check", lambda name: False)  # a Pillow built without AVIF
    assert_error(one(client, data, "&format=avif"), 406, "format_not_offered")
    assert_error(one(client, data, accept="image/avif"), 406, "not_acceptable")
    assert_error(one(client, data, "&format=png&quality=50"), 422, "invalid_parameter")
    response = client.post("/upscale?model=photo&format=webp", files=multipart([data, data]), headers={"accept": "image/webp"})
    assert_error(response, 406, "not_acceptable")


def test_eight_by_eight_models_answer_other_formats_too(client):
    small = saved(rgb_image(8, 8))
    response = one(client, small, "&format=webp", model="conv")
    entry = response.json()["images"][0]
    assert entry["media_type"] == "image/webp" and (entry["width"], entry["height"]) == (32, 32)
    lossless = np.asarray(image_of(response).convert("RGB"))
    png = np.asarray(image_of(one(client, small, model="conv")))
    assert np.array_equal(lossless, png)


# ---- what people send ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_rgba_comes_back_with_its_alpha_upscaled_and_aligned(client, served, fmt):
    rgb = np.asarray(rgb_image(24, 24))
    alpha = np.zeros((24, 24), np.uint8)
    alpha[6:18, 4:12] = 255  # an opaque box on a transparent field
    source = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    out = image_of(one(client, saved(source), f"&format={fmt}"))
    assert out.mode == "RGBA" and out.size == (96, 96)
    got = np.asarray(out)
    assert close(got[..., 3], np.asarray(Image.fromarray(alpha).resize((96, 96), Image.Resampling.BICUBIC)))
    assert (got[28:68, 20:44, 3] == 255).all() and (got[:20, :, 3] == 0).all() and (got[:, 52:, 3] == 0).all()
    assert close(got[..., :3], expected(served, rgb))  # the colour of transparent pixels too: as the model computed it


def test_la_comes_back_greyscale_with_alpha(client, served):
    grey = np.asarray(rgb_image(16, 20).convert("L"))
    alpha = np.tile(np.linspace(0, 255, 20).astype(np.uint8), (16, 1))
    out = image_of(one(client, saved(Image.fromarray(np.dstack([grey, alpha]), "LA"))))
    assert out.mode == "LA" and out.size == (80, 64)
    want = np.asarray(Image.fromarray(expected(served, np.repeat(grey[..., None], 3, axis=2))).convert("L"))
    assert close(np.asarray(out)[..., 0], want)
    assert np.all(np.diff(np.asarray(out)[..., 1].astype(int)[:, 4:-4], axis=1) >= -1)  # the ramp, upscaled


def test_greyscale_comes_back_greyscale(client, served):
    grey = rgb_image(16, 16).convert("L")
    out = image_of(one(client, saved(grey)))
    assert out.mode == "L" and out.size == (64, 64)
    want = np.asarray(Image.fromarray(expected(served, np.asarray(grey.convert("RGB")))).convert("L"))
    assert close(np.asarray(out), want)


def test_sixteen_bit_greyscale_png_is_read_as_8_bit(client, served):
    levels = np.asarray(rgb_image(16, 16).convert("L")).astype(np.uint16) * 257 + 100  # 16-bit, the low byte not zero
    grey16 = Image.fromarray(levels)
    assert grey16.mode == "I;16"
    grey8 = (levels >> 8).astype(np.uint8)  # the high byte: 8-bit
    out = image_of(one(client, saved(grey16)))
    assert out.mode == "L"
    want = np.asarray(Image.fromarray(expected(served, np.repeat(grey8[..., None], 3, axis=2))).convert("L"))
    assert close(np.asarray(out), want)


def test_palette_images_come_back_as_rgb_or_rgba(client, served):
    palette = rgb_image(16, 16).quantize(16)
    out = image_of(one(client, saved(palette)))
    assert out.mode == "RGB" and close(np.asarray(out), expected(served, np.asarray(palette.convert("RGB"))))
    palette.info["transparency"] = 0
    out = image_of(one(client, saved(palette, transparency=0)))
    assert out.mode == "RGBA"
    see_through = np.asarray(palette) == 0
    assert see_through.any() and (np.asarray(out)[..., 3][::4, ::4][see_through] < 128).all()


def test_exif_orientation_is_applied_before_upscaling(client, served):
    upright = rgb_image(20, 28)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer rotates it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    out = image_of(one(client, saved(stored, exif=exif.tobytes())))
    assert out.size == (28 * 4, 20 * 4)
    assert close(np.asarray(out), expected(served, np.asarray(upright)))


def test_icc_profiles_are_converted_to_srgb(client, served):
    flat = np.full((16, 16, 3), 128, np.uint8)  # mid-grey in linear RGB: sRGB's 188
    out = image_of(one(client, saved(Image.fromarray(flat), icc_profile=linear_rgb_profile())))
    assert close(np.asarray(out), expected(served, np.full((16, 16, 3), 188, np.uint8)))
    assert "icc_profile" not in out.info  # answers are sRGB, untagged


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_animated_images_are_refused_as_animated(client, fmt):
    frames = [rgb_image(12, 12, seed) for seed in range(3)]
    data = saved(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert opened(data).n_frames == 3
    response = client.post("/upscale?model=photo", files=multipart([saved(rgb_image(8, 8)), data]))
    body = assert_error(response, 422, "animated_image", 1)
    assert "animated" in body["message"] and "3 frames" in body["message"]
    assert_error(one(client, data, "&tile=true", model="conv"), 422, "animated_image", 0)


def test_a_still_gif_is_still_an_unsupported_format(client):
    assert_error(one(client, saved(rgb_image(12, 12), "GIF")), 415, "unsupported_image", 0)
