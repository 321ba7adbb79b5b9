"""Beyond one machine: stateless replicas sharing one bucket of a real S3 server (SeaweedFS).

One scenario, run twice: on loopback, and as a multi-host rehearsal where the S3 server, the
trainer and every replica have their own network namespace (their own stack, one bridge between
them), so nothing relies on loopback or a shared store directory. In both:

1. two replicas (separate processes, ports and cache directories) serve version 1;
2. the real trainer publishes version 2: both serve it within a few polls, under load, with no
   failed request;
3. a corrupt version 3 is refused by both, version 2 keeps serving;
4. the S3 server is stopped: both keep serving (metric `upgrader_store_up` 0); a third replica
   started meanwhile is alive but not ready; the server comes back: version 4 is picked up by all
   three, with nothing restarted.
"""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
import sys
import threading
from collections import Counter

import httpx
import pytest
from netlab import lab, why_unavailable
from s3server import SeaweedS3
from test_service_support import (
    ServiceProcess,
    assert_close_to,
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

from model_store import ModelStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # three replicas, a trainer and an S3 restart: minutes on 2 busy cores

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)
pngs = pytest.fixture(scope="module", name="pngs")(png_list)

REPLICA_ENV = {"UPGRADER_POLL_INTERVAL_S": "0.5", "UPGRADER_POLL_MAX_BACKOFF_S": "2", "UPGRADER_MAX_WAIT_MS": "2",
               "UPGRADER_LOG_LEVEL": "INFO", "UPGRADER_S3_CONNECT_TIMEOUT_S": "1"}


class Load:
    """Clients posting one image at a time to every replica, round robin, until stopped; keeps every answer."""

    def __init__(self, urls: list[str], png: bytes) -> None:
        self.urls, self.png = urls, png
        self.answers: list[tuple[str, int, int | None]] = []  # (url, status, version)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            for url in itertools.cycle(self.urls):
                if self._stop.is_set():
                    return
                try:
                    response = client.post(f"{url}/upscale?model=conv", files=multipart([self.png]))
                    version = response.json()["model"]["version"] if response.status_code == 200 else None
                    self.answers.append((url, response.status_code, version))
                except httpx.TransportError as exc:
                    self.answers.append((url, -1, repr(exc)))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def serving(url: str) -> int | None:
    return httpx.get(f"{url}/models/conv", timeout=30).json()["serving_version"]


def run_scenario(server: SeaweedS3, store: ModelStore, data_dir, tmp_path, inputs, pngs, *, replica_host: str,
                 replica_ns: list[str | None], trainer_ns: str | None) -> None:
    env = {**server.env(), **REPLICA_ENV}
    _, first = publish(store, "conv", seed=1)
    replicas = [ServiceProcess(store.url, "--workers", "1", host=replica_host[i], netns=replica_ns[i],
                               env={**env, "UPGRADER_MODEL_CACHE": str(tmp_path / f"cache{i}")}) for i in range(2)]
    late = None
    try:
        for replica in replicas:
            replica.wait_ready()
            assert_close_to(outputs_of(httpx.post(f"{replica.url}/upscale", files=multipart(pngs[:4]), timeout=30)),
                            expected_outputs(first, inputs[:4]))
        urls = [r.url for r in replicas]
        with Load(urls, pngs[0]) as load:
            # 2. The real trainer publishes version 2 into the bucket.
            trainer = [sys.executable, "-m", "trainer", "--models", "conv", "--data", str(data_dir), "--store", store.url,
                       "--epochs", "1", "--limit-train", "256", "--limit-val", "64", "--no-progress", "--cache-dir", str(tmp_path / "data-cache")]
            subprocess.run((["ip", "netns", "exec", trainer_ns] if trainer_ns else []) + trainer, env={**os.environ, **server.env()},
                           check=True, capture_output=True, timeout=600)
            assert store.versions("conv") == [1, 2]
            for url in urls:
                wait_for(lambda url=url: serving(url) == 2, f"{url} to serve version 2", 60)
            # 3. A corrupt version 3: refused by both, version 2 keeps serving.
            bad = publish_corrupt_copy(store, "conv", 2)

            def refused(url: str) -> bool:
                versions = {v["version"]: v for v in httpx.get(f"{url}/models/conv", timeout=10).json()["versions"]}
                return versions.get(bad, {}).get("status") == "failed" and "sha256" in versions[bad]["error"]

            for url in urls:
                wait_for(lambda url=url: refused(url), f"{url} to refuse version {bad}", 60)
                assert serving(url) == 2
            # 4. The S3 server goes away: replicas keep serving what they have.
            server.stop()
            for url in urls:
                wait_for(lambda url=url: metric_value(httpx.get(f"{url}/metrics").text, "upgrader_store_up") == 0
                         and metric_value(httpx.get(f"{url}/metrics").text, "upgrader_store_errors_total") >= 1,
                         f"{url} to notice the store is down", 60)
                assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
            late = ServiceProcess(store.url, "--workers", "1", host=replica_host[2], netns=replica_ns[2],
                                  env={**env, "UPGRADER_MODEL_CACHE": str(tmp_path / "cache2")})
            wait_for(lambda: _answers(late.url, "/healthz") == 200, "the late replica to be alive", 120)
            assert _answers(late.url, "/readyz") == 503  # nothing loaded: not ready, not crashed
            answered_while_down = len(load.answers)
            wait_for(lambda: len(load.answers) > answered_while_down + 20, "requests answered while S3 is down", 60)
            # ... it comes back: new versions are picked up without a restart.
            server.start()
            _, fourth = publish(store, "conv", seed=4)
            for url in [*urls, late.url]:
                wait_for(lambda url=url: _answers(url, "/readyz") == 200 and serving(url) == 4, f"{url} to serve version 4", 90)
                assert_close_to(outputs_of(httpx.post(f"{url}/upscale", files=multipart(pngs[:4]), timeout=30)),
                                expected_outputs(fourth, inputs[:4]))
        statuses = Counter(status for _, status, _ in load.answers)
        assert statuses.keys() == {200}, f"failed requests under load: {statuses}, e.g. {[a for a in load.answers if a[1] != 200][:3]}"
        served = {(url, version) for url, _, version in load.answers}
        assert {(url, v) for url in urls for v in (2, 4)} <= served, "both replicas answered with versions 2 and 4 under load"
        assert len(load.answers) > 100
    finally:
        for replica in [*replicas, late]:
            if replica is not None:
                replica.stop()
                print(f"---- {replica.url} ----\n" + "\n".join(replica.output.splitlines()[-40:]))  # shown if the test fails
    for i in range(2):  # each replica downloaded what it served into its own cache
        assert (tmp_path / f"cache{i}" / "conv" / "4" / "weights.safetensors").is_file()
    logs = replicas[0].logs()
    assert any(entry["message"].startswith("model store unreachable") for entry in logs)
    assert any(entry["message"] == "model store reachable again" for entry in logs)


def _answers(url: str, path: str) -> int:
    try:
        return httpx.get(f"{url}{path}", timeout=5).status_code
    except httpx.TransportError:
        return -1


@pytest.fixture()
def store_in(monkeypatch):
    """A store on `server` under a fresh bucket, with this process's AWS variables pointing there."""

    def make(server: SeaweedS3) -> ModelStore:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        store = ModelStore(f"s3://scaleout-{secrets.token_hex(4)}/models")
        store.init()
        return store

    return make


def test_replicas_share_a_bucket_on_loopback(tmp_path, data_dir, inputs, pngs, store_in):
    with SeaweedS3(tmp_path / "s3") as server:  # its own server: this test stops and restarts it
        store = store_in(server)
        run_scenario(server, store, data_dir, tmp_path, inputs, pngs, replica_host=["127.0.0.1"] * 3,
                     replica_ns=[None] * 3, trainer_ns=None)


def test_replicas_share_a_bucket_across_network_namespaces(tmp_path, data_dir, inputs, pngs, store_in):
    reason = why_unavailable()
    if reason:
        pytest.skip(f"multi-host rehearsal needs network namespaces: {reason}")
    with lab("s3", "trainer", "r1", "r2", "r3") as net:
        server = SeaweedS3(tmp_path / "s3", host=net.address["s3"], netns=net.namespace["s3"])
        with server:
            store = store_in(server)  # this process is the client host on the bridge
            run_scenario(server, store, data_dir, tmp_path, inputs, pngs,
                         replica_host=[net.address[r] for r in ("r1", "r2", "r3")],
                         replica_ns=[net.namespace[r] for r in ("r1", "r2", "r3")], trainer_ns=net.namespace["trainer"])
