"""Objective pieces shared by attacks: image priors in pixel space and gradient distances."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..errors import ClipleakError


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of neighbouring pixels (Inverting Gradients)."""
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    return dx + dy


def cosine_gradient_distance(
    grads: list[torch.Tensor], targets: list[torch.Tensor]
) -> torch.Tensor:
    """``1 - <g, t> / (|g| |t|)`` over all parameters together (Geiping et al. 2020)."""
    return gradient_distance("cosine", targets)(grads)


def l2_gradient_distance(grads: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Squared Euclidean distance (DLG, Zhu et al. 2019)."""
    return gradient_distance("l2", targets)(grads)


def _dots(a: list[torch.Tensor] | tuple[torch.Tensor, ...], b: list[torch.Tensor] | tuple[torch.Tensor, ...]
          ) -> torch.Tensor:
    """``sum_i <a_i, b_i>``: one BLAS dot per tensor, the partial sums added in float64 (as accurate as
    cascaded sums of products, without a temporary of the gradient's size)."""
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]).double().sum()


class _CosineToTarget(torch.autograd.Function):
    """``1 - <g, t> / (|g| |t| + 1e-12)`` of the gradients ``g`` (a list of tensors) to fixed targets ``t``
    of norm ``tn``, with its gradient written out: ``a t_i + b g_i``, one temporary per tensor where
    autograd's chain through products, sums and the square root makes five (each as large as the
    whole gradient: most of a small ViT's attack step)."""

    @staticmethod
    def forward(ctx: Any, targets: list[torch.Tensor], tn: float, *grads: torch.Tensor) -> torch.Tensor:
        dot, gn = _dots(grads, targets), _dots(grads, grads).sqrt()
        ctx.save_for_backward(*grads)
        ctx.targets, ctx.tn, ctx.dot, ctx.gn = targets, tn, float(dot), float(gn)
        return (1 - dot / (gn * tn + 1e-12)).to(grads[0].dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        denom = ctx.gn * ctx.tn + 1e-12
        a = -float(grad) / denom  # d/dg = -t / denom + <g, t> tn g / (|g| denom^2)
        b = float(grad) * ctx.dot * ctx.tn / (max(ctx.gn, 1e-30) * denom * denom)
        return None, None, *(torch.mul(g, b).add_(t, alpha=a) for g, t in zip(ctx.saved_tensors, ctx.targets,
                                                                              strict=True))


class _SquaredDistanceToTarget(torch.autograd.Function):
    """``sum_i |g_i - t_i|^2`` to fixed targets, its gradient ``2 (g_i - t_i)`` written out."""

    @staticmethod
    def forward(ctx: Any, targets: list[torch.Tensor], *grads: torch.Tensor) -> torch.Tensor:
        diffs = [g - t for g, t in zip(grads, targets, strict=True)]
        ctx.save_for_backward(*diffs)
        return _dots(diffs, diffs).to(grads[0].dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, *(d * (2 * grad) for d in ctx.saved_tensors)


def gradient_distance(
    metric: str, targets: list[torch.Tensor]
) -> Callable[[list[torch.Tensor] | tuple[torch.Tensor, ...]], torch.Tensor]:
    """The ``cosine`` or ``l2`` distance to fixed ``targets`` as a function of the candidate's gradients.

    The targets (and, for cosine, their norm, in float64) are prepared once, here, not at every step;
    each call takes one dot product per tensor and has its gradient with respect to the candidate's
    gradients written out (once differentiable: the attacks need the distance's gradient, not its
    Hessian), instead of autograd's chain of full-size products and sums, which the attack's second
    backward would run at every step. Same values as the per-tensor sums up to float rounding.
    """
    fixed = [t.detach() for t in targets]
    if metric == "cosine":
        tn = float(_dots(fixed, fixed).sqrt())
        return lambda grads: _CosineToTarget.apply(fixed, tn, *grads)
    if metric == "l2":
        return lambda grads: _SquaredDistanceToTarget.apply(fixed, *grads)
    raise ClipleakError(f"unknown gradient distance {metric!r} (cosine, l2)")


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
