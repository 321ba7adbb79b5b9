"""The model store: versions, aliases, atomic publishing, concurrency and corruption."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from model_store import IntegrityError, ModelNotFound, ModelStore, VersionNotFound
from model_store.__main__ import main as store_cli
from upgrader.architectures import build_model, parameter_count


def manifest_for(arch: str) -> dict:
    model = build_model(arch)
    return {
        "architecture": {"name": arch, "params": {}},
        "parameter_count": parameter_count(model),
        "input_shape": [3, 8, 8],
        "output_shape": [3, 32, 32],
        "metrics": {"model": {"mse": 0.01, "psnr": 20.0, "ssim": 0.5}, "bicubic": {"mse": 0.0096, "psnr": 20.9, "ssim": 0.55}},
    }


def publish_fresh(store: ModelStore, arch: str = "conv", seed: int = 0, files: dict | None = None) -> tuple[int, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(arch).eval()
    return store.publish(arch, model.state_dict(), manifest_for(arch), files=files), model


def test_publish_load_roundtrip_reproduces_outputs(store):
    version, model = publish_fresh(store, "conv", files={"loss_curve.png": b"\x89PNG fake"})
    assert version == 1
    loaded, manifest = store.load("conv", version)
    x = torch.rand(5, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert manifest["name"] == "conv" and manifest["version"] == 1
    assert set(manifest["files"]) == {"weights.safetensors", "loss_curve.png"}
    vdir = store.root / "conv" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["loss_curve.png", "manifest.json", "weights.safetensors"]
    assert store.verify("conv", 1)["weights_sha256"] == manifest["weights_sha256"]


def test_versions_monotonic_latest_and_aliases(store):
    for seed in range(3):
        publish_fresh(store, "fc", seed=seed)
    publish_fresh(store, "conv")
    assert store.models() == ["conv", "fc"]
    assert store.versions("fc") == [1, 2, 3]
    assert store.resolve("fc", "latest") == 3
    assert store.set_alias("fc", "stable", 2) == 2
    assert store.resolve("fc", "stable") == 2
    assert store.resolve("fc", "2") == 2
    assert store.aliases("fc") == {"latest": 3, "stable": 2}
    publish_fresh(store, "fc", seed=9)
    assert store.aliases("fc") == {"latest": 4, "stable": 2}  # latest moves, stable stays
    with pytest.raises(VersionNotFound, match="no version 7"):
        store.set_alias("fc", "stable", 7)
    with pytest.raises(ValueError, match="reserved"):
        store.set_alias("fc", "latest", 1)
    with pytest.raises(VersionNotFound, match="no alias 'canary'"):
        store.resolve("fc", "canary")
    with pytest.raises(ModelNotFound, match="'nope'"):
        store.resolve("nope")


def test_leftover_temp_dirs_are_invisible(store):
    publish_fresh(store, "conv")
    half = store.root / "conv" / ".publish-crashed"
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"partial")
    assert store.versions("conv") == [1]
    assert store.resolve("conv") == 1
    assert publish_fresh(store, "conv", seed=1)[0] == 2
    assert store.versions("conv") == [1, 2]


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_damaged_weights_raise_naming_the_file(store, damage):
    version, _ = publish_fresh(store, "conv")
    weights = store.root / "conv" / str(version) / "weights.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "tamper":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        weights.unlink()
    with pytest.raises(IntegrityError, match=str(weights)):
        store.load("conv", version)
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        store.verify("conv", version)


def test_weights_that_do_not_fit_the_architecture_are_refused(store):
    version, _ = publish_fresh(store, "conv")
    manifest_path = store.root / "conv" / str(version) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["architecture"]["name"] = "fc"  # checksum still matches: the architecture check must catch it
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="does not fit architecture 'fc'"):
        store.load("conv", version)


def test_tampered_picture_fails_verification(store):
    version, _ = publish_fresh(store, "conv", files={"samples.png": b"picture"})
    (store.root / "conv" / str(version) / "samples.png").write_bytes(b"other picture")
    with pytest.raises(IntegrityError, match="samples.png"):
        store.verify("conv", version)


def _publish_many(root: str, count: int, seed: int, out) -> None:
    store = ModelStore(root)
    out.put([publish_fresh(store, "conv", seed=seed * 100 + i)[0] for i in range(count)])


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    root = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(root, 5, seed, out)) for seed in range(4)]
    for p in procs:
        p.start()
    got = sorted(v for _ in procs for v in out.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == list(range(1, 21))
    store = ModelStore(root)
    assert store.versions("conv") == got
    for v in got:
        store.verify("conv", v)


PUBLISH_FOREVER = """
import sys, torch
from model_store import ModelStore
from upgrader.architectures import build_model
store = ModelStore(sys.argv[1])
model = build_model("resnet18")  # 56 MB of weights: a kill lands mid-write often
print("ready", flush=True)
while True:
    store.publish("resnet18", model.state_dict(), {"architecture": {"name": "resnet18", "params": {}}})
"""


def test_killed_publisher_never_leaves_a_visible_half_version(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", PUBLISH_FOREVER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not ModelStore(root).versions("resnet18") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ModelStore(root)
    versions = store.versions("resnet18")
    assert versions == list(range(1, len(versions) + 1)) and versions
    for v in versions:
        store.verify("resnet18", v)
    store.load("resnet18")  # latest is complete and loadable


def test_cli_ls_lists_models_versions_aliases_metrics(store, capsys):
    publish_fresh(store, "conv")
    publish_fresh(store, "conv", seed=1)
    store.set_alias("conv", "stable", 1)
    assert store_cli(["--store", str(store.root), "ls"]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "stable" in out and "latest" in out and "117,655" in out and "20.9000" in out
    assert store_cli(["--store", str(store.root), "verify", "conv", "stable"]) == 0
    assert store_cli(["--store", str(store.root), "verify", "ghost"]) == 1
    assert "'ghost' not found" in capsys.readouterr().out


def test_cli_ls_shows_the_natural_validation_when_a_version_has_it(store, capsys):
    from test_service_support import publish

    publish(store, "sr", "subpixel_residual", psnr=22.5, natural_psnr=30.125)
    publish(store, "conv", "conv", psnr=20.0)
    assert store_cli(["--store", str(store.root), "ls"]) == 0
    out = capsys.readouterr().out
    assert "natural PSNR" in out and "30.1250 (28.5000)" in out and "22.5000" in out
