"""CLIP-Adapter: a bottleneck MLP on the image feature, mixed in with a residual ratio (Gao et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipAdapter(nn.Module):
    """CLIP-Adapter bottleneck ``ReLU(ReLU(f W1) W2)`` (Gao et al. 2021), no biases."""

    def __init__(self, dim: int, reduction: int, seed: int):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2):
                bound = 1.0 / lin.in_features**0.5
                lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=g))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(f))))
