"""The service in process (no socket): body forms, the bad-input matrix, models, admin, keys, metrics, docs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_service_support import (
    assert_close_to,
    assert_error,
    decode_png,
    expected_outputs,
    in_process_client,
    metric_value,
    multipart,
    outputs_of,
    png_bytes,
    png_list,
    publish,
    quantise,
    small_inputs,
)

from model_store import ModelStore
from service import Settings, create_app
from service.runtime.batching import Batcher
from service.runtime.forward_choices import ForwardChoices
from service.observability.metrics import Metrics
from service.runtime.upscaler import BatchOutput, Upscaler, fastest_cpu_forward
from upgrader.architectures import build_model
from upgrader.ensemble import self_ensemble
from upgrader.imaging import psnr_per_image, ssim_per_image, to_float

LOSS_CURVE = png_bytes(np.full((4, 4, 3), 7, np.uint8))
inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)  # the real test images reduced to 8x8
pngs = pytest.fixture(scope="module", name="pngs")(png_list)  # ... as PNG bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A store with conv (best PSNR: the default) and fc, one version each."""
    store = ModelStore(tmp_path_factory.mktemp("api") / "store")
    _, conv = publish(store, "conv", "conv", seed=1, psnr=23.0, files={"loss_curve.png": LOSS_CURVE})
    _, fc = publish(store, "fc", "fc", seed=2, psnr=21.0)
    return store, {"conv": conv, "fc": fc}


@pytest.fixture(scope="module")
def client(served):
    with in_process_client(store=served[0].root, poll_interval_s=60) as client:
        yield client


# ---- body forms ---------------------------------------------------------------------
def test_multipart_json_and_raw_bodies_give_the_models_outputs(client, served, inputs, pngs):
    conv = served[1]["conv"]
    response = client.post("/upscale", files=multipart(pngs[:5]))
    assert response.json()["model"] == {"name": "conv", "version": 1}  # the default: the largest gain over bicubic
    assert_close_to(outputs_of(response), expected_outputs(conv, inputs[:5]))
    metrics = response.json()["metrics"]
    assert metrics["images"] == 5 and metrics["device"] == "cpu" and 1 <= metrics["batch_size"] <= 64
    assert metrics["total_ms"] >= metrics["inference_ms"] > 0 and metrics["queue_ms"] >= 0

    body = {"images": [base64.b64encode(data).decode() for data in pngs[5:8]]}
    response = client.post("/upscale?model=fc&version=1", json=body)
    assert response.json()["model"] == {"name": "fc", "version": 1}
    assert_close_to(outputs_of(response), expected_outputs(served[1]["fc"], inputs[5:8]))

    response = client.post("/upscale?model=conv", content=pngs[8], headers={"content-type": "image/png"})
    assert_close_to(outputs_of(response), expected_outputs(conv, inputs[8:9]))


def test_other_formats_are_accepted(client, inputs):
    for fmt, media in [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("BMP", "image/bmp")]:
        response = client.post("/upscale", content=png_bytes(inputs[0], fmt=fmt), headers={"content-type": media})
        assert response.status_code == 200, (fmt, response.text)


def test_accept_png_returns_the_image_with_timing_and_model_headers(client, served, inputs, pngs):
    response = client.post("/upscale", files=multipart(pngs[:1]), headers={"accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-upgrader-model"] == "conv:1"
    timing = response.headers["server-timing"]
    assert all(f"{name};dur=" in timing for name in ("queue", "inference", "total"))
    assert_close_to(decode_png(response.content)[None], expected_outputs(served[1]["conv"], inputs[:1]))
    assert_error(client.post("/upscale", files=multipart(pngs[:2]), headers={"accept": "image/png"}), 406, "not_acceptable")


def test_references_add_psnr_and_ssim_of_what_the_client_receives(client, real_images, pngs):
    references = [png_bytes(image) for image in real_images[:3]]
    response = client.post("/upscale", files=multipart(pngs[:3], references=references))
    outputs = outputs_of(response)
    psnr = psnr_per_image(to_float(outputs), to_float(real_images[:3]))
    ssim = ssim_per_image(to_float(outputs), to_float(real_images[:3]))
    for image, p, s in zip(response.json()["images"], psnr.tolist(), ssim.tolist(), strict=True):
        assert image["psnr"] == pytest.approx(p, abs=1e-3) and image["ssim"] == pytest.approx(s, abs=1e-5)
    body = {"images": [base64.b64encode(d).decode() for d in pngs[:1]], "references": [base64.b64encode(references[0]).decode()]}
    assert "psnr" in client.post("/upscale", json=body).json()["images"][0]
    assert "psnr" not in client.post("/upscale", files=multipart(pngs[:1])).json()["images"][0]


def expected_ensemble(model: torch.nn.Module, inputs: torch.Tensor, size: int = 8) -> torch.Tensor:
    with torch.inference_mode():
        return quantise(self_ensemble(model, to_float(inputs), size))


def test_self_ensemble_averages_two_four_or_eight_views(client, served, inputs, pngs):
    answers = {}
    for size in (2, 4, 8):
        answers[size] = outputs_of(client.post(f"/upscale?ensemble={size}", files=multipart(pngs[:4])))
        assert_close_to(answers[size], expected_ensemble(served[1]["conv"], inputs[:4], size))
    assert (answers[2].int() - answers[8].int()).abs().max() > 1  # different views, different answers
    for bad in (3, 16, 0):
        error = assert_error(client.post(f"/upscale?ensemble={bad}", files=multipart(pngs[:1])), 422, "invalid_parameter")
        assert error["message"].startswith("query.ensemble: ") and "1, 2, 4, 8" in error["message"], error  # names the parameter


# ---- the bad-input matrix -------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _huge_header() -> bytes:
    from test_service_codec import png_with_declared_size

    return png_with_declared_size(100_000, 100_000)


BAD_REQUESTS = {
    # name: (query, request kwargs from the good PNGs, status, code, item)
    "not an image": ("", lambda p: {"files": multipart([p[0], b"GIF89a? no, just text"])}, 415, "unsupported_image", 1),
    "truncated png": ("", lambda p: {"files": multipart([p[0], p[1], p[2][: len(p[2]) // 2]])}, 400, "corrupt_image", 2),
    "9x8": ("", lambda p: {"files": multipart([png_bytes(np.zeros((8, 9, 3), np.uint8))])}, 422, "wrong_size", 0),
    "32x32": ("", lambda p: {"files": multipart([p[0], png_bytes(np.zeros((32, 32, 3), np.uint8))])}, 422, "wrong_size", 1),
    "1x1": ("", lambda p: {"files": multipart([png_bytes(np.zeros((1, 1, 3), np.uint8))])}, 422, "wrong_size", 0),
    "huge declared size": ("", lambda p: {"files": multipart([p[0], _huge_header()])}, 413, "dimensions_too_large", 1),
    "empty part": ("", lambda p: {"files": multipart([p[0], b""])}, 400, "empty_image", 1),
    "too many images": ("", lambda p: {"files": multipart([p[0]] * 257)}, 413, "too_many_images", 256),
    "way too many parts": ("", lambda p: {"files": multipart([p[0]] * 600)}, 413, "too_many_images", 256),
    "wrong field": ("", lambda p: {"files": multipart([p[0]], field="image")}, 422, "unknown_field", None),
    "text field": ("", lambda p: {"data": {"images": "abc"}, "files": multipart([p[0]])}, 422, "not_a_file", 0),
    "no images": ("", lambda p: {"json": {"images": []}}, 422, "missing_images", None),
    "json without images": ("", lambda p: {"json": {}}, 422, "missing_images", None),
    "json wrong field": ("", lambda p: {"json": {"images": [_b64(p[0])], "imgs": []}}, 422, "unknown_field", None),
    "json wrong type": ("", lambda p: {"json": {"images": [_b64(p[0]), 5]}}, 422, "invalid_body", 1),
    "invalid base64": ("", lambda p: {"json": {"images": [_b64(p[0]), "!!!"]}}, 400, "invalid_base64", 1),
    "invalid json": ("", lambda p: {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "invalid_json", None),
    "unsupported content type": ("", lambda p: {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", None),
    "no body": ("", lambda p: {}, 415, "unsupported_media_type", None),
    "references not aligned": ("", lambda p: {"files": multipart(p[:2], references=[png_bytes(np.zeros((32, 32, 3), np.uint8))])}, 422, "references_mismatch", None),
    "reference of the wrong size": ("", lambda p: {"files": multipart(p[:1], references=[p[1]])}, 422, "wrong_size", 0),
    "unknown model": ("?model=nope", lambda p: {"files": multipart(p[:1])}, 404, "model_not_found", None),
    "unknown version": ("?model=conv&version=99", lambda p: {"files": multipart(p[:1])}, 404, "version_not_found", None),
    "unknown alias": ("?model=conv&version=stable", lambda p: {"files": multipart(p[:1])}, 404, "version_not_found", None),
    "malformed version": ("?version=../1", lambda p: {"files": multipart(p[:1])}, 422, "invalid_parameter", None),
    "malformed model name": ("?model=../../etc", lambda p: {"files": multipart(p[:1])}, 404, "model_not_found", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_json_error_naming_the_item(client, pngs, case):
    query, make, status, code, item = BAD_REQUESTS[case]
    error = assert_error(client.post(f"/upscale{query}", **make(pngs)), status, code, item)
    if item is not None and code not in ("too_many_images",):
        assert str(item) in error["message"]


def test_bad_input_never_became_a_500(client):
    text = client.get("/metrics").text
    assert not [line for line in text.splitlines() if line.startswith("upgrader_requests_total") and 'status="5' in line]


def test_unknown_routes_and_methods_are_json_errors(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/upscale"), 405, "method_not_allowed")
    assert_error(client.get("/models/conv/versions/1/weights.safetensors"), 422, "invalid_parameter")


@pytest.fixture(scope="module")
def tight(served):
    """Small limits: 10 images a request, batches of 3, 8 KiB bodies."""
    with in_process_client(store=served[0].root, poll_interval_s=60, max_batch_images=3, max_images_per_request=10,
                           max_queue_images=10, max_body_bytes=8192, max_image_bytes=1024) as client:
        yield client


def test_large_requests_are_split_across_batches_in_order(tight, served, inputs, pngs):
    response = tight.post("/upscale?model=conv", files=multipart(pngs[:10]))
    assert response.json()["metrics"]["batch_size"] == 3
    assert_close_to(outputs_of(response), expected_outputs(served[1]["conv"], inputs[:10]))


def test_body_and_image_size_limits(tight, pngs):
    assert_error(tight.post("/upscale", content=b"\x89PNG" + b"0" * 9000, headers={"content-type": "image/png"}), 413, "body_too_large")
    chunked = (chunk for chunk in [b"\x89PNG", b"0" * 5000, b"0" * 5000])  # no Content-Length: counted while streaming
    assert_error(tight.post("/upscale", content=chunked, headers={"content-type": "image/png"}), 413, "body_too_large")
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8), fmt="BMP") + b"\0" * 1024
    assert_error(tight.post("/upscale", files=multipart([pngs[0], big])), 413, "image_too_large", 1)
    assert_error(tight.post("/upscale", files=multipart([pngs[0]] * 11)), 413, "too_many_images", 10)


# ---- queue, deadline, readiness ---------------------------------------------------------
@asynccontextmanager
async def running(**settings):
    """The app with its lifespan, and an async in-process client (requests really run concurrently)."""
    app = create_app(Settings(**settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=60) as client:
            yield client


def test_a_full_queue_answers_503_with_retry_after_at_once(served, pngs):
    async def scenario():
        # The batcher waits up to 1 s for a full batch that never comes, so the first request's
        # 4 images fill the queue and the others are refused while it waits.
        async with running(store=served[0].root, max_queue_images=4, max_images_per_request=4, max_wait_ms=1000, idle_dispatch=False) as client:
            return await asyncio.gather(*[client.post("/upscale", files=multipart(pngs[i : i + 4])) for i in range(0, 24, 4)])

    responses = asyncio.run(scenario())
    refused = [r for r in responses if r.status_code == 503]
    assert refused and any(r.status_code == 200 for r in responses)
    assert all(r.status_code in (200, 503) for r in responses)
    for response in refused:
        assert_error(response, 503, "queue_full")
        assert int(response.headers["retry-after"]) >= 1


def test_concurrent_plain_and_ensemble_requests_never_share_a_forward_pass(served, inputs, pngs):
    async def scenario():
        async with running(store=served[0].root, max_wait_ms=50, max_batch_images=5, idle_dispatch=False) as client:
            return await asyncio.gather(*[client.post(f"/upscale?ensemble={1 if k % 2 else 8}", files=multipart(pngs[3 * k : 3 * k + 3]))
                                          for k in range(8)])

    conv = served[1]["conv"]
    for k, response in enumerate(asyncio.run(scenario())):
        x = inputs[3 * k : 3 * k + 3]
        assert_close_to(outputs_of(response), expected_outputs(conv, x) if k % 2 else expected_ensemble(conv, x))
        assert response.json()["metrics"]["batch_size"] <= 5


def test_a_request_past_its_deadline_gets_504(served, pngs):
    async def scenario():
        async with running(store=served[0].root, request_timeout_s=0.05, max_wait_ms=2000, idle_dispatch=False) as client:
            return await client.post("/upscale", files=multipart(pngs[:2]))

    assert_error(asyncio.run(scenario()), 504, "deadline_exceeded")


def test_empty_store_is_alive_but_not_ready_and_says_why_once(tmp_path, pngs, caplog):
    with caplog.at_level(logging.ERROR, logger="service.runtime.registry"), \
            in_process_client(store=tmp_path / "empty", poll_interval_s=0.05) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert_error(ready, 503, "not_ready")
        assert "holds no models" in ready.json()["error"]["message"]
        time.sleep(0.3)  # several polls of the empty store
        causes = [r.getMessage() for r in caplog.records if "holds no models" in r.getMessage()]
        assert len(causes) == 1, causes  # one line naming the cause, not one per poll
        response = client.post("/upscale", files=multipart(pngs[:1]))
        assert_error(response, 503, "no_model_loaded")
        assert response.headers["retry-after"] == "1"
        assert client.get("/models").json() == {"default_model": None, "device": "cpu", "precision": "float32", "models": []}


# ---- models ---------------------------------------------------------------------------
def test_default_model_is_the_largest_gain_over_bicubic_not_the_highest_psnr(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, "easy-images", "conv", seed=0, psnr=22.5, bicubic_psnr=21.0)  # scored on easier images: +1.5 dB
    publish(store, "better", "conv", seed=1, psnr=22.0, bicubic_psnr=20.0)  # +2.0 dB
    publish(store, "unscored", "conv", seed=2, psnr=23.0, bicubic_psnr=None)  # no baseline: ranks after the others
    with in_process_client(store=store.root, poll_interval_s=60) as client:
        assert client.get("/models").json()["default_model"] == "better"


def test_models_lists_everything_with_what_is_loaded_and_default(client, served):
    listing = client.get("/models").json()
    assert listing["default_model"] == "conv"
    by_name = {m["name"]: m for m in listing["models"]}
    assert set(by_name) == {"conv", "fc"}
    conv = by_name["conv"]
    manifest = served[0].manifest("conv", 1)
    assert conv["architecture"] == {"name": "conv", "params": {}} and conv["parameter_count"] == manifest["parameter_count"]
    assert conv["is_default"] and not by_name["fc"]["is_default"]
    assert conv["serving_version"] == 1 and conv["loaded_versions"] == [1] and conv["aliases"] == {"latest": 1}
    (version,) = conv["versions"]
    assert version["status"] == "serving" and version["aliases"] == ["latest"]
    assert version["weights_sha256"] == manifest["weights_sha256"] and version["created_at"] == manifest["created_at"]
    assert version["metrics"]["bicubic"]["psnr"] == 19.0 and version["dataset"]["name"] == "cifar10-jpeg"
    assert version["recipe"]["optimizer"] == "adam"
    assert client.get("/models/conv").json() == conv
    assert_error(client.get("/models/nope"), 404, "model_not_found")


def test_models_show_the_natural_validation_next_to_cifar(tmp_path):
    """A version trained with --natural has both validations; GET /models and the version detail show both."""
    store = ModelStore(tmp_path / "store")
    publish(store, "sr", "subpixel_residual", seed=3, psnr=22.5, natural_psnr=30.1)
    publish(store, "conv", "conv", seed=1, psnr=20.0)  # today's manifests, without natural metrics, still list
    with in_process_client(store=store.root, poll_interval_s=60) as client:
        by_name = {m["name"]: m for m in client.get("/models").json()["models"]}
        (version,) = by_name["sr"]["versions"]
        assert version["metrics"]["model"]["psnr"] == 22.5 and version["metrics"]["bicubic"]["psnr"] == 19.0
        assert version["metrics"]["natural"]["model"]["psnr"] == 30.1 and version["metrics"]["natural"]["bicubic"]["psnr"] == 28.5
        assert version["dataset"]["mix"] == {"cifar10-jpeg": 0.5, "sr-natural": 0.5}
        assert version["dataset"]["natural"]["fingerprint"] == "test-natural"
        assert "natural" not in by_name["conv"]["versions"][0]["metrics"]
        detail = client.get("/models/sr/versions/1").json()
        assert detail["metrics"]["natural"] == store.manifest("sr", 1)["metrics"]["natural"]


def test_version_detail_and_pictures(client, served):
    detail = client.get("/models/conv/versions/1").json()
    assert detail["manifest"] == served[0].manifest("conv", 1) and detail["status"] == "serving"
    assert client.get("/models/conv/versions/latest").json() == detail
    assert_error(client.get("/models/conv/versions/7"), 404, "version_not_found")
    picture = client.get("/models/conv/versions/1/loss_curve.png")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png" and picture.content == LOSS_CURVE
    assert_error(client.get("/models/conv/versions/1/samples.png"), 404, "file_not_found")


def test_admin_alias_needs_the_token_and_moves_the_alias(store, inputs, pngs):
    publish(store, "conv", seed=1)
    _, second = publish(store, "conv", seed=2)
    with in_process_client(store=store.root, poll_interval_s=60) as client:
        assert_error(client.put("/models/conv/aliases/stable", json={"version": 1}), 403, "admin_disabled")
    with in_process_client(store=store.root, poll_interval_s=60, admin_token="s3cret") as client:
        assert client.post("/upscale?version=1", files=multipart(pngs[:1])).json()["model"]["version"] == 1  # loaded on demand
        assert_error(client.put("/models/conv/aliases/stable", json={"version": 1}), 401, "unauthorized")
        wrong = {"authorization": "Bearer nope"}
        assert_error(client.put("/models/conv/aliases/stable", json={"version": 1}, headers=wrong), 401, "unauthorized")
        admin = {"authorization": "Bearer s3cret"}
        response = client.put("/models/conv/aliases/stable", json={"version": 1}, headers=admin)
        assert response.status_code == 200 and response.json() == {"name": "conv", "alias": "stable", "version": 1}
        assert store.aliases("conv")["stable"] == 1
        assert client.post("/upscale?version=stable", files=multipart(pngs[:1])).json()["model"]["version"] == 1
        assert client.post("/upscale", files=multipart(pngs[:1])).json()["model"]["version"] == 2
        assert client.get("/models/conv").json()["aliases"] == {"latest": 2, "stable": 1}
        # roll forward again, by alias
        assert client.put("/models/conv/aliases/stable", json={"version": "latest"}, headers=admin).json()["version"] == 2
        assert_close_to(outputs_of(client.post("/upscale?version=stable", files=multipart(pngs[:2]))), expected_outputs(second, inputs[:2]))
        assert_error(client.put("/models/conv/aliases/latest", json={"version": 1}, headers=admin), 422, "invalid_alias")
        assert_error(client.put("/models/conv/aliases/old", json={"version": 9}, headers=admin), 404, "version_not_found")
        assert_error(client.put("/models/nope/aliases/old", json={"version": 1}, headers=admin), 404, "model_not_found")


def test_api_keys_guard_everything_but_health(served, pngs):
    with in_process_client(store=served[0].root, poll_interval_s=60, api_keys="k1,k2") as client:
        response = client.post("/upscale", files=multipart(pngs[:1]))
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(client.post("/upscale", files=multipart(pngs[:1]), headers={"authorization": "Bearer k3"}), 401, "unauthorized")
        assert client.post("/upscale", files=multipart(pngs[:1]), headers={"authorization": "Bearer k2"}).status_code == 200
        assert client.post("/upscale", files=multipart(pngs[:1]), headers={"x-api-key": "k1"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        for path in ("/models", "/models/conv", "/models/conv/versions/1", "/models/conv/versions/1/loss_curve.png",
                     "/metrics", "/docs", "/redoc", "/openapi.json"):
            assert_error(client.get(path), 401, "unauthorized")
            assert client.get(path, headers={"x-api-key": "k1"}).status_code == 200, path
    with in_process_client(store=served[0].root, poll_interval_s=60, api_keys="k1", metrics_public=True) as client:
        assert client.get("/metrics").status_code == 200  # opened to a scraper
        assert_error(client.get("/models"), 401, "unauthorized")


# ---- operations -----------------------------------------------------------------------
def test_metrics_expose_requests_latency_batches_queue_and_images(client, pngs):
    before = metric_value(client.get("/metrics").text, "upgrader_images_served_total", model="conv")
    timed = metric_value(client.get("/metrics").text, "upgrader_request_seconds_count", model="conv")
    client.post("/upscale", files=multipart(pngs[:3]))
    client.post("/upscale", files=multipart(pngs[:1]), headers={"accept": "image/png"})
    client.post("/upscale?model=nope", files=multipart(pngs[:1]))
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, "upgrader_images_served_total", model="conv") == before + 4
    assert metric_value(text, "upgrader_requests_total", model="conv", status="200") >= 1
    assert metric_value(text, "upgrader_requests_total", model="-", status="404") >= 1
    assert metric_value(text, "upgrader_request_seconds_count", model="conv") == timed + 2
    assert metric_value(text, "upgrader_batch_images_count", model="conv") >= 1
    assert metric_value(text, "upgrader_inference_seconds_count", model="conv") >= 1
    assert metric_value(text, "upgrader_queue_images", model="conv", version="1") == 0
    assert metric_value(text, "upgrader_serving_version", model="conv") == 1
    assert "# TYPE upgrader_model_load_failures_total counter" in text


def test_readiness_health_request_id_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["default_model"] == "conv" and ready["loaded"] == {"conv": [1], "fc": [1]}
    assert client.get("/healthz", headers={"x-request-id": "trace-42"}).headers["x-request-id"] == "trace-42"
    generated = [client.get("/healthz", headers={"x-request-id": "bad id\n"}).headers["x-request-id"] for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", rid) for rid in generated) and generated[0] != generated[1]
    spec = client.get("/openapi.json").json()
    upscale = spec["paths"]["/upscale"]["post"]
    assert {"multipart/form-data", "application/json", "image/png", "image/jpeg"} <= set(upscale["requestBody"]["content"])
    assert {"200", "400", "401", "404", "406", "413", "415", "422", "503", "504"} <= set(upscale["responses"])
    assert {p for p in spec["paths"]} >= {"/models", "/models/{name}", "/models/{name}/versions/{version}",
                                          "/models/{name}/versions/{version}/{picture}", "/models/{name}/aliases/{alias}",
                                          "/healthz", "/readyz", "/metrics"}
    assert client.get("/docs").status_code == 200


def test_png_compression_setting_changes_the_encoding_not_the_pixels(client, served, pngs):
    stored = client.post("/upscale", files=multipart(pngs[:4]))
    with in_process_client(store=served[0].root, poll_interval_s=60, png_compression=9) as deflating:
        deflated = deflating.post("/upscale", files=multipart(pngs[:4]))
    sizes = [[len(base64.b64decode(image["png"])) for image in r.json()["images"]] for r in (stored, deflated)]
    assert all(size > 3 * 32 * 32 for size in sizes[0])  # level 0: the pixels as they are
    assert all(small < big for small, big in zip(sizes[1], sizes[0], strict=True))
    assert torch.equal(outputs_of(stored), outputs_of(deflated))


def test_an_idle_worker_runs_a_request_at_once_instead_of_waiting_out_the_window(served, pngs):
    """idle_dispatch (the default): a lone request does not wait for company; without it, it waits the whole window."""
    async def one(**settings):
        async with running(store=served[0].root, max_wait_ms=1000, **settings) as client:
            response = await client.post("/upscale", files=multipart(pngs[:1]))
            assert response.status_code == 200, response.text
            return response.json()["metrics"]["queue_ms"]

    assert asyncio.run(one()) < 500  # typically well under 1 ms
    assert asyncio.run(one(idle_dispatch=False)) >= 990


async def _closed_loop(fixed_cost_s: float, think_s: float = 0.02) -> tuple[list[int], Batcher]:
    """Two closed-loop clients against a model whose pass takes 0.2 s: each sends its next request `think_s` after its answer.

    The first request runs alone (the worker was idle) and the second queues behind it, past its 150 ms window by the
    time the worker frees. Returns every batch's size, and the batcher."""
    sizes: list[int] = []

    def run_batch(images, ensemble, png):
        sizes.append(len(images))
        time.sleep(0.2)
        return BatchOutput(np.zeros((len(images), 3, 32, 32), np.uint8), [None] * len(images))

    batcher = Batcher("slow:1", run_batch, max_batch_images=8, max_wait_ms=150, max_queue_images=64, retry_after_s=1,
                      metrics=Metrics(), model="slow", version=1, fixed_cost_s=fixed_cost_s)
    image = np.zeros((1, 3, 8, 8), np.uint8)

    async def client(start_after_s: float) -> None:
        await asyncio.sleep(start_after_s)
        for _ in range(3):
            await batcher.submit(image, 1, 30)
            await asyncio.sleep(think_s)

    try:
        await asyncio.gather(client(0), client(0.01))
    finally:
        await batcher.close()
    return sizes, batcher


def test_a_model_with_a_large_fixed_cost_waits_for_the_clients_just_answered(served):
    """Closed-loop clients split into groups that alternate half batches; the batcher merges them when a pass's fixed cost pays for the wait."""
    alone, batcher = asyncio.run(_closed_loop(fixed_cost_s=0.0))
    assert alone[:2] == [1, 1] and sum(alone) == 6 and batcher.regroup_waits == 0  # no fixed cost: the queued request runs at once
    # 0.5 s of fixed cost (the wait capped at max_wait_ms, 0.15 s): the queued request waits 20 ms for the one just answered.
    merged, batcher = asyncio.run(_closed_loop(fixed_cost_s=0.5))
    assert merged[:2] == [1, 2] and sum(merged) == 6 and batcher.regroup_waits >= 1
    assert 0.01 < batcher.turnaround_s < 0.1  # learnt from the arrivals: ~20 ms
    # Clients that take 0.3 s to come back, longer than the wait may be: learnt, and then not waited for.
    slow, batcher = asyncio.run(_closed_loop(fixed_cost_s=0.5, think_s=0.3))
    assert sum(slow) == 6 and max(slow) == 1 and batcher.turnaround_s > 0.15
    now = time.perf_counter()
    batcher._answered = 1
    batcher._answered, batcher._returned, batcher._delivered_at = 1, 0, now  # one image just answered
    assert batcher.window(now, oldest=now - 1) == (1, now, False)  # an old queue runs at once
    batcher.turnaround_s = 0.05
    assert batcher.window(now, oldest=now - 1) == (1, now + 0.15, True)  # clients that come back fast are waited for
    batcher._delivered_at = None  # all of them are back: a young queue waits out its own window, no longer
    assert batcher.window(now, oldest=now - 0.1) == (8, now - 0.1 + 0.15, False)


def test_the_access_line_written_directly_is_the_formatters_line():
    """log_access's direct path (service.observability.logs.JsonFormatter.access_line) writes what Logger.info + JsonFormatter would."""
    import logging

    from service.observability.logs import JsonFormatter, request_id

    formatter = JsonFormatter()
    created = 1_790_000_000.0427
    for rid in (None, "req-7"):
        token = request_id.set(rid)
        try:
            for path in ("/v2/models/conv/infer", '/a "quoted" \\ path/é\u2028'):
                record = logging.getLogger("service.access").makeRecord(
                    "service.access", logging.INFO, "", 0, "request", (), None,
                    extra={"method": "POST", "path": path, "status": 404, "ms": 12.5})
                record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
                assert formatter.access_line("POST", path, 404, 12.5, created) == formatter.format(record)
                assert json.loads(formatter.access_line("POST", path, 404, 12.5, created))["path"] == path
        finally:
            request_id.reset(token)



def trained_looking(arch: str, params: dict) -> torch.nn.Module:
    """A seeded model whose identity-initialised parts (global attention's last projections) are not the identity."""
    torch.manual_seed(3)
    model = build_model(arch, **params)
    for name, parameter in model.named_parameters():
        if name.startswith("context."):
            torch.nn.init.normal_(parameter, std=0.2)
    return model


@pytest.mark.parametrize("arch, params", [("conv", {}), ("subpixel_residual", {}),
                                          ("subpixel_residual", {"width": 16, "depth": 1, "global_attention": 1})],
                         ids=["conv", "subpixel_residual", "global_attention"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("forward", ["trace", "frozen", "openvino"])
def test_the_upscaler_answers_the_models_outputs_as_nchw_whichever_memory_format_it_runs_in(tmp_path, real_images, arch, params,
                                                                                            memory_format, forward):
    if forward == "openvino":
        pytest.importorskip("openvino", reason="openvino is a dependency (pyproject.toml), absent from this environment")
    store = ModelStore(tmp_path / "store")
    _, model = publish(store, arch, arch, model=trained_looking(arch, params), params=params)
    upscaler = Upscaler(store, arch, 1, torch.device("cpu"), 64)
    upscaler.setup()  # picks the fastest format and forward by timing; here each is forced in turn
    with torch.inference_mode():
        upscaler.model, upscaler.memory_format, chosen = fastest_cpu_forward(model, formats=(memory_format,), forwards=(forward,))
    assert chosen == forward  # frozen: TorchScript froze and optimised this architecture; openvino: OpenVINO compiled it
    for count in (16, 5):  # traced at other batch sizes: the trace must not have fixed one
        inputs = small_inputs(real_images[:count])
        out = upscaler.run_batch(inputs.numpy())
        assert out.images.shape == (count, 3, 32, 32) and out.images.flags.c_contiguous
        assert_close_to(torch.from_numpy(out.images), expected_outputs(model, inputs))
        assert all(torch.equal(decode_png(png), torch.from_numpy(image)) for png, image in zip(out.pngs, out.images, strict=True))


def test_openvino_leaves_its_threads_to_the_kernels_scheduler():
    """OpenVINO pins its inference threads to cores by default on Linux, and then the service's two worker
    processes shared one core (905-1,040 images/s together, 1,489-1,953 unpinned; docs/serving.md)."""
    pytest.importorskip("openvino", reason="openvino is a dependency (pyproject.toml), absent from this environment")
    from service.runtime.openvino_forward import openvino_forward

    compiled = openvino_forward(trained_looking("conv", {}).eval(), threads=1)
    assert compiled is not None and compiled.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert compiled.compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_openvino_converts_a_model_without_telemetry_forks_or_files_in_home(tmp_path):
    """OpenVINO's converter phones home (Google Analytics) unless the user opted out: it forked a process per event,
    32 a model, and wrote a client id under ~/intel. In a fresh interpreter with an empty HOME, converting a model
    through service.runtime.openvino_forward must fork nothing and write nothing there."""
    pytest.importorskip("openvino", reason="openvino is a dependency (pyproject.toml), absent from this environment")
    script = """
import sys
forks = []
sys.addaudithook(lambda event, args: forks.append(event) if event == "os.fork" else None)  # telemetry forked per event
import torch
from service.runtime.openvino_forward import openvino_forward
from upgrader.architectures import build_model
compiled = openvino_forward(build_model("conv").eval(), threads=1)
assert compiled is not None
print("forks", len(forks))
"""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("CI", None)  # the telemetry library stays quiet under CI=true; the service must be quiet everywhere
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "forks 0" in done.stdout, done.stdout
    assert not any(home.iterdir()), f"written under HOME: {sorted(p.name for p in home.rglob('*'))}"


def test_without_openvino_an_upscaler_asked_for_it_alone_runs_the_plain_trace(tmp_path, real_images, monkeypatch):
    """OpenVINO is one optional candidate: where it is not installed (simulated by hiding the module), a forward list
    naming only it falls back to the first format's plain trace and still answers the model's outputs."""
    import service.runtime.openvino_forward

    monkeypatch.setattr(service.runtime.openvino_forward, "openvino", None)
    model = trained_looking("conv", {})
    with torch.inference_mode():
        module, memory_format, chosen = fastest_cpu_forward(model, formats=(torch.channels_last,), forwards=("openvino",))
    assert (chosen, memory_format) == ("trace", torch.channels_last)
    inputs = small_inputs(real_images[:4]).float() / 255
    with torch.inference_mode():
        torch.testing.assert_close(module(inputs.contiguous(memory_format=memory_format)), model(inputs))


def test_models_set_up_at_once_time_their_forwards_one_at_a_time(tmp_path, monkeypatch):
    """The registry sets versions up concurrently; what setup times (the choice of forward, the fixed cost) must not
    run beside another model's timing (service.runtime.upscaler.TIMING_LOCK). Each timed step is recorded as it runs."""
    import service.runtime.upscaler

    spans: list[tuple[str, str, float, float]] = []

    def recorded(step, what):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                spans.append((threading.current_thread().name, what, started, time.perf_counter()))
        return run

    monkeypatch.setattr(service.runtime.upscaler, "fastest_cpu_forward", recorded(service.runtime.upscaler.fastest_cpu_forward, "choice"))
    monkeypatch.setattr(Upscaler, "measure_fixed_cost", recorded(Upscaler.measure_fixed_cost, "fixed cost"))
    store = ModelStore(tmp_path / "store")
    for name, seed in (("first", 1), ("second", 2)):
        publish(store, name, "conv", seed=seed)
    upscalers = [Upscaler(store, name, 1, torch.device("cpu"), 64) for name in ("first", "second")]
    threads = [threading.Thread(target=upscaler.setup, name=upscaler.name) for upscaler in upscalers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted((who, what) for who, what, _, _ in spans) == [("first", "choice"), ("first", "fixed cost"),
                                                                 ("second", "choice"), ("second", "fixed cost")]
    by_model = {who: (min(s for w, _, s, _ in spans if w == who), max(e for w, _, _, e in spans if w == who))
                for who in ("first", "second")}
    earlier, later = sorted(by_model.values())
    assert earlier[1] <= later[0], f"one model's timing ran beside the other's: {by_model}"


def test_a_forward_timed_by_one_upscaler_is_built_alone_by_the_next_and_retimed_where_its_signature_differs(tmp_path, real_images,
                                                                                                            monkeypatch, caplog):
    """service.runtime.forward_choices: what the service's workers share. The first upscaler of a version times every
    candidate and writes its choice and fixed cost; the next, with the same file, builds exactly that forward and
    takes that fixed cost without timing; a
    different thread count (or weights, CPU, versions) is another signature and is timed again. Here the workers
    are upscalers in one process; tests/test_service_e2e.py has two worker processes."""
    import service.runtime.upscaler

    asked: list[tuple[tuple, tuple]] = []
    real_fastest = service.runtime.upscaler.fastest_cpu_forward

    def recorded(model, **kwargs):
        asked.append((kwargs["formats"], kwargs["forwards"]))
        return real_fastest(model, **kwargs)

    monkeypatch.setattr(service.runtime.upscaler, "fastest_cpu_forward", recorded)
    store = ModelStore(tmp_path / "store")
    _, model = publish(store, "conv", "conv", seed=8)
    choices = ForwardChoices(tmp_path / "run" / "forward_choices.json")

    def set_up() -> Upscaler:
        upscaler = Upscaler(store, "conv", 1, torch.device("cpu"), 64)
        upscaler.forward_choices = choices
        upscaler.setup()
        return upscaler

    first, second = set_up(), set_up()
    assert first.forward_source == "timed" and len(asked[0][0]) == 2 and len(asked[0][1]) == 3
    assert second.forward_source == "recorded" and asked[1] == ((first.memory_format,), (first.forward,))
    # The same forward, and the same fixed cost (the batcher's regrouping wait), measured once.
    assert (second.forward, second.memory_format, second.fixed_cost_s) == (first.forward, first.memory_format, first.fixed_cost_s)
    entry = json.loads(choices.path.read_text())["conv:1"]
    assert (entry["forward"], entry["fixed_cost_s"]) == (first.forward, first.fixed_cost_s)
    assert entry["signature"]["weights_sha256"] == second.manifest["weights_sha256"]
    inputs = small_inputs(real_images[:6])
    assert_close_to(torch.from_numpy(second.run_batch(inputs.numpy()).images), expected_outputs(model, inputs))

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert set_up().forward_source == "timed"
    finally:
        torch.set_num_threads(threads)
    assert json.loads(choices.path.read_text())["conv:1"]["signature"]["threads"] == threads + 1  # the newest choice replaces it

    choices.path.write_text("{not json")  # a damaged file costs one timing, never a load
    with caplog.at_level("WARNING", logger="service.runtime.forward_choices"):
        assert set_up().forward_source == "timed"
    assert any(r.getMessage() == "forward choices unreadable; timing again" for r in caplog.records)
    assert set(json.loads(choices.path.read_text())) == {"conv:1"}


def test_a_pinned_cpu_forward_is_the_one_that_runs(tmp_path, real_images, caplog):
    """UPGRADER_CPU_FORWARD=frozen: the service narrows the candidates to it (only its memory format is timed), and
    says so in the version's load log."""
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", "conv", seed=9)
    with caplog.at_level("INFO", logger="service.runtime.registry"), in_process_client(store=store.root, poll_interval_s=60,
                                                                              cpu_forward="frozen") as client:
        assert client.post("/upscale?model=conv", files=multipart(png_list(small_inputs(real_images[:1])))).status_code == 200
    loaded = [r for r in caplog.records if r.getMessage() == "loaded version"]
    assert [(r.forward, r.forward_source) for r in loaded] == [("frozen", "pinned")]


def test_a_batch_shared_by_png_and_pixel_answers_encodes_only_the_marked_outputs_in_their_places(tmp_path, real_images):
    """V2 tensors and /upscale images can ride in one batch: each output marked for a PNG gets its own, the rest none."""
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", "conv", seed=4)
    upscaler = Upscaler(store, "conv", 1, torch.device("cpu"), 64)
    upscaler.setup()
    marks = [True, False, False, True, True, False, True, False]
    out = upscaler.run_batch(small_inputs(real_images[:8]).numpy(), png=marks)
    assert [png is not None for png in out.pngs] == marks
    assert all(torch.equal(decode_png(png), torch.from_numpy(image)) for png, image in zip(out.pngs, out.images, strict=True) if png)
    assert all(png is None for png in upscaler.run_batch(small_inputs(real_images[:3]).numpy(), png=[False] * 3).pngs)


def test_a_one_image_upscaler_sets_up_and_refuses_a_larger_batch_by_name(tmp_path, real_images):
    """UPGRADER_MAX_BATCH_IMAGES=1 (no batching): setup must not run two images through it. On CUDA its pinned
    buffers hold one image, and the first GPU run found setup's fixed-cost probe failing there (bench/gpu_check.sh)."""
    store = ModelStore(tmp_path / "store")
    _, model = publish(store, "conv", "conv", seed=5)
    upscaler = Upscaler(store, "conv", 1, torch.device("cpu"), 1)
    upscaler.setup()
    assert upscaler.fixed_cost_s == 0.0
    inputs = small_inputs(real_images[:2])
    assert_close_to(torch.from_numpy(upscaler.run_batch(inputs[:1].numpy()).images), expected_outputs(model, inputs[:1]))
    with pytest.raises(ValueError, match=r"conv:1: a batch of 2 images; this upscaler takes at most 1"):
        upscaler.run_batch(inputs.numpy())
