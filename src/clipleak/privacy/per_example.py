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
``coop`` the text features are computed once (unbatched) but each example's cotangent must be carried
back through the text encoder: B backward passes of the text tower instead of one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import ClipleakError
from ..models import math_attention
from ..peft import Victim

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
