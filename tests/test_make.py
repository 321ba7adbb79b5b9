"""The Makefile a newcomer runs first: `make run` serves the shipped models from a fresh store with no training data,
and `make train` says how to get data when there is none.

Every call passes `-o install` (the venv is this one, never reinstalled by a test) and its own STORE and DATA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from nginxproxy import free_port

from model_store import ModelStore

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = ModelStore(ROOT / "pretrained")


def make(*args: str, timeout: float = 300, **variables: str | os.PathLike) -> subprocess.CompletedProcess:
    settings = [f"{key}={value}" for key, value in {"VENV": sys.prefix, **variables}.items()]
    return subprocess.run(["make", "--no-print-directory", "-o", "install", *args, *settings], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_make_models_seeds_an_empty_store_with_both_shipped_models_and_needs_no_data(tmp_path):
    store = tmp_path / "store"
    result = make("models", STORE=store, DATA=tmp_path / "no-such-data", NATURAL=tmp_path / "no-photos")
    assert result.returncode == 0, result.stdout + result.stderr
    seeded = ModelStore(store)
    assert seeded.models() == ["photo", "upgrader"]
    for name in ("photo", "upgrader"):
        copied = seeded.verify(name, "latest")  # every artifact against its checksum
        assert copied["weights_sha256"] == PRETRAINED.manifest(name, "latest")["weights_sha256"]
    # again: the store has models, nothing is copied a second time
    again = make("models", STORE=store, DATA=tmp_path / "no-such-data")
    assert again.returncode == 0 and "already has models" in again.stdout
    # photo's `clean` version came with it (service/runtime/inputs.py): the latest is the realistic one
    assert [seeded.versions(name) for name in ("photo", "upgrader")] == [[1, 2], [1]]
    assert seeded.aliases("photo") == {"latest": 2, "clean": 1}
    assert seeded.manifest("photo", "clean")["weights_sha256"] == PRETRAINED.manifest("photo", "clean")["weights_sha256"]


def test_make_train_without_data_says_how_to_get_it_and_fails(tmp_path):
    missing = tmp_path / "no-such-data"
    result = make("train", STORE=tmp_path / "store", DATA=missing)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"No training data at {missing}." in result.stdout
    assert "UPGRADER_DATA" in result.stdout and "--download" in result.stdout
    assert ModelStore(tmp_path / "store").models() == ["photo", "upgrader"]  # seeded all the same: `make run` serves them


def test_make_train_trains_only_what_the_store_lacks(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    result = make("train", STORE=tmp_path / "store", DATA=data, QUICK_MODELS="upgrader,photo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing to train" in result.stdout


@pytest.mark.slow
def test_make_run_answers_upscale_from_a_fresh_store_without_data(tmp_path):
    """`make run` itself (with a timeout): seeded, served, and both models answer on a free port."""
    port = free_port()
    log = (tmp_path / "make-run.log").open("w+")
    process = subprocess.Popen(["make", "--no-print-directory", "-o", "install", "run", f"VENV={sys.prefix}", f"STORE={tmp_path / 'store'}",
                                f"DATA={tmp_path / 'no-data'}", f"PORT={port}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "UPGRADER_WORKERS": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, log.seek(0) or log.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "make run was not ready within 240 s"
            time.sleep(0.5)
        png = (ROOT / "examples" / "cat-8x8.png").read_bytes()
        headers = {"Content-Type": "image/png", "Accept": "image/png"}
        small = httpx.post(f"{url}/upscale", content=png, headers=headers, timeout=120)
        assert small.status_code == 200 and small.headers["X-Upgrader-Model"].startswith("upgrader:")
        photo = httpx.post(f"{url}/upscale?model=photo", content=(ROOT / "examples" / "cat-32x32.png").read_bytes(),
                           headers=headers, timeout=120)
        assert photo.status_code == 200 and photo.headers["X-Upgrader-Model"].startswith("photo:")
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """make, the service's supervisor and its workers: the session the test started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(60)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()
