"""End to end over a real uvicorn on loopback: real PNG bytes of real images, concurrency, hot reload, shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time

import httpx
import pytest
from test_service_support import (
    LiveServer,
    ServiceProcess,
    assert_close_to,
    assert_error,
    assert_outputs_distinguishable,
    decode_png,
    expected_outputs,
    metric_value,
    multipart,
    outputs_of,
    png_list,
    publish,
    publish_corrupt_copy,
    small_inputs,
    wait_for,
)

from model_store import WEIGHTS_FILE, ModelStore

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)  # the real test images reduced to 8x8
pngs = pytest.fixture(scope="module", name="pngs")(png_list)  # ... as PNG bytes


@pytest.fixture(scope="module")
def models():
    """version -> the model published as that version of `conv` in the live store."""
    return {}


@pytest.fixture(scope="module")
def live(tmp_path_factory, models):
    store = ModelStore(tmp_path_factory.mktemp("e2e") / "store")
    version, models[1] = publish(store, "conv", seed=1)
    assert version == 1
    # A 20 ms batching window makes concurrent requests share batches; 0.1 s polling makes reloads quick.
    with LiveServer(store=store.root, poll_interval_s=0.1, max_wait_ms=20) as server:
        server.store = store
        yield server


def test_every_body_form_over_http(live, models, inputs, pngs):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        response = client.post("/upscale?model=conv", files=multipart(pngs[:8]))
        assert_close_to(outputs_of(response), expected_outputs(models[1], inputs[:8]))
        response = client.post("/upscale", json={"images": [base64.b64encode(p).decode() for p in pngs[8:11]]})
        assert_close_to(outputs_of(response), expected_outputs(models[1], inputs[8:11]))
        response = client.post("/upscale", content=pngs[11], headers={"content-type": "image/png", "accept": "image/png"})
        assert response.headers["content-type"] == "image/png" and response.headers["x-upgrader-model"] == "conv:1"
        assert "inference;dur=" in response.headers["server-timing"]
        assert_close_to(decode_png(response.content)[None], expected_outputs(models[1], inputs[11:12]))
        assert_error(client.post("/upscale", files=multipart([pngs[0], pngs[1][:30]])), 400, "corrupt_image", 1)
        assert client.get("/readyz").status_code == 200


def test_concurrent_requests_each_get_exactly_their_own_outputs_in_shared_batches(live, models, inputs, pngs):
    expected = expected_outputs(models[1], inputs)
    assert_outputs_distinguishable(expected)
    picks = [[(5 * k + j) % len(pngs) for j in range(1 + k % 3)] for k in range(48)]  # different images, 1-3 per request

    async def scenario():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*[client.post("/upscale", files=multipart([pngs[i] for i in pick])) for pick in picks])

    responses = asyncio.run(scenario())
    for pick, response in zip(picks, responses, strict=True):
        assert response.json()["model"] == {"name": "conv", "version": 1}
        assert_close_to(outputs_of(response), expected[pick])
    assert max(r.json()["metrics"]["batch_size"] for r in responses) > 1, "concurrent requests never shared a batch"


def test_hot_reload_swaps_in_a_new_version_without_failing_a_request(live, models, inputs, pngs):
    async def scenario():
        seen: list[tuple[int, int, httpx.Response]] = []  # (worker, image, response)
        stop = asyncio.Event()

        async def worker(w: int, client: httpx.AsyncClient):
            k = 0
            while not stop.is_set():
                i = (7 * w + k) % len(pngs)
                seen.append((w, i, await client.post("/upscale", files=multipart([pngs[i]]))))
                k += 1

        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            workers = [asyncio.create_task(worker(w, client)) for w in range(4)]
            while len(seen) < 8:
                await asyncio.sleep(0.01)
            version, models[2] = await asyncio.to_thread(publish, live.store, "conv", "conv", 2)
            assert version == 2
            deadline = time.monotonic() + 30
            while sum(r.status_code == 200 and r.json()["model"]["version"] == 2 for _, _, r in seen) < 8:
                assert time.monotonic() < deadline, "new version never served"
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.gather(*workers)
        return seen

    seen = asyncio.run(scenario())
    assert all(r.status_code == 200 for _, _, r in seen), [r.text for _, _, r in seen if r.status_code != 200]
    for w in range(4):  # each client moves from version 1 to version 2 once, never back
        versions = [r.json()["model"]["version"] for worker, _, r in seen if worker == w]
        assert versions == sorted(versions) and set(versions) <= {1, 2}
    for _, i, response in seen:
        version = response.json()["model"]["version"]
        assert_close_to(outputs_of(response), expected_outputs(models[version], inputs[i : i + 1]))
    with httpx.Client(base_url=live.url) as client:
        assert client.get("/models/conv").json()["serving_version"] == 2


def test_a_corrupted_new_version_is_refused_while_the_old_keeps_serving(live, pngs):
    store: ModelStore = live.store
    client = httpx.Client(base_url=live.url, timeout=30)
    serving = wait_for(lambda: client.get("/models/conv").json()["serving_version"], "a serving version")
    bad = publish_corrupt_copy(store, "conv", serving)

    def refused():
        versions = {v["version"]: v for v in client.get("/models/conv").json()["versions"]}
        return versions.get(bad, {}).get("status") == "failed" and versions[bad]

    info = wait_for(refused, f"version {bad} to be refused")
    assert WEIGHTS_FILE in info["error"] and "sha256" in info["error"]
    assert client.get("/models/conv").json()["serving_version"] == serving
    response = client.post("/upscale", files=multipart(pngs[:2]))
    assert response.status_code == 200 and response.json()["model"]["version"] == serving
    assert_error(client.post(f"/upscale?version={bad}", files=multipart(pngs[:1])), 503, "version_unavailable")
    time.sleep(0.3)  # a few more polls: refused once, not retried and re-counted on every scan
    assert metric_value(client.get("/metrics").text, "upgrader_model_load_failures_total", model="conv", version=str(bad)) == 1

    good, _ = publish(store, "conv", seed=3)  # and a good version after the bad one is served again
    wait_for(lambda: client.get("/models/conv").json()["serving_version"] == good, f"version {good} to be served")
    assert client.post("/upscale", files=multipart(pngs[:1])).json()["model"]["version"] == good
    client.close()


def test_graceful_shutdown_answers_everything_already_queued(store, inputs, pngs):
    _, model = publish(store, "conv", seed=4)
    # A 1 s batching window (applied even to an idle worker) for a batch of 64 that never fills:
    # the 56 images wait in the queue while the server is told to stop.
    with LiveServer(store=store.root, max_wait_ms=1000, max_batch_images=64, idle_dispatch=False) as live:
        registry = live.app.state.metrics.registry

        async def scenario():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                requests = [asyncio.create_task(client.post("/upscale", files=multipart(pngs[7 * k : 7 * k + 7]))) for k in range(8)]
                while registry.get_sample_value("upgrader_queue_images", {"model": "conv", "version": "1"}) != 56:
                    assert not any(task.done() for task in requests), "answered before the shutdown"
                    await asyncio.sleep(0.005)
                live.server.should_exit = True
                return await asyncio.gather(*requests)

        responses = asyncio.run(scenario())
        live.thread.join(30)
        assert not live.thread.is_alive()
        for k, response in enumerate(responses):
            assert_close_to(outputs_of(response), expected_outputs(model, inputs[7 * k : 7 * k + 7]))
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{live.url}/healthz")


@contextlib.contextmanager
def python_m_service(store: ModelStore, *flags: str, **env: str):
    """`python -m service` as a real subprocess on a free port, ready; SIGTERM on exit (then `.output` holds its logs)."""
    run = ServiceProcess(store.url, *flags, env=env)
    try:
        run.wait_ready()
        yield run
    finally:
        run.stop()


def test_python_m_service_serves_with_json_logs_and_stops_on_sigterm(store, pngs):
    publish(store, "conv", seed=5)
    with python_m_service(store, UPGRADER_MAX_WAIT_MS="1") as run:
        response = httpx.post(f"{run.url}/upscale", files=multipart(pngs[:1]), headers={"x-request-id": "cli-test-1"})
        assert response.status_code == 200 and response.headers["x-request-id"] == "cli-test-1"
    process, output = run.process, run.output
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit says "terminated by SIGTERM"
    assert process.returncode in (0, -signal.SIGTERM), output
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(logs) == len(output.splitlines()), "every log line is one JSON object"
    access = [entry for entry in logs if entry.get("request_id") == "cli-test-1"]
    assert access and access[-1]["path"] == "/upscale" and access[-1]["status"] == 200
    assert any(entry["message"] == "loaded version" and entry["model"] == "conv" for entry in logs)
    assert any(entry["message"] == "Application shutdown complete." for entry in logs)


def test_several_workers_share_the_port_and_report_combined_metrics(store, inputs, pngs, tmp_path):
    """`--workers 2`: two processes, each loading the model; every request answered right; /metrics adds both up. The
    CPU forward is timed once, by one of them, and recorded in the model cache: a restart times nothing."""
    _, model = publish(store, "conv", seed=6)
    expected = expected_outputs(model, inputs)
    picks = [[(3 * k + j) % len(pngs) for j in range(1 + k % 2)] for k in range(40)]
    cache = str(tmp_path / "model-cache")
    with python_m_service(store, "--workers", "2", UPGRADER_MAX_WAIT_MS="5", UPGRADER_MODEL_CACHE=cache) as run:
        url = run.url
        # The supervisor only supervises: torch (and its ~500 MB) is loaded by the workers alone.
        supervisor_maps = open(f"/proc/{run.process.pid}/maps").read()
        assert "libtorch" not in supervisor_maps and "torch/lib" not in supervisor_maps

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=40)) as client:
                return await asyncio.gather(*[client.post("/upscale", files=multipart([pngs[i] for i in pick])) for pick in picks])

        responses = asyncio.run(scenario())
        for pick, response in zip(picks, responses, strict=True):
            assert response.status_code == 200, response.text
            assert_close_to(outputs_of(response), expected[pick])
        # Whichever worker answers the scrape, it counts the requests of both (after the second has loaded too).
        counted = wait_for(lambda: metric_value(httpx.get(f"{url}/metrics").text, "upgrader_requests_total", model="conv", status="200")
                           == len(picks) or None, "/metrics to count every request", 30)
        assert counted
        images = metric_value(httpx.get(f"{url}/metrics").text, "upgrader_images_served_total", model="conv")
        assert images == sum(len(pick) for pick in picks)
    process, output = run.process, run.output
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    loaded = [entry for entry in logs if entry["message"] == "loaded version" and entry.get("model") == "conv"]
    assert len({entry["pid"] for entry in loaded}) == 2, f"expected two worker processes to load conv, got {loaded}"
    # One worker timed the CPU forwards; the other took its choice and fixed cost (service/runtime/forward_choices.py).
    assert sorted(entry["forward_source"] for entry in loaded) == ["recorded", "timed"], loaded
    assert len({(entry["forward"], entry["memory_format"], entry["fixed_cost_ms"]) for entry in loaded}) == 1, loaded
    assert process.returncode in (0, -signal.SIGTERM), output
    with python_m_service(store, "--workers", "2", UPGRADER_MAX_WAIT_MS="5", UPGRADER_MODEL_CACHE=cache) as again:
        assert httpx.post(f"{again.url}/upscale", files=multipart(pngs[:1])).status_code == 200
        # Ready means one worker serves; the other may still be loading: wait for both before stopping them.
        wait_for(lambda: len([e for e in again.logs() if e["message"] == "loaded version" and e.get("model") == "conv"]) == 2,
                 "both workers to load conv", 120)
    logs = [json.loads(line) for line in again.output.splitlines() if line.startswith("{")]
    reloaded = [entry for entry in logs if entry["message"] == "loaded version" and entry.get("model") == "conv"]
    assert [entry["forward_source"] for entry in reloaded] == ["recorded", "recorded"], reloaded
    assert {(entry["forward"], entry["memory_format"], entry["fixed_cost_ms"]) for entry in reloaded} == {
        (entry["forward"], entry["memory_format"], entry["fixed_cost_ms"]) for entry in loaded}
