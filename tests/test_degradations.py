"""upgrader/degradations.py on real photographs (sr-natural training images): each step does what it says (blur takes
high frequencies away, noise has the asked sigma, JPEG is Pillow's with its 8x8 blocks and quality's tables) and the
random chain is deterministic under a seed, 8-bit, of the right shape, with its clean share."""

from __future__ import annotations

import io
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from upgrader.degradations import (DegradationConfig, blur, degrade, degrade_batch, downsample, encode_jpeg,
                                   gaussian_kernel, gaussian_noise, jpeg, poisson_noise)
from upgrader.imaging import bicubic_degrade

NATURAL = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "sr-natural" / "bsd200"
# The JPEG standard's example luminance table (ITU-T T.81 Annex K.1), in row order.
ANNEX_K_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A real photograph, 3 x 192 x 256 float in [0, 1] (a crop of a BSDS300 training image)."""
    paths = sorted(NATURAL.glob("*.png"))
    if not paths:
        pytest.skip(f"no photographs in {NATURAL}")
    with Image.open(paths[0]) as image:
        pixels = np.array(image.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1)[:, :192, :256].float() / 255


def high_frequency_energy(image: torch.Tensor) -> float:
    """Spectral energy of the luma above half the Nyquist frequency along either axis."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(image.mean(0) - image.mean())).abs() ** 2
    h, w = spectrum.shape
    fy, fx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    return spectrum[(fy.abs() > h // 4) | (fx.abs() > w // 4)].sum().item()


def blockiness(image: torch.Tensor) -> float:
    """Mean step across the 8-pixel column boundaries over the mean step between columns inside the blocks."""
    steps = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1))  # steps[i]: between columns i and i+1
    boundary = torch.arange(steps.shape[0]) % 8 == 7
    return (steps[boundary].mean() / steps[~boundary].mean()).item()


def test_gaussian_kernels_are_normalised_with_the_asked_spread_and_orientation():
    iso = gaussian_kernel(1.5)
    assert iso.shape == (11, 11) and iso.dtype == torch.float32
    assert iso.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(iso, iso.T) and torch.allclose(iso, iso.flip(0))
    sx, sy, angle = 2.0, 0.7, math.radians(30)
    kernel = gaussian_kernel(sx, sy, angle, size=21).double()
    y, x = torch.meshgrid(torch.arange(-10, 11.0, dtype=torch.float64), torch.arange(-10, 11.0, dtype=torch.float64), indexing="ij")
    along, across = math.cos(angle) * x + math.sin(angle) * y, -math.sin(angle) * x + math.cos(angle) * y
    assert (kernel * along**2).sum().item() == pytest.approx(sx**2, rel=0.02)  # variance along the turned axes
    assert (kernel * across**2).sum().item() == pytest.approx(sy**2, rel=0.02)
    assert (kernel * along * across).sum().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="sigmas must be positive"):
        gaussian_kernel(0.0)


def test_blur_takes_high_frequencies_away_and_keeps_the_mean(photo):
    blurred = blur(photo, gaussian_kernel(1.2))
    assert blurred.shape == photo.shape
    assert high_frequency_energy(blurred) < 0.2 * high_frequency_energy(photo)
    assert blurred.mean().item() == pytest.approx(photo.mean().item(), abs=2e-3)

    def kept_steps(image: torch.Tensor) -> tuple[float, float]:
        """Mean step between neighbours along x and along y, as a share of the photograph's."""
        along_x = (image[..., 1:] - image[..., :-1]).abs().mean() / (photo[..., 1:] - photo[..., :-1]).abs().mean()
        along_y = (image[:, 1:] - image[:, :-1]).abs().mean() / (photo[:, 1:] - photo[:, :-1]).abs().mean()
        return along_x.item(), along_y.item()

    along_x, along_y = kept_steps(blur(photo[None], gaussian_kernel(2.0, 0.3, 0.0))[0])  # long along x
    assert along_x < 0.6 * along_y
    along_x, along_y = kept_steps(blur(photo, gaussian_kernel(2.0, 0.3, math.pi / 2)))  # turned a quarter: along y
    assert along_y < 0.6 * along_x


def test_downsampling_methods_reduce_by_the_factor(photo):
    for method in ("bicubic", "bilinear", "area"):
        small = downsample(photo, 4, method)
        assert small.shape == (3, 48, 64) and small.dtype == torch.float32
    assert torch.equal(downsample(photo, 4, "bicubic"), bicubic_degrade(photo[None], 4)[0])
    assert torch.allclose(downsample(photo, 4, "area")[:, 1, 2], photo[:, 4:8, 8:12].mean(dim=(1, 2)))
    assert downsample(photo[:, :190, :255], 4, "area").shape == (3, 47, 63)
    with pytest.raises(ValueError, match="method must be one of"):
        downsample(photo, 4, "lanczos")


def test_gaussian_noise_has_the_asked_sigma_in_colour_and_in_grey(photo):
    generator = torch.Generator().manual_seed(0)
    noise = gaussian_noise(photo, 5 / 255, generator) - photo
    assert noise.std().item() * 255 == pytest.approx(5.0, rel=0.02)
    assert abs(np.corrcoef(noise[0].flatten(), noise[1].flatten())[0, 1]) < 0.02
    grey = gaussian_noise(photo, 10 / 255, generator, grey=True) - photo
    assert grey.std().item() * 255 == pytest.approx(10.0, rel=0.02)
    assert torch.allclose(grey[0], grey[1], atol=1e-6) and torch.allclose(grey[1], grey[2], atol=1e-6)


def test_poisson_noise_grows_with_the_signal_as_shot_noise_does():
    generator = torch.Generator().manual_seed(0)
    peak = 1000.0
    for level in (0.1, 0.5, 0.9):
        flat = torch.full((3, 128, 128), level)
        noise = poisson_noise(flat, peak, generator) - flat
        assert noise.std().item() == pytest.approx(math.sqrt(level / peak), rel=0.03)
        assert abs(noise.mean().item()) < 1e-3
    grey = poisson_noise(torch.full((3, 64, 64), 0.5), peak, generator, grey=True)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_jpeg_is_pillows_encoder_with_its_quality_tables_and_8x8_blocks(photo):
    for quality in (30, 75, 90):
        data = encode_jpeg(photo, quality)
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.format == "JPEG"
            luma_table = list(decoded.quantization[0])
            via_pillow = torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1).float() / 255
        # libjpeg's scaling of the standard table by quality (jpeg_quality_scaling); Pillow reports it in row order
        scale = 5000 // quality if quality < 50 else 200 - 2 * quality
        assert luma_table == [min(max((q * scale + 50) // 100, 1), 255) for q in ANNEX_K_LUMA]
        assert torch.equal(jpeg(photo, quality), via_pillow)
    assert blockiness(photo) == pytest.approx(1.0, abs=0.1)
    assert blockiness(jpeg(photo, 30)) > 1.3
    errors = [(jpeg(photo, q) - photo).pow(2).mean().item() for q in (30, 60, 90)]
    assert errors[0] > errors[1] > errors[2] > 0
    with pytest.raises(ValueError, match="quality must be in 1..100"):
        jpeg(photo, 0)


def test_the_chain_is_8_bit_of_the_right_shape_and_the_same_under_a_seed(photo):
    config = DegradationConfig()
    for seed in range(20):
        lr, chain = degrade(photo, config, random.Random(seed))
        again, same_chain = degrade(photo, config, random.Random(seed))
        assert torch.equal(lr, again) and chain == same_chain
        assert lr.shape == (3, 48, 64) and lr.dtype == torch.float32
        assert torch.equal(lr, (lr * 255).round() / 255) and lr.min() >= 0 and lr.max() <= 1
        if chain == "clean":
            assert torch.equal(lr, bicubic_degrade(photo[None], 4)[0])
    batch = torch.stack([photo[:, :96, :96], photo[:, 96:, :96], photo[:, :96, 96:192]])
    lrs = degrade_batch(batch, config, seed="7:3")
    assert lrs.shape == (3, 3, 24, 24) and torch.equal(lrs, degrade_batch(batch, config, seed="7:3"))
    assert torch.equal(lrs[1], degrade(batch[1], config, random.Random("7:3:1"))[0])
    outputs = [degrade_batch(batch, config, seed=f"7:{step}") for step in range(6)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_the_chain_draws_its_clean_share_and_every_kind_of_step(photo):
    crop = photo[:, :32, :32]
    chains = [degrade(crop, DegradationConfig(), random.Random(seed))[1] for seed in range(600)]
    assert sum(chain == "clean" for chain in chains) / len(chains) == pytest.approx(0.3, abs=0.07)
    words = " ".join(chains)
    for step in ("blur(", "bicubic", "bilinear", "area", "gaussian(", "poisson(", "grey", "jpeg(", "second:"):
        assert step in words, step


def test_a_jpeg_only_chain_adds_blocks_to_the_bicubic_lr(photo):
    config = replace(DegradationConfig(), clean_share=0.0, blur_prob=0.0, noise_prob=0.0, jpeg_prob=1.0,
                     jpeg_quality=(30, 30), second_pass_prob=0.0, downsampling=(("bicubic", 1.0),))
    lr, chain = degrade(photo, config, random.Random(0))
    assert chain == "bicubic jpeg(30)"
    assert torch.equal(lr, jpeg(bicubic_degrade(photo[None], 4)[0], 30))
    assert F.mse_loss(lr, bicubic_degrade(photo[None], 4)[0]).item() > 0
