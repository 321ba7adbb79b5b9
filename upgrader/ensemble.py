"""Test-time self-ensemble: several outputs, one answer.

The model sees the 8 dihedral transforms (4 rotations x optional mirror) of each
8x8 input; each output is transformed back and the 8 are averaged. All 8 views
go through the model as one batch of 8N, so the cost is one larger forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ENSEMBLE_SIZE = 8
_SPATIAL = (-2, -1)
# (quarter turns, mirrored) for every element of the dihedral group of the square.
DIHEDRAL = tuple((turns, mirrored) for mirrored in (False, True) for turns in range(4))


def dihedral(x: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
    """Mirror left-right (if asked), then rotate by `turns` quarter turns."""
    if mirrored:
        x = x.flip(-1)
    return torch.rot90(x, turns, _SPATIAL)


def undo_dihedral(y: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
    """The inverse of `dihedral(., turns, mirrored)`."""
    y = torch.rot90(y, -turns, _SPATIAL)
    return y.flip(-1) if mirrored else y


def self_ensemble(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Average of `model` over the 8 dihedral views of the N x C x H x W batch `x`."""
    n = x.shape[0]
    views = torch.cat([dihedral(x, turns, mirrored) for turns, mirrored in DIHEDRAL])
    outputs = model(views).split(n)
    total = torch.zeros_like(outputs[0])
    for y, (turns, mirrored) in zip(outputs, DIHEDRAL):
        total += undo_dihedral(y, turns, mirrored)
    return total / ENSEMBLE_SIZE
