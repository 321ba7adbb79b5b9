"""The model that beats bicubic: its architecture and its test-time self-ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from model_store import ModelStore
from trainer.data import load_image_data
from trainer.train import evaluate
from trainer.train import main as train_main
from upgrader.architectures import OUTPUT_SHAPE, build_model, parameter_count
from upgrader.ensemble import DIHEDRAL, VIEWS, dihedral, self_ensemble, undo_dihedral
from upgrader.imaging import bicubic_upscale, downsample, to_float

SR = "subpixel_residual"
TINY = {"width": 8, "depth": 1}
LIMIT_TRAIN, LIMIT_VAL = 256, 64


@pytest.fixture(scope="module")
def real_pairs(real_images) -> tuple[torch.Tensor, torch.Tensor]:
    """(8x8 inputs, 32x32 targets) made from real images the way the trainer makes them."""
    targets = to_float(real_images)
    return downsample(targets), targets


def expected_parameter_count(width: int, depth: int) -> int:
    conv = lambda c_in, c_out: 9 * c_in * c_out + c_out  # a 3x3 conv with bias
    return conv(3, width) + (2 * depth + 1) * conv(width, width) + conv(width, 3 * 4 * 4)


def test_default_shape_and_parameter_count(real_pairs):
    inputs, _ = real_pairs
    model = build_model(SR)
    out = model(inputs)
    assert out.shape == (len(inputs), *OUTPUT_SHAPE)
    assert 0 <= out.min() and out.max() <= 1
    assert parameter_count(model) == expected_parameter_count(48, 6) == 292_320


@pytest.mark.parametrize("width,depth", [(16, 1), (32, 4), (64, 8)])
def test_width_and_depth_are_parameters(width, depth):
    model = build_model(SR, width=width, depth=depth)
    assert parameter_count(model) == expected_parameter_count(width, depth)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, *OUTPUT_SHAPE)


def test_every_convolution_runs_at_8x8():
    """All the learned work happens on the 64 input positions; only PixelShuffle goes to 32x32."""
    model = build_model(SR, width=16, depth=2)
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.append((tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))))
    model(torch.rand(3, 3, 8, 8))
    assert len(seen) == 1 + 2 * 2 + 1 + 1
    assert set(seen) == {((8, 8), (8, 8))}


def test_untrained_model_is_exactly_bicubic(real_pairs):
    """The residual's last conv starts at zero: the output is bicubic bit for bit, and training starts from there."""
    inputs, _ = real_pairs
    model = build_model(SR, width=16, depth=2)
    assert torch.equal(model(inputs), bicubic_upscale(inputs))


def test_a_few_steps_on_real_images_improve_on_bicubic(real_pairs):
    inputs, targets = real_pairs
    torch.manual_seed(0)
    model = build_model(SR, width=8, depth=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    bicubic_loss = nn.functional.mse_loss(bicubic_upscale(inputs), targets).item()
    for _ in range(15):
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert nn.functional.mse_loss(model(inputs), targets).item() < 0.95 * bicubic_loss
        assert not torch.equal(model(inputs), bicubic_upscale(inputs))


# ---- self-ensemble -----------------------------------------------------------------


def test_dihedral_views_are_the_8_distinct_transforms_and_undo_exactly():
    x = torch.rand(2, 3, 8, 8)
    views = [dihedral(x, turns, mirrored) for turns, mirrored in DIHEDRAL]
    assert len({v.numpy().tobytes() for v in views}) == 8
    for view, (turns, mirrored) in zip(views, DIHEDRAL):
        assert torch.equal(undo_dihedral(view, turns, mirrored), x)


def test_self_ensemble_of_an_equivariant_function_is_that_function(real_pairs):
    """Bicubic commutes with flips and rotations, so averaging its 8 un-transformed views changes nothing."""
    inputs, _ = real_pairs
    ensembled = self_ensemble(bicubic_upscale, inputs)
    assert ensembled.shape == (len(inputs), *OUTPUT_SHAPE)
    torch.testing.assert_close(ensembled, bicubic_upscale(inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_self_ensemble_is_one_kn_batch_averaging_the_views(real_pairs, size):
    inputs, _ = real_pairs
    torch.manual_seed(0)
    model = build_model("conv").eval()  # not equivariant: the views really differ
    batch_sizes = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        batch_sizes.append(len(x))
        return model(x)

    with torch.inference_mode():
        ensembled = self_ensemble(counted, inputs, size)
        one_by_one = torch.stack([undo_dihedral(model(dihedral(inputs, t, m)), t, m) for t, m in VIEWS[size]]).mean(0)
        plain = model(inputs)
    assert batch_sizes == [size * len(inputs)]
    assert ensembled.shape == plain.shape
    torch.testing.assert_close(ensembled, one_by_one, rtol=0, atol=1e-6)
    assert (ensembled - plain).abs().max() > 1e-3


def test_ensemble_views_are_subgroups_of_the_dihedral_group():
    """Each size's views are closed under composition, so the ensemble of a mirrored input is the mirrored ensemble."""
    x = torch.rand(1, 3, 8, 8)
    for size, views in VIEWS.items():
        assert len(set(views)) == size and set(views) <= set(DIHEDRAL)
        reached = {dihedral(dihedral(x, *a), *b).numpy().tobytes() for a in views for b in views}
        assert reached == {dihedral(x, *v).numpy().tobytes() for v in views}, size


# ---- published with self-ensemble metrics ----------------------------------------------


@pytest.fixture(scope="module")
def published(data_dir, tmp_path_factory) -> tuple[ModelStore, torch.Tensor]:
    """A tiny real training published as version 1, and the validation images it was measured on."""
    root = tmp_path_factory.mktemp("published")
    store, cache = root / "store", root / "cache"
    assert train_main(["--models", SR, "--arch-params", json.dumps(TINY), "--epochs", "1", "--lr", "3e-3",
                       "--limit-train", str(LIMIT_TRAIN), "--data", str(data_dir), "--store", str(store),
                       "--cache-dir", str(cache), "--limit-val", str(LIMIT_VAL), "--no-progress"]) == 0
    val = load_image_data(data_dir, cache_dir=cache, limit_train=LIMIT_TRAIN, limit_val=LIMIT_VAL, seed=0, progress=False).val
    return ModelStore(store), val


@pytest.mark.slow
def test_trained_model_publishes_reproducible_self_ensemble_metrics(published):
    store, val = published
    model, manifest = store.load(SR, 1)
    assert set(manifest["metrics"]) == {"model", "bicubic", "self_ensemble", "images"}
    assert set(manifest["metrics"]["self_ensemble"]) == {"mse", "psnr", "ssim"}
    assert manifest["metrics"]["self_ensemble"] != manifest["metrics"]["model"]
    metrics = evaluate(model, val, torch.device("cpu"), loss_name="mse", baseline=True, ensemble=True)
    metrics.pop("loss")
    assert metrics == manifest["metrics"]
