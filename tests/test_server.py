"""service.server: uvicorn as shipped. Past UPGRADER_MAX_CONNECTIONS a worker answers with uvicorn's own 503, as docs/api.md says."""

from __future__ import annotations

import socket

import httpx
from test_service_support import LiveServer, publish, wait_for

from model_store import ModelStore


def test_past_the_connection_cap_uvicorn_answers_its_own_plain_503(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", seed=1)
    with LiveServer(store=store.root, poll_interval_s=60, max_connections=2) as live:
        host, port = live.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]  # two idle keep-alive connections
        try:
            with httpx.Client(timeout=10) as third:
                answer = third.get(f"{live.url}/healthz")
            assert answer.status_code == 503
            assert answer.headers["content-type"].startswith("text/plain") and answer.text == "Service Unavailable"
            assert "x-request-id" not in answer.headers
        finally:
            for sock in held:
                sock.close()
        # The cap frees with the connections (once the server has seen them close).
        answer = wait_for(lambda: (r := httpx.get(f"{live.url}/healthz", timeout=10)).status_code == 200 and r, "the cap to free")
        assert answer.headers["x-request-id"]
