"""What can only be checked on a CUDA GPU (pytest -m cuda; skipped without one, with the reason).

bench/gpu_check.sh runs these first on a GPU machine. Each compares the CUDA path with the CPU path
that the rest of the suite checks: same weights, same real images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_service_support import BUSY_SUBPIXEL_PARAMS, busy_subpixel_model

from model_store import ModelStore
from service.runtime.upscaler import Upscaler
from trainer.train import main as train_main
from upgrader.architectures import ARCHITECTURES, build_model
from upgrader.imaging import downsample, to_float

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"),
]

# TF32 (which the trainer turns on for CUDA) keeps 10 mantissa bits: outputs in [0, 1] move by ~1e-3 at most.
ATOL = 3e-3
ARCH_PARAMS = {"subpixel_residual": [{}, {"width": 64, "depth": 8, "attention": 16}, {"rep": True},
                                      {"width": 64, "depth": 8, "global_attention": 1}]}


def _variants():
    for name in sorted(ARCHITECTURES):
        for params in ARCH_PARAMS.get(name, [{}]):
            yield pytest.param(name, params, id=f"{name}{params or ''}")


@pytest.mark.parametrize("name,params", list(_variants()))
def test_cuda_outputs_match_cpu(name, params, real_images):
    torch.manual_seed(0)
    model = build_model(name, **params).eval()
    inputs = downsample(to_float(real_images))
    with torch.inference_mode():
        on_cpu = model(inputs)
        on_cuda = model.to("cuda")(inputs.to("cuda")).cpu()
    assert on_cuda.shape == on_cpu.shape
    assert torch.allclose(on_cuda, on_cpu, atol=ATOL), (on_cuda - on_cpu).abs().max().item()


def test_bf16_amp_training_reduces_the_loss(data_dir, tmp_path):
    store = tmp_path / "store"
    argv = ["--data", str(data_dir), "--store", str(store), "--cache-dir", str(tmp_path / "cache"), "--limit-train", "2048",
            "--limit-val", "256", "--no-progress", "--device", "cuda", "--amp", "bf16", "--models", "subpixel_residual",
            "--epochs", "4", "--loss", "l1", "--lr", "2e-3", "--batch-size", "64"]
    assert train_main(argv) == 0
    manifest = ModelStore(store).manifest("subpixel_residual")
    assert manifest["recipe"]["amp"] == "bf16" and manifest["device"] == "cuda"
    losses = [h["train_loss"] for h in manifest["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # evaluated in float32 after bf16 training: the published model beats its untrained (bicubic) start
    assert manifest["metrics"]["model"]["psnr"] > manifest["metrics"]["bicubic"]["psnr"]


def test_service_pinned_buffers_are_allocated_once_and_reused(store, real_images):
    torch.manual_seed(0)
    model = build_model("subpixel_residual", width=16, depth=2)
    for parameter in model.parameters():  # a model that does something besides bicubic
        torch.nn.init.normal_(parameter, std=0.02)
    manifest = {"architecture": {"name": "subpixel_residual", "params": {"width": 16, "depth": 2}},
                "metrics": {"model": {"psnr": 20.0}, "bicubic": {"psnr": 19.0}}}
    version = store.publish("sr", model.state_dict(), manifest)
    on_cuda = Upscaler(store, "sr", version, torch.device("cuda"), max_batch_images=64)
    on_cpu = Upscaler(store, "sr", version, torch.device("cpu"), max_batch_images=64)
    on_cuda.setup()
    on_cpu.setup()
    assert on_cuda._pinned_in.is_pinned() and on_cuda._pinned_out.is_pinned()
    pointers = (on_cuda._pinned_in.data_ptr(), on_cuda._pinned_out.data_ptr())
    inputs = (downsample(to_float(real_images)) * 255).round().to(torch.uint8).numpy()
    half = len(inputs) // 2  # two different batches (the data may be a small synthetic set on a GPU machine)
    first = on_cuda.run_batch(inputs[:half])
    second = on_cuda.run_batch(inputs[half:])
    assert (on_cuda._pinned_in.data_ptr(), on_cuda._pinned_out.data_ptr()) == pointers  # the same buffers, reused
    # the first batch's result is a copy: the second batch, written through the same buffer, left it alone
    for result, expected in [(first, on_cpu.run_batch(inputs[:half])), (second, on_cpu.run_batch(inputs[half:]))]:
        difference = np.abs(result.images.astype(int) - expected.images.astype(int))
        assert difference.max() <= 1  # uint8 rounding of float outputs that differ by TF32 noise


def test_service_without_batching_sets_up_on_cuda(store, real_images):
    """UPGRADER_MAX_BATCH_IMAGES=1 on CUDA: pinned buffers of one image. Its setup once ran two images through them
    (the fixed-cost probe), so the service never became ready (found by the first bench/gpu_check.sh run)."""
    torch.manual_seed(0)
    model = build_model("conv")
    manifest = {"architecture": {"name": "conv", "params": {}}, "metrics": {"model": {"psnr": 20.0}, "bicubic": {"psnr": 19.0}}}
    version = store.publish("one", model.state_dict(), manifest)
    on_cuda = Upscaler(store, "one", version, torch.device("cuda"), max_batch_images=1)
    on_cuda.setup()
    inputs = (downsample(to_float(real_images[:1])) * 255).round().to(torch.uint8).numpy()
    with torch.inference_mode():
        expected = model(to_float(torch.from_numpy(inputs)))
    difference = np.abs(on_cuda.run_batch(inputs).images.astype(float) - (expected.clamp(0, 1) * 255).numpy())
    assert difference.max() <= 1.01


def test_service_bf16_on_cuda_runs_in_bf16_within_a_few_levels_of_float32(store, real_images):
    """UPGRADER_PRECISION=bfloat16 on CUDA: the forward pass under autocast (auto keeps float32 there, unmeasured)."""
    params = BUSY_SUBPIXEL_PARAMS
    model = busy_subpixel_model()
    manifest = {"architecture": {"name": "subpixel_residual", "params": params},
                "metrics": {"model": {"psnr": 20.0}, "bicubic": {"psnr": 19.0}}}
    version = store.publish("sr", model.state_dict(), manifest)
    inputs = (downsample(to_float(real_images)) * 255).round().to(torch.uint8).numpy()
    outputs = {}
    for precision in ("float32", "bfloat16"):
        upscaler = Upscaler(store, "sr", version, torch.device("cuda"), max_batch_images=64, precision=precision)
        upscaler.setup()
        outputs[precision] = upscaler.run_batch(inputs).images.astype(int)
    difference = np.abs(outputs["bfloat16"] - outputs["float32"])
    assert (difference > 0).mean() > 0.01  # bf16 did run: its roundings move many pixels by a level
    assert difference.max() <= 4, difference.max()
