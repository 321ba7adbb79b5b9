"""Photographs as people have them: a random chain of blur, downsampling, noise and JPEG that turns an HR crop into
the kind of LR image a client sends, for training models that are measured by PSNR.

Each step is a function of a float image (C x H x W or N x C x H x W, values in [0, 1]) and its parameters:

* `gaussian_kernel` and `blur`: isotropic or anisotropic (two sigmas and an angle) Gaussian blur;
* `downsample`: MATLAB's antialiased bicubic (`upgrader.imaging.bicubic_degrade`, the published LR images),
  antialiased bilinear or area averaging;
* `gaussian_noise` and `poisson_noise`: in colour (independent per channel) or grey (one field on every channel);
* `jpeg`: a round trip through Pillow's JPEG encoder (`encode_jpeg`) and decoder at a given quality.

`degrade` draws one chain from a `DegradationConfig` with a `random.Random`: with probability `clean_share` the
plain 8-bit bicubic LR (so a model keeps its quality on clean inputs); otherwise blur (sometimes), one of the
downsampling methods, noise (sometimes), JPEG (sometimes) and, sometimes, a second, milder pass of blur, noise and
JPEG at the LR size. The output is always on the 256 levels of an 8-bit image. The same seed draws the same chain
and the same noise.

The ranges are modest (PSNR-oriented, not the heavy chains of Real-ESRGAN or BSRGAN, whose outputs are judged by
eye): a model trained on them should still score on the standard bicubic benchmark.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from upgrader.imaging import bicubic_degrade, to_8bit

DOWNSAMPLING = ("bicubic", "bilinear", "area")


# ---- the steps -----------------------------------------------------------------------------------------------


def gaussian_kernel(sigma_x: float, sigma_y: float | None = None, angle: float = 0.0, size: int | None = None) -> torch.Tensor:
    """A normalised 2-D Gaussian (size x size, float32): standard deviations `sigma_x` and `sigma_y` (pixels) along
    axes turned by `angle` radians; `sigma_y` None is isotropic. `size` (odd) defaults to cover 3 sigmas."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"gaussian_kernel: sigmas must be positive, got {sigma_x}, {sigma_y}")
    if size is None:
        size = 2 * math.ceil(3 * max(sigma_x, sigma_y)) + 1
    if size % 2 == 0:
        raise ValueError(f"gaussian_kernel: size must be odd, got {size}")
    half = size // 2
    y, x = torch.meshgrid(torch.arange(-half, half + 1, dtype=torch.float64),
                          torch.arange(-half, half + 1, dtype=torch.float64), indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * x + sin * y, -sin * x + cos * y  # coordinates along the kernel's own axes
    kernel = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernel / kernel.sum()).float()


def blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with `kernel` (k x k, odd), reflecting at the borders; the same shape as `images`."""
    batched = images if images.dim() == 4 else images[None]
    channels, half = batched.shape[1], kernel.shape[-1] // 2
    padded = F.pad(batched, (half, half, half, half), mode="reflect" if min(batched.shape[-2:]) > half else "replicate")
    weight = kernel.to(batched.device, batched.dtype).expand(channels, 1, *kernel.shape[-2:])
    out = F.conv2d(padded, weight, groups=channels)
    return out if images.dim() == 4 else out[0]


def downsample(images: torch.Tensor, factor: int, method: str = "bicubic") -> torch.Tensor:
    """Reduce by `factor` (sides cropped to multiples of it): `bicubic` is `bicubic_degrade` (MATLAB's, 8-bit, as the
    published LR images), `bilinear` torch's antialiased bilinear, `area` the mean of each factor x factor block."""
    batched = images if images.dim() == 4 else images[None]
    height, width = batched.shape[-2] // factor, batched.shape[-1] // factor
    batched = batched[..., : height * factor, : width * factor]
    if method == "bicubic":
        out = bicubic_degrade(batched, factor)
    elif method == "bilinear":
        out = F.interpolate(batched, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    elif method == "area":
        out = F.avg_pool2d(batched, factor)
    else:
        raise ValueError(f"downsample: method must be one of {', '.join(DOWNSAMPLING)}, got {method!r}")
    return out if images.dim() == 4 else out[0]


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator, grey: bool = False) -> torch.Tensor:
    """Add zero-mean Gaussian noise of standard deviation `sigma` (in [0, 1] units: 5 levels is 5 / 255); `grey`: one
    noise field shared by every channel. Not clipped (the 8-bit rounding that follows clips)."""
    shape = (*images.shape[:-3], 1, *images.shape[-2:]) if grey else images.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    return images + sigma * noise


def poisson_noise(images: torch.Tensor, peak: float, generator: torch.Generator, grey: bool = False) -> torch.Tensor:
    """Shot noise: each value x becomes Poisson(x * peak) / peak, so its standard deviation is sqrt(x / peak);
    `grey`: the noise of the luma (BT.601) added to every channel."""
    clipped = images.clamp(0, 1).float().cpu()
    if grey:
        luma = (0.299 * clipped[..., 0:1, :, :] + 0.587 * clipped[..., 1:2, :, :] + 0.114 * clipped[..., 2:3, :, :])
        noise = torch.poisson(luma * peak, generator=generator) / peak - luma
    else:
        noise = torch.poisson(clipped * peak, generator=generator) / peak - clipped
    return images + noise.to(images.device, images.dtype)


def encode_jpeg(image: torch.Tensor, quality: int) -> bytes:
    """One image (3 x H x W float in [0, 1]) as a JPEG file from Pillow's encoder at `quality` (1-95; Pillow's
    default 4:2:0 chroma subsampling)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg: quality must be in 1..100, got {quality}")
    pixels = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """One image (3 x H x W float in [0, 1]) through `encode_jpeg` at `quality` and Pillow's decoder: float on the
    8-bit levels, with the JPEG's 8x8 block artefacts."""
    with Image.open(io.BytesIO(encode_jpeg(image, quality))) as decoded:
        out = np.array(decoded.convert("RGB"))
    return torch.from_numpy(out).permute(2, 0, 1).to(image.device, image.dtype if image.dtype.is_floating_point else torch.float32) / 255


# ---- the random chain ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DegradationConfig:
    """Probabilities and ranges of `degrade`'s chain. Blur sigmas are in HR pixels in the first pass and LR pixels in
    the second; noise sigmas in 8-bit levels; Poisson peaks in photon counts at full scale (log-uniform)."""

    scale: int = 4
    clean_share: float = 0.3  # the plain 8-bit bicubic LR, nothing else
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.2, 1.2)
    anisotropic_prob: float = 0.4  # of the blurred ones
    downsampling: tuple[tuple[str, float], ...] = (("bicubic", 0.6), ("bilinear", 0.2), ("area", 0.2))
    noise_prob: float = 0.45
    poisson_share: float = 0.3  # of the noisy ones; the rest Gaussian
    grey_noise_prob: float = 0.3
    gaussian_sigma: tuple[float, float] = (1.0, 12.0)
    poisson_peak: tuple[float, float] = (200.0, 5000.0)
    jpeg_prob: float = 0.6
    jpeg_quality: tuple[int, int] = (30, 95)
    second_pass_prob: float = 0.1
    second_blur_sigma: tuple[float, float] = (0.2, 0.6)
    second_noise_sigma: tuple[float, float] = (1.0, 4.0)
    second_jpeg_quality: tuple[int, int] = (60, 95)

    def describe(self) -> dict:
        """The config as JSON-ready values (what a manifest records)."""
        return {k: [list(p) for p in v] if k == "downsampling" else list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}


def _noise(image: torch.Tensor, rng: random.Random, config: DegradationConfig, generator: torch.Generator,
           steps: list[str]) -> torch.Tensor:
    grey = rng.random() < config.grey_noise_prob
    if rng.random() < config.poisson_share:
        low, high = config.poisson_peak
        peak = math.exp(rng.uniform(math.log(low), math.log(high)))
        steps.append(f"poisson(peak={peak:.0f}{', grey' if grey else ''})")
        return poisson_noise(image, peak, generator, grey)
    sigma = rng.uniform(*config.gaussian_sigma)
    steps.append(f"gaussian(sigma={sigma:.2f}{', grey' if grey else ''})")
    return gaussian_noise(image, sigma / 255, generator, grey)


def _random_kernel(rng: random.Random, sigma_range: tuple[float, float], anisotropic_prob: float) -> tuple[torch.Tensor, str]:
    if rng.random() < anisotropic_prob:
        sx, sy, angle = rng.uniform(*sigma_range), rng.uniform(*sigma_range), rng.uniform(0, math.pi)
        return gaussian_kernel(sx, sy, angle), f"blur({sx:.2f}x{sy:.2f}@{math.degrees(angle):.0f})"
    sigma = rng.uniform(*sigma_range)
    return gaussian_kernel(sigma), f"blur({sigma:.2f})"


def degrade(hr: torch.Tensor, config: DegradationConfig, rng: random.Random) -> tuple[torch.Tensor, str]:
    """One HR image (3 x H x W float in [0, 1], sides multiples of `config.scale`) to its 8-bit LR
    (3 x H/scale x W/scale float) through a chain drawn by `rng`; also the chain, in words."""
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    if rng.random() < config.clean_share:
        return downsample(hr, config.scale, "bicubic"), "clean"
    steps: list[str] = []
    image = hr
    if rng.random() < config.blur_prob:
        kernel, words = _random_kernel(rng, config.blur_sigma, config.anisotropic_prob)
        image = blur(image, kernel)
        steps.append(words)
    methods, weights = zip(*config.downsampling)
    method = rng.choices(methods, weights)[0]
    steps.append(method)
    image = downsample(image.clamp(0, 1), config.scale, method)
    if rng.random() < config.noise_prob:
        image = _noise(image, rng, config, generator, steps)
    if rng.random() < config.jpeg_prob:
        quality = rng.randint(*config.jpeg_quality)
        image = jpeg(image, quality)
        steps.append(f"jpeg({quality})")
    if rng.random() < config.second_pass_prob:
        steps.append("second:")
        if rng.random() < config.blur_prob:
            kernel, words = _random_kernel(rng, config.second_blur_sigma, config.anisotropic_prob)
            image = blur(image, kernel)
            steps.append(words)
        if rng.random() < config.noise_prob:
            sigma = rng.uniform(*config.second_noise_sigma)
            image = gaussian_noise(image, sigma / 255, generator)
            steps.append(f"gaussian(sigma={sigma:.2f})")
        quality = rng.randint(*config.second_jpeg_quality)
        image = jpeg(image, quality)
        steps.append(f"jpeg({quality})")
    return to_8bit(image), " ".join(steps)


def degrade_batch(hr: torch.Tensor, config: DegradationConfig, seed: int | str) -> torch.Tensor:
    """N x 3 x H x W HR floats to their N LR images, image i's chain drawn from `random.Random(f"{seed}:{i}")`, so a
    (seed, index) always gives the same LR."""
    return torch.stack([degrade(image, config, random.Random(f"{seed}:{i}"))[0] for i, image in enumerate(hr)])
