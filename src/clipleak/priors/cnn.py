"""GradViT's *prior network*: a small CNN with BatchNorm trained on the public split, and the
DeepInversion-style image prior that matches a candidate batch's feature statistics to its BN running
statistics.

The prior of a batch is ``sum_l |mu_l(x) - running_mean_l|_2 + |var_l(x) - running_var_l|_2`` over the
network's BatchNorm layers (``mu_l``, ``var_l``: per-channel mean and unbiased variance of the layer's
input over the batch and the spatial positions). After training, the running statistics are
*calibrated*: recomputed in one pass over the public images, so they are those images' exact statistics
and the prior of the public set is zero (up to float error), while noise scores far higher.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import Term
from ..errors import ClipleakError


class PriorCNN(nn.Module):
    """``depth`` blocks of (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) with ``width``, 2x ``width``, ... channels,
    global average pooling and a linear classifier over ``classes``. Images ``(B, C, H, W)`` in [0, 1]
    (a grayscale net averages three identical channels back to one). 24k parameters at width 16, depth 3."""

    kind = "cnn"

    def __init__(self, image_size: int = 32, channels: int = 1, classes: int = 10, width: int = 16, depth: int = 3):
        super().__init__()
        if channels not in (1, 3):
            raise ClipleakError(f"channels must be 1 (grayscale) or 3, got {channels!r}")
        if classes < 2 or width < 1 or depth < 1 or image_size < 2**depth:
            raise ClipleakError("need classes >= 2, width >= 1, depth >= 1 and image_size >= 2**depth")
        self.image_size, self.channels, self.classes = int(image_size), int(channels), int(classes)
        self.width, self.depth = int(width), int(depth)
        convs, bns = [], []
        c_in = channels
        for i in range(depth):
            c_out = width * 2**i
            convs.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
            bns.append(nn.BatchNorm2d(c_out))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(bns)
        self.head = nn.Linear(c_in, classes)
        self.card: dict[str, Any] = {}

    def arch(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "channels": self.channels, "classes": self.classes,
                "width": self.width, "depth": self.depth}

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != self.image_size:
            raise ClipleakError(f"this CNN takes (B, C, {self.image_size}, {self.image_size}) images, "
                                f"got {tuple(images.shape)}")
        if self.channels == 1 and images.shape[1] == 3:
            return images.mean(dim=1, keepdim=True)
        return images

    def forward_with_stats(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the input of every BatchNorm layer."""
        h = self._prep(images)
        bn_inputs = []
        for conv, bn in zip(self.convs, self.bns, strict=True):
            h = conv(h)
            bn_inputs.append(h)
            h = F.max_pool2d(F.relu(bn(h)), 2)
        return self.head(h.mean(dim=(2, 3))), bn_inputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(images)[0]

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        """Set every BN layer's running statistics to the exact statistics of ``images`` (one pass, layer by
        layer, each layer's input computed with the layers before it already calibrated)."""
        was = self.training
        self.eval()
        h = self._prep(images)
        for conv, bn in zip(self.convs, self.bns, strict=True):
            assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
            h = conv(h)
            flat = h.transpose(0, 1).reshape(h.shape[1], -1)
            bn.running_mean.copy_(flat.mean(1))
            bn.running_var.copy_(flat.var(1, unbiased=True))
            h = F.max_pool2d(F.relu(bn(h)), 2)
        self.train(was)


def bn_statistics_loss(net: PriorCNN, images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's feature-statistics prior: summed l2 distances of each BN layer's batch mean and
    (unbiased) variance to its running statistics. ``net`` runs in eval mode; differentiable in ``images``."""
    net.eval()
    _, inputs = net.forward_with_stats(images)
    loss = images.new_zeros(())
    for h, bn in zip(inputs, net.bns, strict=True):
        assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
        flat = h.transpose(0, 1).reshape(h.shape[1], -1)
        loss = loss + (flat.mean(1) - bn.running_mean).norm() + (flat.var(1, unbiased=True) - bn.running_var).norm()
    return loss


def bn_prior_term(net: PriorCNN, weight: float = 0.1, name: str = "bn_prior") -> Term:
    """An engine :class:`~clipleak.engine.Term` with :func:`bn_statistics_loss` of the candidate images."""
    net.eval().requires_grad_(False)
    return Term(name=name, fn=lambda s: bn_statistics_loss(net, s.images), weight=weight)
