"""Objective pieces shared by attacks: image priors in pixel space and gradient distances."""

from __future__ import annotations

from typing import cast

import torch


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of neighbouring pixels (Inverting Gradients)."""
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    return dx + dy


def cosine_gradient_distance(
    grads: list[torch.Tensor], targets: list[torch.Tensor]
) -> torch.Tensor:
    """``1 - <g, t> / (|g| |t|)`` over all parameters together (Geiping et al. 2020)."""
    # sum() of tensors is a tensor (its int start value 0 only remains for an empty list)
    dot = sum((g * t).sum() for g, t in zip(grads, targets, strict=True))
    gn = torch.sqrt(cast(torch.Tensor, sum(g.pow(2).sum() for g in grads)))
    tn = torch.sqrt(cast(torch.Tensor, sum(t.pow(2).sum() for t in targets)))
    return 1 - dot / (gn * tn + 1e-12)


def l2_gradient_distance(grads: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Squared Euclidean distance (DLG, Zhu et al. 2019)."""
    return cast(torch.Tensor, sum((g - t).pow(2).sum() for g, t in zip(grads, targets, strict=True)))


def patch_border_variation(images: torch.Tensor, patch: int) -> torch.Tensor:
    """TV across the borders of a ViT's ``patch`` x ``patch`` grid only (GradViT's patch prior): mean
    absolute difference of the pixel pairs that straddle a patch border, both directions."""
    size = images.shape[-1]
    if patch < 2 or patch >= size:
        return images.new_zeros(())
    cut = torch.arange(patch, size, patch, device=images.device)
    dx = (images[..., :, cut] - images[..., :, cut - 1]).abs().mean()
    dy = (images[..., cut, :] - images[..., cut - 1, :]).abs().mean()
    return dx + dy


def image_l2(images: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel value (the auxiliary l2 image prior of DeepInversion / GradViT)."""
    return images.pow(2).mean()
