"""Random affine augmentation (shift, rotation, scale), seeded: used by pretraining and prior training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineRange:
    """Ranges of the random affine map: shift (fraction of the side), rotation (degrees), scale."""

    max_shift: float = 2.0 / 28.0
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)


def random_affine(x: torch.Tensor, rng: AffineRange, g: torch.Generator, grayscale: bool) -> torch.Tensor:
    """Random affine map per image of ``x`` ``(N, 3, S, S)`` in [0, 1] (drawn from ``g``). Zero padding for
    grayscale data (black background), border padding for colour."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=g) * 2 - 1  # in [-1, 1)
    angle = u[:, 0] * math.radians(rng.max_rotation_deg)
    lo, hi = rng.scale_range
    scale = lo + (u[:, 1] + 1) / 2 * (hi - lo)
    shift = u[:, 2:] * (2 * rng.max_shift)  # normalised coords span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    row0 = torch.stack([cos, -sin, shift[:, 0]], 1)
    row1 = torch.stack([sin, cos, shift[:, 1]], 1)
    theta = torch.stack([row0, row1], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    pad = "zeros" if grayscale else "border"
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=pad, align_corners=False).clamp_(0.0, 1.0)
