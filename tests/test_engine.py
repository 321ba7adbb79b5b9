"""trainer/engine.py: the pieces both recipes share, on their own: the resume check names what changed, the training
clock does not count a stall, and the publish path writes a version and marks its checkpoint."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from model_store import ModelStore
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.engine import (STALL_FACTOR, TrainingClock, base_manifest, check_resumable, load_published, logfmt,
                            publish_version, setup_changes)
from upgrader.architectures import build_model


def test_logfmt_writes_one_line_of_key_value_pairs():
    assert logfmt({"step": 3, "loss": 0.0123456789, "lr": None}) == "step=3 loss=0.0123457 lr=None"
    assert logfmt({"psnr": 30.0}, prefix="bicubic_") == "bicubic_psnr=30"


def test_the_resume_check_names_each_changed_entry_and_lets_the_budget_change():
    saved = {"architecture": {"name": "conv"}, "degradation": "bicubic-matlab-x4", "recipe": {"lr": 0.001, "epochs": 5}}
    assert setup_changes(saved, {**saved, "recipe": {"lr": 0.001, "epochs": 9}}, {"epochs"}) == []
    changed = {**saved, "degradation": "realistic-x4", "recipe": {"lr": 0.01, "epochs": 5}}
    assert setup_changes(saved, changed, {"epochs"}) == ["degradation: 'bicubic-matlab-x4' -> 'realistic-x4'", "lr: 0.001 -> 0.01"]
    with pytest.raises(ValueError, match=r"cannot resume from ckpt: the run there used a different setup \(degradation: "):
        check_resumable(saved, changed, {"epochs"}, "ckpt")


def test_the_clock_counts_a_stalled_step_as_a_usual_one(monkeypatch):
    clock, now = TrainingClock(spent_s=100.0), [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    for step, seconds in enumerate([1.0, 1.0, 1.0, STALL_FACTOR * 10, 1.0], start=1):
        clock.start()
        now[0] += seconds
        clock.stop(step)
    assert clock.spent_s == pytest.approx(105.0)


def test_publish_version_writes_the_weights_and_marks_the_checkpoint(tmp_path):
    model = build_model("photo_residual", width=8, depth=1)
    args = argparse.Namespace(store=tmp_path / "store", lr=1e-3)
    run = {"architecture": {"name": "photo_residual", "params": {"width": 8, "depth": 1}}, "recipe": {"lr": 1e-3}}
    manifest = base_manifest(run, model, args, torch.device("cpu"), history=[], metrics={"x": 1.0}, evaluation="test",
                             wall_time_s=2.0)
    assert manifest["args"] == {"store": str(tmp_path / "store"), "lr": 1e-3}  # paths as text: JSON-ready
    json.dumps(manifest)
    save_checkpoint(tmp_path / "ckpt", Checkpoint(epoch=1, step=1, history=[], run=run, model=model.state_dict(),
                                                  optimizer=torch.optim.Adam(model.parameters()).state_dict(), ema=None))
    version = publish_version(str(tmp_path / "store"), "photo", model, manifest, {"notes.txt": b"hi"}, tmp_path / "ckpt")
    assert version == 1 and load_checkpoint(tmp_path / "ckpt").published_version == 1
    name, state_dict, published = load_published("--init-from", "photo:1", ModelStore(tmp_path / "store"))
    assert name == "photo" and published["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="--init-from photo:7"):
        load_published("--init-from", "photo:7", ModelStore(tmp_path / "store"))
