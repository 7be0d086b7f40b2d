"""Per-example gradients of the victim's PEFT parameters with ``torch.func``.

Why not Opacus's hooks: Opacus computes per-sample gradients from module hooks that see each layer's
batched input and output, and its validator rejects trainable modules holding buffers. A CoOp prompt
learner's ``forward()`` takes no batch input at all (its context vectors are shared by every image, the
batch dimension only appears after the text features meet the image features), and it holds buffers
(token prefix / suffix, pool indices). ``torch.func`` handles both: ``vmap(grad(loss_i))`` over a
``functional_call`` of the victim with only the PEFT parameters swapped in.

Cost: the frozen image encoder runs once, batched and without a graph (its output does not depend on
the PEFT parameters); ``vmap`` runs only the PEFT head per example. For ``adapter`` the head is a small
MLP and a cosine classifier, so per-example gradients cost little more than the plain gradient; for
``coop`` the text features are computed once (unbatched: ``vmap`` runs the unbatched text forward a
single time) but each example's cotangent must be carried back through the text encoder: B backward
passes of the text tower instead of one. That is the FLOP floor of exact per-example gradients of the
prompt (their norms need B vector-Jacobian products, as B < the K x E text-feature gradient and the
prompt's size), and this implementation runs at it (docs/privacy.md: 4.8x the plain step's FLOPs at
B = 32 on tiny-32). :func:`coop_text_feature_dp` is the one-backward alternative: clip and noise the
per-example gradients of the text features, then map the noisy sum to the prompt (post-processing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import ClipleakError
from ..models import math_attention
from ..peft import Victim
from .mechanisms import gaussian_noise, per_example_factors

PER_EXAMPLE_METHODS: tuple[str, ...] = ("coop", "adapter")


class _Head(nn.Module):
    """The victim from the frozen image-encoder output to the logits (for ``functional_call``)."""

    def __init__(self, victim: Victim):
        super().__init__()
        self.victim = victim

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.victim.logits_from_raw(raw)


def per_example_gradients(victim: Victim, images01: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Gradients of each example's cross-entropy w.r.t. the trainable PEFT parameters.

    Returns name -> ``(B, *param.shape)``; their mean over the batch is :meth:`Victim.gradient`.
    ``chunk_size`` bounds how many examples ``vmap`` processes at once (memory), default all.
    Only ``coop`` and ``adapter`` (the image encoder must be frozen); labels are class indices ``(B,)``.
    """
    method = victim.cfg.method
    if method not in PER_EXAMPLE_METHODS:
        raise ClipleakError(
            f"per-example gradients are implemented for {' and '.join(PER_EXAMPLE_METHODS)} (a frozen image "
            f"encoder), not {method!r}; use the per-batch mechanism")
    if labels.dim() != 1 or labels.shape[0] != images01.shape[0]:
        raise ClipleakError("per-example gradients need one class index per image")
    with torch.no_grad():
        raw = victim.raw_image_features(images01)
    return per_example_gradients_from_raw(victim, raw, labels, chunk_size)


def per_example_gradients_from_raw(victim: Victim, raw: torch.Tensor, labels: torch.Tensor,
                                   chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`per_example_gradients` from the frozen encoder's output ``raw``
    (:meth:`Victim.raw_image_features`): training loops encode their images once and reuse it."""
    if victim.cfg.method not in PER_EXAMPLE_METHODS:
        raise ClipleakError(f"per-example gradients are implemented for {' and '.join(PER_EXAMPLE_METHODS)}, "
                            f"not {victim.cfg.method!r}")
    if labels.dim() != 1 or labels.shape[0] != raw.shape[0]:
        raise ClipleakError("per-example gradients need one class index per image")
    head = _Head(victim)
    params = {"victim." + n: p.detach() for n, p in victim.trainable().items()}

    def loss_one(p: dict[str, torch.Tensor], r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, p, (r.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    # math attention: vmap has batching rules for it (not for the fused CPU attention backward)
    with math_attention():
        per = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, raw, labels)
    return {n[len("victim."):]: g.detach() for n, g in per.items()}


def text_feature_gradients(victim: Victim, images01: torch.Tensor, labels: torch.Tensor,
                           text: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example gradients of the cross-entropy w.r.t. the normalised class text features ``T`` (K, E):
    ``(B, K, E)``, ``dL_i/dT = s (p_i - y_i) fn_i^T`` (s the logit scale, fn_i the normalised image
    feature). Needs no backward pass through the text encoder (``coop`` only); ``text``: ``T`` if the
    caller has it already."""
    if labels.dim() != 1 or labels.shape[0] != images01.shape[0]:
        raise ClipleakError("per-example gradients need one class index per image")
    with torch.no_grad():
        raw = victim.raw_image_features(images01)
    return text_feature_gradients_from_raw(victim, raw, labels, text=text)


def text_feature_gradients_from_raw(victim: Victim, raw: torch.Tensor, labels: torch.Tensor,
                                    text: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`text_feature_gradients` from the frozen encoder's output ``raw``
    (:meth:`Victim.raw_image_features`): training loops encode their images once and reuse it."""
    if victim.cfg.method != "coop":
        raise ClipleakError(f"text-feature gradients are defined for coop (its parameters act on the text side "
                            f"only), not {victim.cfg.method!r}")
    if labels.dim() != 1 or labels.shape[0] != raw.shape[0]:
        raise ClipleakError("per-example gradients need one class index per image")
    with torch.no_grad():
        fn = victim.features_from_raw(raw)
        t = victim.text_features() if text is None else text.detach()
        scale = victim.logit_scale()
        p = torch.softmax(scale * fn @ t.t(), dim=-1)
        a = scale * (p - F.one_hot(labels, p.shape[-1]).to(p.dtype))
    return a.unsqueeze(-1) * fn.unsqueeze(1)


def clipped_sum(per: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i clip_C(per_i)`` over the first dimension (each example's flat L2 / Frobenius norm clipped to
    C by :func:`~clipleak.privacy.per_example_factors`), and the clip factors ``(B,)``."""
    f = per_example_factors({"g": per}, clip)["g"]
    return torch.tensordot(f, per, dims=1), f


def coop_text_feature_dp(victim: Victim, images01: torch.Tensor, labels: torch.Tensor, clip: float,
                         noise_multiplier: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DP-SGD for CoOp with clipping and noise at the text features (the ``text-features`` site).

    The per-example gradients ``G_i = dL_i/dT`` of the K x E text features are clipped to Frobenius norm
    C, summed, noised with N(0, (sigma C)^2) per text-feature coordinate, divided by the batch size B,
    and mapped to the prompt by ONE vector-Jacobian product of the text encoder:
    ``g = J^T (sum_i clip_C(G_i) + n) / B`` with ``J = dT/dctx``. The noisy sum is the Gaussian
    mechanism with sensitivity C (add/remove one example), so the accountant's sigma is the same as
    DP-SGD's; ``J`` depends only on the current prompt (the public model state), so the map is
    post-processing and the shared prompt gradient has the same (epsilon, delta). Cost: one text
    forward and one text backward (the plain gradient's), instead of B backward passes.

    It is not DP-SGD on the prompt: C bounds ``||dL_i/dT||``, not ``||dL_i/dctx||``, and the noise in
    the prompt gradient is ``J^T n / B`` (correlated, in the range of J^T), not i.i.d.
    """
    if not (math.isfinite(clip) and clip > 0) or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ClipleakError("the clipping norm must be > 0 and the noise multiplier >= 0")
    params = victim.trainable()
    t = victim.text_features()  # the one text forward, kept for the one backward
    g = text_feature_gradients(victim, images01, labels, text=t)
    summed, _ = clipped_sum(g, clip)
    if noise_multiplier > 0:
        summed = gaussian_noise({"t": summed}, noise_multiplier * clip, generator)["t"].add_(summed)
    grads = torch.autograd.grad(t, list(params.values()), grad_outputs=summed / g.shape[0])
    return {n: gr.detach() for n, gr in zip(params, grads, strict=True)}
