"""The model store: versions, aliases, atomic publishing, concurrency, corruption and gc.

Most tests run twice, on a local directory and on a real S3 server (SeaweedFS): the store's
contract does not depend on where the bytes live.
"""

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


def test_publish_load_roundtrip_reproduces_outputs(any_store):
    store = any_store
    version, model = publish_fresh(store, "conv", files={"loss_curve.png": b"\x89PNG fake"})
    assert version == 1
    loaded, manifest = store.load("conv", version)
    x = torch.rand(5, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert manifest["name"] == "conv" and manifest["version"] == 1
    assert set(manifest["files"]) == {"weights.safetensors", "loss_curve.png"}
    keys = sorted(obj.key for obj in store.storage.list("conv/1/"))
    assert keys == ["conv/1/.claim", "conv/1/loss_curve.png", "conv/1/manifest.json", "conv/1/weights.safetensors"]
    assert store.verify("conv", 1)["weights_sha256"] == manifest["weights_sha256"]
    assert store.read_file("conv", 1, "loss_curve.png") == b"\x89PNG fake"


def test_versions_monotonic_latest_and_aliases(any_store):
    store = any_store
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
    # Versions are ASCII digits or alias names: "²".isdigit() and "١".isdigit() are True in Python.
    for odd in ("²", "\u0661", "01", "-1", "1.0"):
        with pytest.raises(VersionNotFound):
            store.resolve("fc", odd)


def test_uncommitted_versions_are_invisible_and_gc_removes_them(any_store):
    store = any_store
    publish_fresh(store, "conv")
    # What a publisher killed mid-upload leaves: a claim and some artifacts, no manifest.
    store.storage.create("conv/2/.claim", b"{}")
    store.storage.put("conv/2/weights.safetensors", b"partial")
    assert store.versions("conv") == [1] and store.resolve("conv") == 1
    assert publish_fresh(store, "conv", seed=1)[0] == 3  # the claimed number is never reused while claimed
    assert store.versions("conv") == [1, 3]
    assert store.gc(grace_s=3600) == []  # young: a publisher may still be uploading
    assert sorted(store.gc(grace_s=0, dry_run=True)) == ["conv/2/.claim", "conv/2/weights.safetensors"]
    assert sorted(store.gc(grace_s=0)) == ["conv/2/.claim", "conv/2/weights.safetensors"]
    assert [o.key for o in store.storage.list("conv/2/")] == []
    assert store.versions("conv") == [1, 3]
    for v in (1, 3):
        store.verify("conv", v)  # committed versions are never touched


def test_gc_removes_stale_local_temp_files_and_old_publish_dirs(store):
    publish_fresh(store, "conv")
    legacy = store.root / "conv" / ".publish-crashed"  # left by the rename-based publisher of earlier releases
    legacy.mkdir()
    (legacy / "weights.safetensors").write_bytes(b"partial")
    (store.root / "conv" / ".aliases.json.tmp-1a2b3c4d").write_bytes(b"{")
    assert store.versions("conv") == [1]
    assert sorted(store.gc(grace_s=0)) == ["conv/.aliases.json.tmp-1a2b3c4d", "conv/.publish-crashed/weights.safetensors"]
    assert not legacy.exists()
    store.verify("conv", 1)


def test_published_files_follow_the_umask(store):
    old = os.umask(0o022)
    try:
        publish_fresh(store, "conv")
    finally:
        os.umask(old)
    vdir = store.root / "conv" / "1"
    assert vdir.stat().st_mode & 0o777 == 0o755  # a service running as another user can read it
    assert (vdir / "weights.safetensors").stat().st_mode & 0o777 == 0o644


def test_concurrent_alias_updates_never_lose_one(any_store):
    from concurrent.futures import ThreadPoolExecutor

    store = any_store
    for seed in range(3):
        publish_fresh(store, "conv", seed=seed)
    names = [f"a{i}" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda alias: store.set_alias("conv", alias, 1 + names.index(alias) % 3), names))
    assert results == [1 + i % 3 for i in range(12)]
    assert store.aliases("conv") == {"latest": 3, **{alias: 1 + i % 3 for i, alias in enumerate(names)}}


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_damaged_weights_raise_naming_the_file(any_store, damage):
    store = any_store
    version, _ = publish_fresh(store, "conv")
    key = f"conv/{version}/weights.safetensors"
    data = store.storage.get(key)
    if damage == "truncate":
        store.storage.put(key, data[: len(data) // 2])
    elif damage == "tamper":
        store.storage.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    else:
        store.storage.delete(key)
    with pytest.raises(IntegrityError, match=key):
        store.load("conv", version)
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        store.verify("conv", version)


def test_weights_that_do_not_fit_the_architecture_are_refused(any_store):
    store = any_store
    version, _ = publish_fresh(store, "conv")
    key = f"conv/{version}/manifest.json"
    manifest = json.loads(store.storage.get(key))
    manifest["architecture"]["name"] = "fc"  # checksum still matches: the architecture check must catch it
    store.storage.put(key, json.dumps(manifest).encode())
    with pytest.raises(IntegrityError, match="does not fit architecture 'fc'"):
        store.load("conv", version)


def test_tampered_picture_fails_verification(any_store):
    store = any_store
    version, _ = publish_fresh(store, "conv", files={"samples.png": b"picture"})
    store.storage.put(f"conv/{version}/samples.png", b"other picture")
    with pytest.raises(IntegrityError, match="samples.png"):
        store.verify("conv", version)


def test_s3_cache_serves_verified_copies_and_replaces_bad_ones(s3_store, tmp_path):
    version, model = publish_fresh(s3_store, "conv", files={"samples.png": b"picture"})
    reader = ModelStore(s3_store.url, cache_dir=tmp_path / "cache")
    reader.verify("conv", version)
    cached = tmp_path / "cache" / "conv" / str(version)
    assert sorted(p.name for p in cached.iterdir()) == ["manifest.json", "samples.png", "weights.safetensors"]
    # A damaged cached copy is detected (sha256 on every load) and downloaded again.
    (cached / "weights.safetensors").write_bytes(b"rotten")
    loaded, _ = reader.load("conv", version)
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert (cached / "weights.safetensors").read_bytes() == s3_store.storage.get(f"conv/{version}/weights.safetensors")
    # A version damaged in the store itself is refused, even with a good cached copy of other files.
    s3_store.storage.put(f"conv/{version}/samples.png", b"tampered")
    (cached / "samples.png").unlink()
    with pytest.raises(IntegrityError, match="samples.png"):
        reader.verify("conv", version)


def test_unreachable_s3_store_raises_store_unavailable(monkeypatch):
    from model_store import StoreUnavailable
    from s3server import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = ModelStore("s3://nowhere/models")
    with pytest.raises(StoreUnavailable, match="s3://nowhere/models"):
        store.models()


def _publish_many(root: str, count: int, seed: int, out) -> None:
    store = ModelStore(root)
    out.put([publish_fresh(store, "conv", seed=seed * 100 + i)[0] for i in range(count)])


def test_concurrent_publishers_get_distinct_versions(any_store):
    root = any_store.url
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(root, 5, seed, out)) for seed in range(4)]
    for p in procs:
        p.start()
    got = sorted(v for _ in procs for v in out.get(timeout=180))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == list(range(1, 21))
    assert any_store.versions("conv") == got
    for v in got:
        any_store.verify("conv", v)


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


def test_killed_publisher_never_leaves_a_visible_half_version(any_store):
    root = any_store.url
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
    leftovers = store.gc(grace_s=0)  # the killed one's claim (and what it uploaded), nothing committed
    assert all(key.startswith(f"resnet18/{versions[-1] + 1}/") for key in leftovers)
    assert store.versions("resnet18") == versions
    assert publish_fresh(store, "resnet18")[0] == versions[-1] + 1


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


def test_cli_init_and_gc_on_s3(s3_env, capsys):
    import secrets

    url = f"s3://cli-{secrets.token_hex(4)}/p"  # a new bucket: init creates it
    assert store_cli(["--store", url, "init"]) == 0
    assert store_cli(["--store", url, "init"]) == 0  # idempotent
    store = ModelStore(url)
    publish_fresh(store, "conv")
    store.storage.create("conv/2/.claim", b"{}")
    assert store_cli(["--store", url, "gc", "--grace-s", "0"]) == 0
    assert "removed conv/2/.claim" in capsys.readouterr().out
    assert store_cli(["--store", url, "ls"]) == 0
    assert url in capsys.readouterr().out


def test_cli_ls_shows_the_natural_validation_when_a_version_has_it(store, capsys):
    from test_service_support import publish

    publish(store, "sr", "subpixel_residual", psnr=22.5, natural_psnr=30.125)
    publish(store, "conv", "conv", psnr=20.0)
    assert store_cli(["--store", str(store.root), "ls"]) == 0
    out = capsys.readouterr().out
    assert "natural PSNR" in out and "30.1250 (28.5000)" in out and "22.5000" in out


def test_copy_promotes_a_version_between_stores_byte_for_byte(store, s3_store):
    """A directory's version copied to S3: a new version there, the same weights, pictures and metadata, and its origin."""
    publish_fresh(store, "conv", seed=0)
    version, model = publish_fresh(store, "conv", seed=1, files={"samples.png": b"\x89PNG samples"})
    publish_fresh(s3_store, "conv", seed=2)  # the destination already has a conv:1, so the copy becomes conv:2
    source = store.manifest("conv", version)

    copied, written = s3_store.copy_from(store, "conv", version)

    assert (copied, written) == (2, True)
    manifest = s3_store.verify("conv", copied)
    assert manifest["weights_sha256"] == source["weights_sha256"] and manifest["files"] == source["files"]
    assert manifest["metrics"] == source["metrics"] and manifest["architecture"] == source["architecture"]
    assert manifest["copied_from"] == {"store": store.url, "name": "conv", "version": version,
                                       "created_at": source["created_at"], "weights_sha256": source["weights_sha256"]}
    assert s3_store.read_file("conv", copied, "samples.png") == b"\x89PNG samples"
    loaded, _ = s3_store.load("conv", copied)
    x = torch.rand(4, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    # Idempotent: the same version again (a deployment seeding at every start) finds its copy and writes nothing.
    before = sorted(obj.key for obj in s3_store.storage.list(""))
    assert s3_store.copy_from(store, "conv", version) == (2, False)
    assert sorted(obj.key for obj in s3_store.storage.list("")) == before
    assert s3_store.copy_from(store, "conv", 1) == (3, True)  # another version is another copy


@pytest.mark.parametrize("damage", ["weights", "picture", "architecture"])
def test_copy_refuses_a_damaged_source_and_writes_nothing(tmp_path, damage):
    source, destination = ModelStore(tmp_path / "src"), ModelStore(tmp_path / "dst")
    version, _ = publish_fresh(source, "conv", files={"samples.png": b"picture"})
    if damage == "weights":
        key = f"conv/{version}/weights.safetensors"
        data = source.storage.get(key)
        source.storage.put(key, data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "picture":
        key = f"conv/{version}/samples.png"
        source.storage.put(key, b"other picture")
    else:
        key = f"conv/{version}/manifest.json"
        manifest = json.loads(source.storage.get(key))
        manifest["architecture"]["name"] = "fc"
        source.storage.put(key, json.dumps(manifest).encode())
        key = f"conv/{version}/weights.safetensors does not fit architecture 'fc'"
    with pytest.raises(IntegrityError, match=key):
        destination.copy_from(source, "conv", version)
    assert destination.models() == [] and not any(destination.storage.list(""))


def test_cli_copy_with_alias_and_a_new_name(tmp_path, capsys):
    source, destination = ModelStore(tmp_path / "src"), ModelStore(tmp_path / "dst")
    publish_fresh(source, "conv", seed=0)
    publish_fresh(source, "conv", seed=1)
    args = ["--store", str(destination.root), "copy", "--from", str(source.root)]
    assert store_cli([*args, "conv:1", "--as", "upgrader", "--alias", "stable"]) == 0
    assert f"copied {source.url} conv:1 -> {destination.url} upgrader:1" in capsys.readouterr().out
    assert destination.aliases("upgrader") == {"latest": 1, "stable": 1}
    assert destination.manifest("upgrader", "stable")["weights_sha256"] == source.manifest("conv", 1)["weights_sha256"]
    assert store_cli([*args, "conv"]) == 0  # no version: the source's latest
    assert destination.manifest("conv", 1)["copied_from"]["version"] == 2
    assert store_cli([*args, "conv:1", "--as", "upgrader"]) == 0
    assert "already holds" in capsys.readouterr().out and destination.versions("upgrader") == [1]
    assert store_cli([*args, "conv:7"]) == 1
    out = capsys.readouterr().out
    assert f"copy {source.url} conv:7 -> {destination.url} conv" in out and "has no version 7" in out


def test_cli_copy_of_a_model_carries_the_versions_its_aliases_name(tmp_path, capsys):
    """A bare name copies the aliased versions first, with their aliases, then the latest (so it stays the latest)."""
    source, destination = ModelStore(tmp_path / "src"), ModelStore(tmp_path / "dst")
    for seed in range(3):
        publish_fresh(source, "conv", seed=seed)
    source.set_alias("conv", "clean", 2)
    source.set_alias("conv", "stable", 3)
    assert store_cli(["--store", str(destination.root), "copy", "--from", str(source.root), "conv"]) == 0
    assert destination.versions("conv") == [1, 2]
    assert destination.aliases("conv") == {"latest": 2, "clean": 1, "stable": 2}
    assert destination.manifest("conv", "clean")["weights_sha256"] == source.manifest("conv", 2)["weights_sha256"]
    assert destination.manifest("conv", 2)["weights_sha256"] == source.manifest("conv", 3)["weights_sha256"]
    assert store_cli(["--store", str(destination.root), "copy", "--from", str(source.root), "conv"]) == 0  # again: nothing new
    assert destination.versions("conv") == [1, 2] and "nothing copied" in capsys.readouterr().out


def test_cli_init_seeds_a_store_once_and_refuses_an_empty_seed(tmp_path, capsys):
    seed, store = ModelStore(tmp_path / "seed"), ModelStore(tmp_path / "store")
    publish_fresh(seed, "conv", seed=0)
    publish_fresh(seed, "conv", seed=1)
    publish_fresh(seed, "fc")
    for _ in range(2):  # every start of a deployment runs it: the second copies nothing
        assert store_cli(["--store", str(store.root), "init", "--seed", str(seed.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("copied ") for line in lines) == 2 and sum("already holds" in line for line in lines) == 2
    assert store.versions("conv") == [1] and store.versions("fc") == [1]
    assert store.manifest("conv", 1)["weights_sha256"] == seed.manifest("conv", 2)["weights_sha256"]  # the latest
    assert store_cli(["--store", str(store.root), "init", "--seed", str(tmp_path / "absent")]) == 1
    assert "holds no model" in capsys.readouterr().out
