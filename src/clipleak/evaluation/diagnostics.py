"""Attacker-side diagnostics and retrieval baselines computed from public data only.

* :func:`same_class_gradient_cosine` -- does the shared update depend on the image at all? The mean
  cosine between the updates of different public images of the same class. Near 1 (a random-init
  CLIP gives about 0.995) means any "reconstruction" can only be the class, never the client's image.
* :func:`public_nearest_neighbour` -- what retrieval alone gives an attacker: the public image whose
  target feature is nearest (cosine) to a feature estimate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..peft import Victim
from ..recover import public_features

LEAKAGE_WARNING_COSINE = 0.95


def same_class_gradient_cosine(
    victim: Victim, public: ImageSet, *, classes: int = 5, pairs: int = 2, seed: int = 0
) -> float:
    """Mean cosine between batch-1 updates of two different public images of the same class."""
    g = torch.Generator().manual_seed(seed)
    ks = torch.randperm(public.n_classes, generator=g)[:classes].tolist()
    sims: list[float] = []
    for k in ks:
        idx = torch.nonzero(public.labels == k).flatten()
        if idx.numel() < 2:
            continue
        for _ in range(pairs):
            i, j = idx[torch.randperm(idx.numel(), generator=g)[:2]].tolist()
            y = torch.tensor([k], device=victim.device)
            gi = victim.gradient(public.images[i:i + 1], y)
            gj = victim.gradient(public.images[j:j + 1], y)
            a = torch.cat([t.reshape(-1) for t in gi.values()])
            b = torch.cat([t.reshape(-1) for t in gj.values()])
            sims.append(float(F.cosine_similarity(a, b, dim=0)))
    return float(sum(sims) / len(sims)) if sims else float("nan")


@torch.no_grad()
def public_nearest_neighbour(
    victim: Victim, public: ImageSet, features: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public images nearest (cosine) to ``features`` ``(B, E)``; returns ``(images, indices)``.

    With ``labels`` (the attacker's shared or inferred labels) the search stays within each image's
    class, as an attacker who knows the label would do (and 10x cheaper on 10 classes).
    """
    idx = []
    for b in range(features.shape[0]):
        pool = torch.arange(len(public)) if labels is None else torch.nonzero(public.labels == labels[b]).flatten()
        if pool.numel() == 0:
            pool = torch.arange(len(public))
        bank = public_features(victim.clip_info, public, pool)
        j = int((F.normalize(features[b:b + 1].float().to(bank.device), dim=-1) @ bank.t()).argmax())
        idx.append(int(pool[j]))
    t = torch.tensor(idx)
    return public.images[t], t
