"""The pieces of a training recipe that flags switch: losses, learning-rate schedules,
augmentation and weight averaging.

The defaults (`mse`, `constant`, no augmentation, no EMA) are the reference recipe;
docs/training.md says which of the others the shipped models use and what each scores.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


CHARBONNIER_EPS = 1e-3


def charbonnier_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A differentiable L1: sqrt(d^2 + eps^2), as in LapSRN / EDSR-family super-resolution."""
    return torch.sqrt((outputs - targets).pow(2) + CHARBONNIER_EPS**2).mean()


# Squared error of an output within half an 8-bit level everywhere ((1/255)^2 / 12, the rounding noise of a
# uniform error): below it the PNG the service returns no longer changes, so more precision earns nothing.
PSNR_LOSS_FLOOR = (1 / 255) ** 2 / 12


def psnr_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Minus the mean per-image PSNR (dB): the validation metric itself, a mean over images of each image's PSNR.

    MSE and L1 average errors over pixels, so their gradient is led by the hard images; this one weighs each
    image's squared-error gradient by 1 / its MSE, as the metric does: a dB gained on a smooth photo tile counts
    as much as one on a busy CIFAR-10 image. The floor keeps a perfectly flat crop from taking over a batch.
    """
    mse = (outputs - targets).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(mse + PSNR_LOSS_FLOOR).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "charbonnier": charbonnier_loss,
    "psnr": psnr_loss,
}


def _cosine_between(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def _one_cycle(progress: float, warmup: float = 0.3, initial: float = 1 / 25, final: float = 1 / 25 / 1e4) -> float:
    """torch's OneCycleLR with its defaults: cosine up from lr/25 over 30% of the steps, then cosine down to lr/2.5e5."""
    if progress < warmup:
        return _cosine_between(initial, 1.0, progress / warmup)
    return _cosine_between(1.0, final, (progress - warmup) / (1.0 - warmup))


# Multiplier of the base learning rate as a function of training progress in [0, 1].
LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: _cosine_between(1.0, 0.0, progress),
    "onecycle": _one_cycle,
}


def learning_rate(step: int, total_steps: int, *, base_lr: float, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total_steps`; the schedule spans the whole run."""
    progress = min(step / max(total_steps, 1), 1.0)
    return base_lr * LR_SCHEDULES[schedule](progress)


def dihedral_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image in one of the 8 flips/rotations of the square, chosen at random per image.

    Random horizontal flip, vertical flip and transpose, each with probability 1/2,
    reach all 8 elements of the dihedral group with equal probability.
    """
    n = len(images)
    for transform in (lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.transpose(-1, -2)):
        chosen = torch.rand(n, 1, 1, 1, device=images.device, generator=generator) < 0.5
        images = torch.where(chosen, transform(images), images)
    return images


class EMA:
    """An exponential moving average of a model's weights (and buffers, e.g. BatchNorm statistics).

    With `--ema DECAY` this average, not the last weights, is evaluated and published.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.averaged = copy.deepcopy(model).eval().requires_grad_(False)
        # The tensors are paired once: state_dict() values alias the parameters and buffers, which
        # training, load_state_dict and DDP all update in place. One foreach call per step then
        # replaces a Python loop of a kernel per tensor (what a GPU step at batch 64 waits on).
        pairs = list(zip(self.averaged.state_dict().values(), model.state_dict().values(), strict=True))
        self._floats = ([a for a, _ in pairs if a.dtype.is_floating_point], [live for a, live in pairs if a.dtype.is_floating_point])
        self._counters = [(a, live) for a, live in pairs if not a.dtype.is_floating_point]  # e.g. BatchNorm's num_batches_tracked

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up: with a constant decay the first thousands of steps would still be
        # dominated by the random initialisation, which ruins short runs.
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(*self._floats, 1.0 - decay)  # what torch.optim.swa_utils' EMA does
        for averaged, live in self._counters:
            averaged.copy_(live)
