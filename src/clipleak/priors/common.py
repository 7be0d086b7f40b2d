"""Shapes shared by the learned priors."""

from __future__ import annotations

import torch

from ..errors import ClipleakError


def layout(image_size: int) -> tuple[int, int]:
    """``(start, n_up)``: the smallest side (>= 4) reached by halving ``image_size``, and how many halvings.

    32 -> (4, 3), 64 -> (4, 4), 224 -> (7, 5), 28 -> (7, 2). Sizes that cannot be halved at least once
    down to a side >= 4 (odd sizes, or below 8) are refused.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ClipleakError(f"a prior needs an integer image size of at least 8 px, got {image_size!r}")
    n, side = 0, image_size
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        n += 1
    if n == 0:
        raise ClipleakError(f"image size {image_size} cannot be halved into a prior's upsampling stack")
    return side, n


def expand_gray(x: torch.Tensor) -> torch.Tensor:
    """One channel -> three identical channels (grayscale convention); three channels unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
