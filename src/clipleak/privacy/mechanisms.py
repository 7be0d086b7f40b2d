"""Clipping and Gaussian noise on gradient dictionaries: DP-SGD (per example) and Dp-CLIP (per batch).

A gradient is a ``dict`` name -> tensor over the victim's trainable parameters (what a client shares);
per-example gradients carry a leading batch dimension ``(B, *shape)``.

Clipping, named:

* ``flat`` -- the global L2 norm over all trainable tensors together is clipped to C.
* ``per-tensor`` -- each of the T tensors is clipped separately, to C / sqrt(T), so that the global norm
  stays <= C and the same accounting holds (Opacus's per-layer clipping with equal thresholds).
  Dp-CLIP's public code clips every tensor to C itself: that is this mode with C' = C sqrt(T), whose
  global sensitivity is C sqrt(T), not C.

The clip factor is ``min(1, C / (norm + 1e-6))`` (Opacus's), so a clipped norm is always below C and a
gradient already inside the ball is multiplied by exactly 1.
"""

from __future__ import annotations

import math

import torch

from ..errors import ClipleakError

Grads = dict[str, torch.Tensor]
CLIPPINGS: tuple[str, ...] = ("flat", "per-tensor")
_EPS = 1e-6


def _check(clip: float, noise_multiplier: float, clipping: str) -> None:
    if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
        raise ClipleakError(f"the clipping norm C must be a finite number > 0, got {clip!r}")
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ClipleakError(f"the noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if clipping not in CLIPPINGS:
        raise ClipleakError(f"unknown clipping {clipping!r}; choose one of {', '.join(CLIPPINGS)}")


def global_norm(grads: Grads, batched: bool = False) -> torch.Tensor:
    """L2 norm over all tensors: a scalar, or ``(B,)`` per example when ``batched``."""
    if not grads:
        raise ClipleakError("no gradients to clip")
    if batched:
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()]), dim=0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))


def _factor(norm: torch.Tensor, bound: float) -> torch.Tensor:
    return (bound / (norm + _EPS)).clamp(max=1.0)


def clip_factors(grads: Grads, clip: float, clipping: str = "flat") -> dict[str, float]:
    """The factor each tensor of one gradient is multiplied by to clip it to norm C."""
    _check(clip, 0.0, clipping)
    if clipping == "flat":
        f = float(_factor(global_norm(grads), clip))
        return dict.fromkeys(grads, f)
    bound = clip / math.sqrt(len(grads))
    return {k: float(_factor(torch.linalg.vector_norm(g), bound)) for k, g in grads.items()}


def clip_gradient(grads: Grads, clip: float, clipping: str = "flat") -> Grads:
    """One gradient clipped to norm C (``flat``: global norm; ``per-tensor``: each tensor to C / sqrt(T))."""
    f = clip_factors(grads, clip, clipping)
    return {k: g * f[k] for k, g in grads.items()}


def per_example_factors(per_example: Grads, clip: float, clipping: str = "flat") -> dict[str, torch.Tensor]:
    """Per tensor, the ``(B,)`` factors that clip each example's gradient to norm C."""
    _check(clip, 0.0, clipping)
    if clipping == "flat":
        f = _factor(global_norm(per_example, batched=True), clip)
        return dict.fromkeys(per_example, f)
    bound = clip / math.sqrt(len(per_example))
    return {k: _factor(torch.linalg.vector_norm(g.flatten(1), dim=1), bound) for k, g in per_example.items()}


def clip_per_example(per_example: Grads, clip: float, clipping: str = "flat") -> Grads:
    """Per-example gradients ``(B, *shape)`` each clipped to norm C; same shapes."""
    f = per_example_factors(per_example, clip, clipping)
    return {k: g * f[k].view(-1, *([1] * (g.dim() - 1))) for k, g in per_example.items()}


def gaussian_noise(like: Grads, std: float, generator: torch.Generator) -> Grads:
    """Independent N(0, std^2) per coordinate, shaped like ``like``, drawn in ``like``'s key order on the
    generator's device (a seeded CUDA generator draws there) and returned on ``like``'s."""
    return {k: torch.empty(g.shape, dtype=g.dtype, device=generator.device).normal_(0.0, std, generator=generator)
            .to(g.device) for k, g in like.items()}


def _add_noise(base: Grads, std: float, generator: torch.Generator) -> Grads:
    """``base`` + N(0, std^2) per coordinate, in place of freshly drawn noise (one pass, no extra copy)."""
    if std == 0:
        return base
    noise = gaussian_noise(base, std, generator)
    return {k: noise[k].add_(b) for k, b in base.items()}


def dp_sgd(per_example: Grads, clip: float, noise_multiplier: float, generator: torch.Generator,
           clipping: str = "flat") -> Grads:
    """DP-SGD's noisy mean gradient: ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / B``.

    Normalised by the batch size B of ``per_example`` (the drawn batch; Opacus divides by the expected
    batch size q N, which is the same number for a fixed-size batch). The sensitivity of the sum to one
    example is C, so ``noise_multiplier`` is the accountant's sigma.
    """
    _check(clip, noise_multiplier, clipping)
    f = per_example_factors(per_example, clip, clipping)
    b = next(iter(per_example.values())).shape[0]
    # sum_i f_i g_i as one contraction (no clipped copy of the per-example gradients)
    summed = {k: torch.tensordot(f[k], g, dims=1) for k, g in per_example.items()}
    return {k: v.div_(b) for k, v in _add_noise(summed, noise_multiplier * clip, generator).items()}


def dp_clip(batch_gradient: Grads, clip: float, noise_multiplier: float, generator: torch.Generator,
            clipping: str = "flat") -> Grads:
    """Dp-CLIP's per-batch mechanism: the batch gradient clipped to C, plus N(0, (sigma C)^2 I).

    For losses that do not split into per-example terms (CLIP's contrastive loss). No division: the
    batch is clipped as one unit. Changing one example can move the clipped gradient anywhere in the
    ball of radius C, so the sensitivity is 2C (see :class:`~clipleak.privacy.DpSetting`).
    """
    _check(clip, noise_multiplier, clipping)
    f = clip_factors(batch_gradient, clip, clipping)
    std = noise_multiplier * clip
    if std == 0:
        return {k: g * f[k] for k, g in batch_gradient.items()}
    noise = gaussian_noise(batch_gradient, std, generator)
    return {k: noise[k].add_(g, alpha=f[k]) for k, g in batch_gradient.items()}
