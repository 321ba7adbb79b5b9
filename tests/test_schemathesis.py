"""Schemathesis (property-based, from the OpenAPI document) against a real uvicorn serving a real store.

Every check is on (`--checks all`): no 5xx, every status, content type, header and body as documented,
bodies the schema calls valid accepted and bodies it calls invalid refused. The run is bounded
(`--max-examples`, `--max-time`) so it takes about a minute on 2 shared cores.

One thing a JSON schema cannot say is whether bytes decode to an 8x8 image (or references align
with images): for POST /upscale, a schema-valid body whose bytes are not such an image is refused
with the documented 400/413/415/422, and the config below lets `positive_data_acceptance` take those
answers for that operation only. Everything structural (at least one image, counts, sizes, base64,
unknown fields) is in the schema and checked both ways.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_api import LOSS_CURVE
from test_service_support import LiveServer, publish

from model_store import ModelStore

CONFIG = """
[checks.negative_data_rejection]
# 413 is how the service refuses too many or too large images: a rejection like 400/422.
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422"]

[[operations]]
include-path = "/upscale"
include-method = "POST"
# Valid structure, bytes that are not an 8x8 image (see the module docstring).
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "406", "413", "415", "422"]
"""


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", "conv", seed=1, psnr=23.0, files={"loss_curve.png": LOSS_CURVE})
    publish(store, "fc", "fc", seed=2, psnr=21.0)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    with LiveServer(store=store.root, poll_interval_s=60, admin_token="schemathesis-admin", max_images_per_request=8,
                    max_queue_images=64) as live:
        result = subprocess.run(
            [cli, "--config-file", str(config), "run", f"{live.url}/openapi.json", "--checks", "all", "--max-examples", "30",
             "--max-time", "60", "--workers", "1", "--seed", "10", "--request-timeout", "30", "--no-color",
             "--generation-database", "none", "-H", "Authorization: Bearer schemathesis-admin", "--report-dir", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout or " passed" in result.stdout, result.stdout[-3000:]
