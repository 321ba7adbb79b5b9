"""service.app: the middleware stack every request passes: CORS, API keys, the request id, in that order."""

from __future__ import annotations

import pytest
from test_service_support import in_process_client, multipart, png_list, publish, small_inputs, v2_request

from model_store import ModelStore

inputs = pytest.fixture(scope="module", name="inputs")(small_inputs)
pngs = pytest.fixture(scope="module", name="pngs")(png_list)
APP = "https://app.example.com"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("app") / "store")
    publish(store, "conv", seed=1)
    return store


def preflight(client, path: str, origin: str = APP):
    return client.options(path, headers={"origin": origin, "access-control-request-method": "POST",
                                         "access-control-request-headers": "x-api-key, content-type"})


def v2_body(inputs) -> tuple[bytes, dict[str, str]]:
    head, body = v2_request("/v2/models/conv/infer", inputs[:2].numpy()).split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    return body, {"inference-header-content-length": headers["Inference-Header-Content-Length"], "content-type": "application/octet-stream"}


def test_without_cors_origins_no_answer_carries_cors_headers(store, pngs):
    with in_process_client(store=store.root, poll_interval_s=60) as client:
        assert "access-control-allow-origin" not in preflight(client, "/upscale").headers
        answer = client.post("/upscale", files=multipart(pngs[:1]), headers={"origin": APP})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_browser_apps_on_the_listed_origins_may_call_upscale_and_v2(store, pngs, inputs):
    with in_process_client(store=store.root, poll_interval_s=60, cors_origins=f"{APP}, https://other.example.org/",
                           api_keys="k1") as client:
        for path in ("/upscale", "/v2/models/conv/infer"):
            answer = preflight(client, path)  # no key: a preflight never carries one
            assert answer.status_code == 200, answer.text
            assert answer.headers["access-control-allow-origin"] == APP
            assert "POST" in answer.headers["access-control-allow-methods"]
            assert "x-api-key" in answer.headers["access-control-allow-headers"].lower()
        upscaled = client.post("/upscale", files=multipart(pngs[:1]), headers={"origin": APP, "x-api-key": "k1"})
        assert upscaled.status_code == 200 and upscaled.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in upscaled.headers["access-control-expose-headers"]
        body, headers = v2_body(inputs)
        inferred = client.post("/v2/models/conv/infer", content=body, headers={**headers, "origin": APP, "x-api-key": "k1"})
        assert inferred.status_code == 200 and inferred.headers["access-control-allow-origin"] == APP
        assert "inference-header-content-length" in inferred.headers["access-control-expose-headers"]
        # An error the browser app must be able to read carries the headers too.
        refused = client.post("/upscale", files=multipart(pngs[:1]), headers={"origin": "https://other.example.org"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://other.example.org"
        # An origin not on the list gets no permission.
        assert preflight(client, "/upscale", "https://evil.example.net").status_code == 400
        other = client.post("/upscale", files=multipart(pngs[:1]), headers={"origin": "https://evil.example.net", "x-api-key": "k1"})
        assert "access-control-allow-origin" not in other.headers


def test_api_keys_are_asked_once_for_every_route_but_health_and_the_page(store):
    with in_process_client(store=store.root, poll_interval_s=60, api_keys="k1") as client:
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/static/app.js"):
            assert client.get(path).status_code == 200, path
        for path in ("/models", "/v2", "/v2/models/conv", "/metrics", "/openapi.json", "/docs", "/no-such-route"):
            answer = client.get(path)
            error = answer.json()["error"]  # the protocol's shape under /v2, the service's elsewhere
            assert answer.status_code == 401 and (error if path.startswith("/v2") else error["message"]).startswith("a valid API key"), path
            assert answer.headers["www-authenticate"] == "Bearer" and answer.headers["x-request-id"]
        assert client.get("/v2", headers={"authorization": "Bearer k1"}).status_code == 200
        assert client.get("/models", headers={"x-api-key": "k1"}).status_code == 200
    with in_process_client(store=store.root, poll_interval_s=60, api_keys="k1", metrics_public=True) as client:
        assert client.get("/metrics").status_code == 200
