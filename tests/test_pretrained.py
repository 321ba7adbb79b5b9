"""The model that ships with the repository (`pretrained/`, a model store): intact, as good as its manifest says,
and what a fresh store serves by default once `make models` has copied it in."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import PROJECT_ROOT
from test_service_support import LiveServer, publish

from model_store import ModelStore
from trainer.data import load_image_data
from trainer.natural import load_natural_data
from trainer.train import evaluate

PRETRAINED = ModelStore(PROJECT_ROOT / "pretrained")
SHIPPED = "upgrader"  # the first of the Makefile's PRETRAINED_MODELS


def test_every_shipped_version_verifies_and_loads():
    assert PRETRAINED.models(), f"no model in {PRETRAINED.url}"
    for name in PRETRAINED.models():
        for version in PRETRAINED.versions(name):
            manifest = PRETRAINED.verify(name, version)  # every artifact against its sha256
            model, _ = PRETRAINED.load(name, version)  # and the weights fit the architecture
            assert sum(p.numel() for p in model.parameters()) == manifest["parameter_count"]


def test_the_shipped_model_scores_what_its_manifest_says_on_both_validation_sets(data_dir, tmp_path):
    """Its published metrics are reproducible: the whole CIFAR-10 test split and every natural validation tile, as served
    (8-bit in, 8-bit out), through the trainer's own evaluation. A mismatch means the weights or the evaluation changed."""
    model, manifest = PRETRAINED.load(SHIPPED)
    metrics = manifest["metrics"]
    sets = {"cifar": load_image_data(data_dir, cache_dir=tmp_path, limit_train=64, progress=False).val,  # the whole test split
            "natural": load_natural_data(data_dir.parent / "sr-natural", cache_dir=tmp_path, progress=False).val}
    published = {"cifar": metrics, "natural": metrics["natural"]}
    torch.manual_seed(0)
    with torch.inference_mode():
        for split, images in sets.items():
            measured = evaluate(model, images, torch.device("cpu"), loss_name="l1", baseline=True)
            assert measured["images"] == published[split]["images"], split
            for who in ("model", "bicubic"):
                assert measured[who]["psnr"] == pytest.approx(published[split][who]["psnr"], abs=2e-3), (split, who)
            assert measured["model"]["psnr"] > measured["bicubic"]["psnr"] + 1.0, split  # it is worth shipping


def test_a_store_seeded_with_the_shipped_model_serves_it_by_default(tmp_path):
    """`make models` copies it into an empty store, and `make train` adds the quick profile's models beside it: the
    service picks it, the model that gains most over bicubic, when a request names none."""
    store = ModelStore(tmp_path / "store")
    publish(store, "conv", "conv", psnr=20.0)  # a quick-profile model, below bicubic
    copied, _ = store.copy_from(PRETRAINED, SHIPPED)
    with LiveServer(store=store.root, poll_interval_s=60) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        listing = client.get("/models").json()
        assert listing["default_model"] == SHIPPED
        shipped = next(m for m in listing["models"] if m["name"] == SHIPPED)
        assert shipped["serving_version"] == copied
