"""trainer/photo.py: tiny x4 runs on a few synthetic photographs that publish, resume exactly, refuse a changed
setup and start from a published subpixel_residual."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model_store import ModelStore
from trainer import photo
from trainer.checkpoint import load_checkpoint
from upgrader.architectures import build_model
from upgrader.degradations import DegradationConfig

TINY = ["--arch-params", '{"width": 8, "depth": 1}', "--crop", "8", "--batch-size", "2", "--warmup", "1",
        "--eval-every", "2", "--log-every", "1", "--amp", "none", "--device", "cpu", "--threads", "1",
        "--checkpoint-minutes", "0"]


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    """sr-natural's layout with 3 + 2 smooth random photographs (one of each held out by trainer.natural's rule)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for subset, ext, count in [("bsd200", "png", 3), ("yang91", "bmp", 2)]:
        (root / subset).mkdir()
        for i in range(count):
            small = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(small).resize((60 + 4 * i, 50), Image.BICUBIC).save(root / subset / f"{i:03d}.{ext}")
    return root


def run(photos_dir, tmp_path, *extra: str) -> int:
    return photo.main(["--natural", str(photos_dir), "--cache-dir", str(tmp_path / "cache"), "--store", str(tmp_path / "store"),
                       "--checkpoint-dir", str(tmp_path / "ckpt"), *TINY, *extra])


def test_a_tiny_run_publishes_a_model_for_whole_photos_with_its_manifest(photos_dir, tmp_path):
    assert run(photos_dir, tmp_path, "--steps", "4") == 0
    model, manifest = ModelStore(tmp_path / "store").load("photo")
    assert manifest["architecture"] == {"name": "photo_residual", "params": {"width": 8, "depth": 1}}
    assert manifest["degradation"] == "bicubic-matlab-x4" and manifest["scale"] == 4
    assert manifest["parameter_count"] == sum(p.numel() for p in model.parameters())
    held_out = manifest["metrics"]["heldout_photos_x4"]
    assert held_out["images"] == 2 and {"model", "bicubic"} <= held_out.keys()
    assert "model" not in manifest["metrics"]  # the service ranks its default by top-level 8x8 metrics only
    assert manifest["dataset"]["val_files"] == ["bsd200/000.png", "yang91/000.bmp"]
    assert manifest["dataset"]["fingerprint"]
    assert manifest["recipe"]["lr_crop"] == 8 and manifest["recipe"]["loss"] == "l1"
    assert set(manifest["files"]) == {"weights.safetensors", "learning_curve.png", "samples.png"}
    assert [h["step"] for h in manifest["history"]] == [0, 2, 4]
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 11, 7)).shape == (1, 3, 44, 28)


def test_an_interrupted_run_resumes_to_the_same_weights(photos_dir, tmp_path, monkeypatch):
    assert run(photos_dir, tmp_path / "whole", "--steps", "6") == 0
    whole, _ = ModelStore(tmp_path / "whole" / "store").load_state_dict("photo")

    real_step, taken = photo.train_one_step, []

    def killed_after_three(*args, **kwargs):
        if len(taken) == 3:
            raise KeyboardInterrupt
        taken.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(photo, "train_one_step", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(photos_dir, tmp_path / "cut", "--steps", "6")
    monkeypatch.setattr(photo, "train_one_step", real_step)
    assert load_checkpoint(tmp_path / "cut" / "ckpt" / "photo").step == 3
    assert run(photos_dir, tmp_path / "cut", "--steps", "6", "--resume") == 0
    resumed, manifest = ModelStore(tmp_path / "cut" / "store").load_state_dict("photo")
    assert manifest["steps"] == 6
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    # published once: a second resume finds nothing to train and nothing new to publish
    assert run(photos_dir, tmp_path / "cut", "--steps", "6", "--resume") == 0
    assert ModelStore(tmp_path / "cut" / "store").versions("photo") == [1]


def test_resume_refuses_a_different_recipe_but_takes_a_new_time_budget(photos_dir, tmp_path):
    assert run(photos_dir, tmp_path, "--steps", "2", "--no-publish") == 0
    assert run(photos_dir, tmp_path, "--steps", "2", "--resume", "--lr", "1e-3") == 1
    assert run(photos_dir, tmp_path, "--steps", "2", "--resume", "--max-minutes", "5") == 0


def test_init_from_a_published_subpixel_residual_drops_its_global_attention(photos_dir, tmp_path):
    torch.manual_seed(1)
    source = build_model("subpixel_residual", width=8, depth=1, global_attention=1)
    init_store = ModelStore(tmp_path / "init")
    init_store.publish("upgrader", source.state_dict(),
                       {"architecture": {"name": "subpixel_residual", "params": {"width": 8, "depth": 1, "global_attention": 1}}})
    assert run(photos_dir, tmp_path, "--steps", "1", "--no-publish", "--init-from", "upgrader", "--init-store", str(init_store.root)) == 0
    state = json.loads((tmp_path / "ckpt" / "photo" / "state.json").read_text())
    recorded = state["run"]["recipe"]["init_from"]
    assert recorded["dropped_modules"] == ["context"] and recorded["version"] == 1
    model = build_model("photo_residual", width=8, depth=1)
    loaded = photo.load_initial_weights(model, "upgrader:1", init_store)
    assert loaded["architecture"]["name"] == "subpixel_residual"
    assert torch.equal(model.head.weight, source.head.weight)
    assert torch.equal(model.body[0].conv1.weight, source.body[0].conv1.weight)
    with pytest.raises(ValueError, match="same width and depth"):
        photo.load_initial_weights(build_model("photo_residual", width=8, depth=2), "upgrader", init_store)


def test_publish_only_snapshots_a_checkpoint_and_leaves_it_alone(photos_dir, tmp_path):
    assert run(photos_dir, tmp_path, "--steps", "2", "--no-publish") == 0
    state = (tmp_path / "ckpt" / "photo" / "state.json").read_text()
    assert run(photos_dir, tmp_path, "--steps", "2", "--publish-only") == 0
    assert run(photos_dir, tmp_path, "--steps", "2", "--publish-only") == 0  # every call publishes a snapshot
    assert ModelStore(tmp_path / "store").versions("photo") == [1, 2]
    assert (tmp_path / "ckpt" / "photo" / "state.json").read_text() == state  # a run training there is undisturbed
    assert ModelStore(tmp_path / "store").manifest("photo", 1)["steps"] == 2


def test_a_stopped_process_does_not_spend_its_training_time(photos_dir, tmp_path, monkeypatch):
    """A step that took far longer than the usual (SIGSTOP, a starved machine) counts as a usual one."""
    real_step, calls = photo.train_one_step, []

    def third_step_stalls(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        if len(calls) == 3:
            real_perf_counter = photo.time.perf_counter
            monkeypatch.setattr(photo.time, "perf_counter", lambda: real_perf_counter() + 3600.0)  # an hour passes
        return loss

    monkeypatch.setattr(photo, "train_one_step", third_step_stalls)
    assert run(photos_dir, tmp_path, "--steps", "5", "--no-publish") == 0
    state = json.loads((tmp_path / "ckpt" / "photo" / "state.json").read_text())
    assert state["step"] == 5 and state["history"][-1]["train_seconds"] < 60


def test_realistic_degradation_trains_on_the_seeded_chain_and_records_it(photos_dir, tmp_path):
    assert run(photos_dir, tmp_path, "--steps", "2", "--degradation", "realistic") == 0
    manifest = ModelStore(tmp_path / "store").manifest("photo", 1)
    assert manifest["degradation"] == "realistic-x4"
    assert manifest["recipe"]["degradation_chain"] == DegradationConfig(scale=4).describe()
    assert json.loads(json.dumps(manifest["recipe"]["degradation_chain"])) == manifest["recipe"]["degradation_chain"]
    # the chain is part of the setup: a bicubic run does not resume it
    assert run(photos_dir, tmp_path, "--steps", "2", "--resume", "--no-publish") == 1
    assert run(photos_dir, tmp_path, "--steps", "2", "--resume", "--no-publish", "--degradation", "realistic") == 0


def test_chain_overrides_reach_the_training_inputs_and_the_manifest(photos_dir, tmp_path, capsys, monkeypatch):
    chain = {"clean_share": 0.0, "jpeg_prob": 1.0, "jpeg_quality": [70, 90], "downsampling": [["area", 1.0]]}
    expected = DegradationConfig(scale=4, clean_share=0.0, jpeg_prob=1.0, jpeg_quality=(70, 90), downsampling=(("area", 1.0),))
    real_degrade, used = photo.degrade_batch, []

    def recording_degrade(hr, config, seed):
        used.append(config)
        return real_degrade(hr, config, seed)

    monkeypatch.setattr(photo, "degrade_batch", recording_degrade)
    assert run(photos_dir, tmp_path, "--steps", "2", "--degradation", "realistic", "--chain", json.dumps(chain)) == 0
    assert used == [expected, expected]  # every step's inputs came through the overridden chain
    recorded = ModelStore(tmp_path / "store").manifest("photo", 1)["recipe"]["degradation_chain"]
    assert recorded == expected.describe()
    args = photo.parse_args(["--natural", str(photos_dir), "--degradation", "realistic", "--chain", json.dumps(chain)])
    assert photo.degradation_chain(args).jpeg_quality == (70, 90)
    # a changed chain is a different recipe: the run does not resume under it
    assert run(photos_dir, tmp_path, "--steps", "2", "--resume", "--no-publish", "--degradation", "realistic") == 1
    for bad, says in ((["--chain", '{"jpeg_quality": [70, 90]}'], "--chain needs --degradation realistic"),
                      (["--degradation", "realistic", "--chain", '{"jpeg_qualty": 1}'], "jpeg_qualty")):
        with pytest.raises(SystemExit):
            photo.parse_args(["--natural", str(photos_dir), *bad])
        assert says in capsys.readouterr().err
