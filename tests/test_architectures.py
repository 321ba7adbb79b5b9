"""The three reference architectures: shapes, value range and the exact parameter counts of the issue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from upgrader.architectures import ARCHITECTURES, build_model, parameter_count
from upgrader.imaging import bicubic_upscale, downsample, psnr_per_image, ssim_per_image, to_float

REFERENCE_PARAMS = {"fc": 2_020_160, "conv": 117_655, "resnet18": 13_957_155}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_reference_architecture_shape_range_and_parameter_count(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert parameter_count(model) == REFERENCE_PARAMS[name]
    with torch.inference_mode():
        out = model(torch.rand(3, 3, 8, 8))
    assert out.shape == (3, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1


def test_every_registered_architecture_maps_8x8_to_32x32():
    for name in ARCHITECTURES:
        with torch.inference_mode():
            assert build_model(name).eval()(torch.rand(2, 3, 8, 8)).shape == (2, 3, 32, 32), name


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown architecture 'vgg'.*conv"):
        build_model("vgg")


def test_bicubic_matches_pillow_on_real_images(real_images):
    targets = to_float(real_images)
    inputs = (downsample(targets) * 255).round() / 255  # what an 8x8 PNG holds
    ours = bicubic_upscale(inputs)
    pil = []
    for img in (inputs * 255).round().byte().permute(0, 2, 3, 1).numpy():
        pil.append(np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC)))
    pil = to_float(torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2))
    assert (ours - pil).abs().mean() < 1 / 255


def test_psnr_and_ssim_behave(real_images):
    x = to_float(real_images[:8])
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ssim_per_image(x, x), torch.ones(8))
    assert (ssim_per_image(x, noisy) < 0.95).all()
    mse = (x - noisy).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr_per_image(x, noisy), -10 * torch.log10(mse))
    assert (psnr_per_image(x, bicubic_upscale(downsample(x))) > psnr_per_image(x, noisy * 0)).all()


# ---- the options of subpixel_residual ----------------------------------------------------------------


def test_reparameterised_conv_is_exactly_its_three_branches():
    """Trained as 3x3 + 1x1 branches, run as the single 3x3 kernel they sum to: the same function."""
    torch.manual_seed(0)
    model = build_model("subpixel_residual", width=16, depth=2, rep=True)
    conv = model.body[0].conv1
    x = torch.rand(4, 16, 8, 8)
    branches = conv.conv3(x) + conv.conv1(x)
    assert torch.allclose(conv(x), branches, atol=1e-5)
    # the extra branch is a trainable parameter of the model, stored with it
    assert "body.0.conv1.conv1.weight" in {name for name, _ in model.named_parameters()}


def test_channel_attention_gates_each_channel_by_its_global_average():
    torch.manual_seed(0)
    model = build_model("subpixel_residual", width=16, depth=1, attention=4)
    attention = model.body[0].attention
    x = torch.rand(2, 16, 8, 8)
    gated = attention(x)
    gate = gated / x
    # one factor in (0, 1) per image and channel, the same at every position
    assert torch.allclose(gate, gate[:, :, :1, :1].expand_as(gate), atol=1e-5)
    assert (gate > 0).all() and (gate < 1).all()
    assert attention.squeeze.out_channels == 4


def test_global_attention_starts_as_the_identity_and_then_mixes_every_position():
    torch.manual_seed(0)
    block = build_model("subpixel_residual", width=16, depth=1, global_attention=1).context[0]
    x = torch.rand(2, 16, 8, 8)
    assert torch.equal(block(x), x)  # both residual branches end in a zero projection
    for last in (block.proj, block.mlp_out):
        torch.nn.init.normal_(last.weight, std=0.5)
    nudged = x.clone()
    nudged[:, 0, 0, 0] += 1.0  # one channel (a LayerNorm would erase a shift of all of them)
    changed = (block(nudged) - block(x)).abs().amax(dim=1)  # (2, 8, 8): how much each position moved
    # one corner's features reach the far corner in one block (a 3x3 conv reaches one neighbour)
    assert (changed[:, 7, 7] > 1e-4).all()
    with pytest.raises(ValueError, match="width 18 is not a multiple of 4 heads"):
        build_model("subpixel_residual", width=18, depth=1, global_attention=1)


@pytest.mark.parametrize("options", [{}, {"rep": True}, {"attention": 16}])
def test_refine_blocks_grow_a_trained_model_deeper_from_its_own_outputs(options):
    torch.manual_seed(0)
    trained = build_model("subpixel_residual", width=16, depth=2, **options)
    for tensor in trained.parameters():  # stands for a trained model: nothing left at its zero start
        torch.nn.init.normal_(tensor, std=0.1)
    grown = build_model("subpixel_residual", width=16, depth=2, refine=2, **options)
    missing = grown.load_state_dict(trained.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("refine.") for key in missing)  # no published tensor moved
    inputs = torch.rand(4, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(grown(inputs), trained(inputs))
        for tensor in grown.refine[1].conv2.parameters():  # once trained, a refine block does change the output
            torch.nn.init.normal_(tensor, std=0.1)
        assert not torch.allclose(grown(inputs), trained(inputs), atol=1e-4)


@pytest.mark.parametrize("params", [{"rep": True}, {"attention": 16}, {"width": 64, "depth": 8, "attention": 16},
                                    {"width": 64, "depth": 8, "global_attention": 1}, {"width": 16, "depth": 2, "refine": 2}])
def test_every_option_starts_as_bicubic_and_keeps_the_default_model_unchanged(params, real_images):
    inputs = downsample(to_float(real_images[:8]))
    model = build_model("subpixel_residual", **params).eval()
    with torch.inference_mode():
        assert torch.allclose(model(inputs), bicubic_upscale(inputs), atol=1e-6)
    # a default model's weights (what today's store holds) still load into a default build, key for key
    default = build_model("subpixel_residual")
    assert build_model("subpixel_residual", rep=False, attention=0).load_state_dict(default.state_dict()) is not None
