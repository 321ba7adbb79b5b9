"""upgrader.client against a real service (`python -m service` on a copy of the shipped models): what it sends is
the raw-body /upscale request, what it returns is the service's answer untouched, and errors and retries carry the
service's words."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from client_support import API_KEY, PROJECT_ROOT, code_blocks, encode, photo_arrays, pixels, seeded_store, service
from PIL import Image
from test_service_support import publish_corrupt_copy

from model_store import ModelStore
from upgrader.client import (
    NO_RETRIES,
    AsyncClient,
    Client,
    RequestError,
    RetryPolicy,
    UnavailableError,
    UpgraderError,
    default_url,
)

FAILED_VERSION = 3  # upgrader:3, a copy of upgrader:2 with truncated weights: refused at load, answered 503


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    store = seeded_store(tmp_path_factory.mktemp("client"))
    assert publish_corrupt_copy(store, "upgrader", 2) == FAILED_VERSION
    with service(store) as run:
        yield run


@pytest.fixture()
def client(live):
    with Client(live.url, api_key=API_KEY, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def photos():
    return photo_arrays(4)


def test_a_path_bytes_and_a_pil_image_come_back_as_the_services_own_answer(client, live, photos, tmp_path):
    array = photos[0]
    path = tmp_path / "photo.png"
    path.write_bytes(encode(array))
    from_path = client.upscale(path, model="photo")
    from_bytes = client.upscale(path.read_bytes(), model="photo")
    from_pil = client.upscale(Image.fromarray(array), model="photo")
    assert from_path.data == from_bytes.data == from_pil.data
    # exactly what a raw-body request (the curl form of docs/api.md) gets
    direct = httpx.post(f"{live.url}/upscale", params={"model": "photo", "tile": "true"}, content=path.read_bytes(),
                        headers={"content-type": "image/png", "accept": "image/png", "authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert direct.status_code == 200 and direct.content == from_path.data
    assert (from_path.model, from_path.version, from_path.media_type) == ("photo", 2, "image/png")
    assert from_path.image().size == from_path.size == (4 * array.shape[1], 4 * array.shape[0])
    assert {"queue", "inference", "total"} <= set(from_path.timings_ms) and from_path.timings_ms["total"] > 0
    assert from_path.batch and "cpu" in from_path.batch
    saved = from_path.save(tmp_path / "out.png")
    assert saved.read_bytes() == from_path.data


def test_formats_quality_and_an_8x8_model_on_a_larger_image(client, photos):
    array = photos[1]
    webp = client.upscale(encode(array), model="photo", format="webp")
    assert webp.media_type == "image/webp" and webp.image().format == "WEBP"
    assert (pixels(webp.data) == pixels(client.upscale(encode(array), model="photo").data)).all()  # lossless WebP: the PNG's pixels
    small, large = (client.upscale(encode(array), model="photo", format="jpg", quality=q) for q in (30, 95))
    assert small.media_type == large.media_type == "image/jpeg" and len(small.data) < len(large.data)
    tiled = client.upscale(encode(array), model="upgrader")  # tile=true: an 8x8 model takes any size
    assert tiled.model == "upgrader" and tiled.size == (4 * array.shape[1], 4 * array.shape[0])
    with pytest.raises(ValueError, match="gif"):
        client.upscale(encode(array), format="gif")


PRETRAINED_STORE = ModelStore(PROJECT_ROOT / "pretrained")


def test_models_lists_every_model_and_version(client):
    models = client.models()
    assert {"photo", "upgrader"} <= set(models.names())
    photo, upgrader = models.get("photo"), models.get("upgrader")
    shipped = PRETRAINED_STORE.versions("photo")
    assert photo.input == "any" and photo.serving_version == max(shipped) and photo.versions == shipped
    assert photo.aliases["clean"] == PRETRAINED_STORE.aliases("photo")["clean"]
    assert upgrader.input == "8x8" and upgrader.serving_version == 2 and FAILED_VERSION in upgrader.versions
    assert models.device == "cpu" and models.get("no-such-model") is None


def test_refusals_carry_the_services_code_message_item_and_status(client, live, photos):
    with pytest.raises(RequestError) as corrupt:
        client.upscale(encode(photos[0])[:200], model="photo")
    assert (corrupt.value.status, corrupt.value.code, corrupt.value.item) == (400, "corrupt_image", 0)
    assert "truncated or corrupt" in corrupt.value.message and isinstance(corrupt.value, UpgraderError)
    with pytest.raises(RequestError) as unknown:
        client.upscale(encode(photos[0]), model="no-such-model")
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found") and "no-such-model" in unknown.value.message
    with pytest.raises(RequestError) as quality:
        client.upscale(encode(photos[0]), model="photo", format="png", quality=50)
    assert (quality.value.status, quality.value.code) == (422, "invalid_parameter")
    with Client(live.url, retry=NO_RETRIES) as anonymous, pytest.raises(RequestError) as key:
        anonymous.models()
    assert (key.value.status, key.value.code) == (401, "unauthorized")
    assert key.value.to_dict() == {"code": "unauthorized", "message": key.value.message, "item": None, "status": 401}


def test_a_503_is_retried_after_its_retry_after_until_the_policy_gives_up(live, photos):
    image = encode(photos[0])
    with Client(live.url, api_key=API_KEY, retry=NO_RETRIES) as once:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as refused:
            once.upscale(image, model="upgrader", version=FAILED_VERSION)
        assert time.monotonic() - started < 1.0
    assert (refused.value.status, refused.value.code, refused.value.retry_after_s) == (503, "version_unavailable", 1.0)
    with Client(live.url, api_key=API_KEY, retry=RetryPolicy(unavailable_s=2.5)) as patient:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as waited:
            patient.upscale(image, model="upgrader", version=FAILED_VERSION)
        elapsed = time.monotonic() - started
    assert waited.value.code == "version_unavailable"
    assert 2.0 <= elapsed < 10, f"two waits of Retry-After (1 s) expected before giving up, took {elapsed:.2f} s"


def test_no_answer_is_retried_with_exponential_backoff_a_bounded_number_of_times():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = RetryPolicy(attempts=3, backoff_s=0.3, max_backoff_s=5)
    assert [policy.backoff(n) for n in (1, 2, 3, 10)] == [0.3, 0.6, 1.2, 5]
    with Client(f"http://127.0.0.1:{port}", retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as unreachable:
            client.models()
        elapsed = time.monotonic() - started
    assert unreachable.value.code == "unreachable" and unreachable.value.status is None
    assert "3 tries" in unreachable.value.message and "ConnectError" in unreachable.value.message
    assert 0.9 <= elapsed < 5, f"waits of 0.3 and 0.6 s expected between the 3 tries, took {elapsed:.2f} s"
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_the_async_client_answers_concurrent_calls_like_the_blocking_one(live, client, photos):
    expected = [client.upscale(encode(array), model="photo").data for array in photos]

    async def scenario():
        async with AsyncClient(live.url, api_key=API_KEY) as aclient:
            results = await asyncio.gather(*(aclient.upscale(encode(array), model="photo") for array in photos))
            return results, await aclient.models()

    results, models = asyncio.run(scenario())
    assert [r.data for r in results] == expected
    assert all(r.model == "photo" and r.version == 2 for r in results) and "photo" in models.names()


def test_the_base_url_and_key_come_from_arguments_or_upgrader_url(live, monkeypatch):
    monkeypatch.delenv("UPGRADER_URL", raising=False)
    assert default_url() == "http://127.0.0.1:8000" and Client().base_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("UPGRADER_URL", live.url + "/")
    with Client(api_key=API_KEY) as from_env:
        assert from_env.base_url == live.url and "photo" in from_env.models().names()


def test_every_python_example_in_the_client_page_runs(live, tmp_path, photos):
    """docs/client.md's Python blocks, each as its own program, in a folder holding photo.jpg and photos/."""
    (tmp_path / "photo.jpg").write_bytes(encode(photos[0], "JPEG", quality=95))
    (tmp_path / "photos").mkdir()
    for k, array in enumerate(photos[1:3]):
        (tmp_path / "photos" / f"p{k}.png").write_bytes(encode(array))
    blocks = code_blocks(PROJECT_ROOT / "docs" / "client.md", "python")
    assert len(blocks) == 6
    env = {**os.environ, "UPGRADER_URL": live.url, "UPGRADER_API_KEY": API_KEY}
    outputs = []
    for block in blocks:
        run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{block}\n{run.stderr}"
        outputs.append(run.stdout)
    assert Image.open(tmp_path / "photo-x4.webp").size == (4 * photos[0].shape[1], 4 * photos[0].shape[0])
    photo_versions = PRETRAINED_STORE.versions("photo")
    assert outputs[0].startswith(f"photo {PRETRAINED_STORE.aliases('photo')['clean']} ")  # a q95 JPEG reads as clean
    assert f"photo any {photo_versions[-1]} {photo_versions}" in outputs[2], outputs[2]
    assert "upgrader 8x8 2 [1, 2, 3]" in outputs[2], outputs[2]  # version 3: the fixture's failed copy
    assert "'photo'" in outputs[3] and str((4 * photos[1].shape[1], 4 * photos[1].shape[0])) in outputs[3]
    assert outputs[4].startswith("400 corrupt_image image 0 has a truncated or corrupt header")
    assert outputs[5].startswith("unreachable GET http://127.0.0.1:9/models: no answer after 3 tries (ConnectError")
