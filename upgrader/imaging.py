"""Image math shared by the trainer and the service (batched, on any device).

All tensors are float N x 3 x H x W in [0, 1] unless noted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upgrader.architectures import INPUT_SIZE, OUTPUT_SIZE


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 in [0, 1]."""
    return images_uint8.float().div_(255.0)


def downsample(targets: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """32x32 -> 8x8 by antialiased bilinear reduction.

    This is what torchvision's `Resize(8)` does to a PIL image (PIL's bilinear filter
    with support scaled by the reduction factor); the trainer makes every low-res
    input this way, per batch, on the training device.
    """
    return F.interpolate(targets, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] rounded to the nearest of the 256 levels a PNG can hold (still float): what a client's
    8x8 PNG carries to the service, and what its 32x32 PNG answer carries back."""
    return images.clamp(0, 1).mul(255.0).round_().div_(255.0)


def bicubic_upscale(inputs: torch.Tensor, size: int = OUTPUT_SIZE) -> torch.Tensor:
    """8x8 -> 32x32 bicubic, the baseline every model is compared with.

    `antialias=True` selects PyTorch's PIL-compatible kernel (a = -0.5), so this is
    what `PIL.Image.resize(..., BICUBIC)` gives, up to rounding.
    """
    return F.interpolate(inputs, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """PSNR in dB of each image pair (data range 1)."""
    return -10.0 * torch.log10(mse_per_image(a, b).clamp_min(eps))


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03), mean over channels and valid positions."""
    a, b = a.float(), b.float()
    channels = a.shape[1]
    w = _gaussian_window(window, sigma, a.device, a.dtype).expand(channels, 1, window, window)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
