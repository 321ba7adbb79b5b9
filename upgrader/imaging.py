"""Image math shared by the trainer and the service (batched, on any device).

All tensors are float N x 3 x H x W in [0, 1] unless noted.
"""

from __future__ import annotations

import functools
import math

import numpy as np
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


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`, PIL's bicubic)."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


PADDINGS = ("replicate", "symmetric")


@functools.lru_cache(maxsize=64)
def _imresize_matrix(in_length: int, scale: float, padding: str = "replicate") -> np.ndarray:
    """out x in float64 matrix of MATLAB imresize's bicubic weights along one axis (`scale` = out / in).

    Follows MATLAB's `contributions`: output pixel j (1-based) sits at u = j / scale + (1 - 1 / scale) / 2 in
    input coordinates (pixel centres, not corners, line up); when reducing, the kernel is stretched by
    1 / scale and its height scaled by `scale` (antialiasing); each row of weights is normalised to sum to 1.
    Taps that fall outside the image read the edge pixel (`replicate`) or the mirror image including the
    edge pixel (`symmetric`: ... 2 1 | 1 2 ... n | n n-1 ...). Replicate is what the published LR_bicubic_x4
    images hold (99.9% of their edge pixels equal, against 67% with symmetric; the interiors are the same
    either way). Taps that land on the same pixel add up.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    out_length = math.ceil(in_length * scale - 1e-9)
    kernel_width = 4.0
    if scale < 1:
        kernel = lambda x: scale * _cubic(scale * x)  # noqa: E731 - the widened, antialiasing kernel
        kernel_width /= scale
    else:
        kernel = _cubic
    u = np.arange(1, out_length + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]  # 1-based input positions each output reads
    weights = kernel(u[:, None] - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    zero_based = indices.astype(np.int64) - 1
    if padding == "replicate":
        columns = np.clip(zero_based, 0, in_length - 1)
    else:
        mirrored = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])  # period 2n
        columns = mirrored[np.mod(zero_based, 2 * in_length)]
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), columns.ravel()), weights.ravel())
    return matrix


def imresize_bicubic(images: torch.Tensor, scale: float, *, quantize: bool = False, padding: str = "replicate") -> torch.Tensor:
    """MATLAB `imresize(images, scale)` with its default bicubic kernel and antialiasing, on N x C x H x W floats.

    `scale` is MATLAB's: output size / input size, so 1/4 reduces 4x (the degradation of every published
    x4 super-resolution table: the LR_bicubic_x4 images) and 4 enlarges 4x (the "bicubic" row of those
    tables). The output is ceil(H * scale) x ceil(W * scale). Separable: one weighted sum along the height,
    then one along the width (MATLAB's order when both scales are equal), each a matmul with that axis's
    weight matrix, in the images' float dtype.

    `quantize`: round (and clip) to 8-bit levels after each pass, as MATLAB does on uint8 images: the
    published LR images match this exactly in 99.9% of their interior pixels (87% without the rounding
    in between; every pixel within one level either way). Without it the result is neither rounded nor
    clamped (bicubic overshoots). Differentiable when not quantized, on any device.
    """
    if scale <= 0:
        raise ValueError(f"imresize_bicubic: scale must be positive, got {scale}")
    height, width = images.shape[-2:]
    dtype = images.dtype if images.dtype.is_floating_point else torch.float32
    rows = torch.from_numpy(_imresize_matrix(height, float(scale), padding)).to(images.device, dtype)
    cols = torch.from_numpy(_imresize_matrix(width, float(scale), padding)).to(images.device, dtype)
    resized = torch.matmul(rows, images.to(dtype))  # (out_h x H) @ (..., H, W): along the height
    if quantize:
        resized = to_8bit(resized)
    resized = torch.matmul(resized, cols.T)  # (..., out_h, W) @ (W x out_w): along the width
    return to_8bit(resized) if quantize else resized


def bicubic_degrade(targets: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The standard x4 degradation of 8-bit photographs: MATLAB's antialiased bicubic reduction by `factor`, as
    MATLAB computes it on uint8 images (8-bit after each pass), so the result is what an LR PNG holds. Targets
    whose sides are not multiples of `factor` are cropped to them (bottom and right), as the benchmark's were."""
    height, width = targets.shape[-2:]
    targets = targets[..., : height - height % factor, : width - width % factor]
    return imresize_bicubic(targets, 1.0 / factor, quantize=True)


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB in [0, 1], also in [0, 1] (16/255 to 235/255): Y = 16 + (65.481 R + 128.553 G +
    24.966 B) on 0-255 values, the channel the published super-resolution tables measure. N x 3 x H x W -> N x H x W."""
    r, g, b = images.unbind(-3)
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def psnr_y(a: torch.Tensor, b: torch.Tensor, border: int = 4, eps: float = 1e-10) -> torch.Tensor:
    """PSNR in dB of each image pair on BT.601 luma with `border` pixels cropped from every side (the published x4
    convention: border = scale), data range 1. Pass 8-bit images (`to_8bit`), as the published figures are."""
    ya, yb = rgb_to_y(a.float()), rgb_to_y(b.float())
    if border:
        ya, yb = ya[..., border:-border, border:-border], yb[..., border:-border, border:-border]
    mse = (ya - yb).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(eps))


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
