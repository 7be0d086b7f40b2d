"""CLIP-Adapter: image features read off the first layer's gradient.

``A(f) = ReLU(ReLU(f W1) W2)`` acts on the image feature ``f``; the gradient of ``W1`` (stored
``(hidden, E)``) is ``sum_i delta_i f_i^T``: each row is a combination of the batch's features, and
for one image it is exactly rank one, its right singular vector the feature direction (``A`` is
positively homogeneous, so the direction is all the classifier uses). For a batch, hidden units active
for only one image give rows parallel to that image's feature: clustering the row directions
separates the batch. The sign comes from the ReLU: a unit with a non-zero gradient row was active,
i.e. ``(W1 f)_j > 0``.

Distinct images must give distinct features. A cluster whose direction repeats (or negates) one
already found is not a new image; when fewer than ``B`` clusters are separated, the remaining slots
are filled with the leading directions of what the separated features do not explain, and the
result says how many were separated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..peft import Victim
from ..records import Observation

ROW_COSINE = 0.999
"""Gradient rows this parallel belong to one image."""
DISTINCT_COSINE = 0.99
"""Two recovered directions closer than this (in absolute cosine) are the same image."""


@dataclass
class AdapterFeatures:
    """Recovered normalised features ``(B, E)``; the first ``separated`` are single images' features,
    the rest estimates from the unexplained part of the gradient (mixtures)."""

    features: torch.Tensor
    separated: int


def adapter_features(obs: Observation, victim: Victim, tol: float = ROW_COSINE,
                     distinct: float = DISTINCT_COSINE) -> AdapterFeatures:
    """Normalised image features recovered from a CLIP-Adapter gradient, one per image, never a
    duplicate or negated direction."""
    if victim.cfg.method != "adapter" or "adapter.fc1.weight" not in obs.gradients or victim.adapter is None:
        raise ClipleakError("feature recovery from the gradient needs an 'adapter' observation")
    g = obs.gradients["adapter.fc1.weight"].double()  # (hidden, E)
    w1 = victim.adapter.fc1.weight.detach().double()
    b = obs.batch_size
    norms = g.norm(dim=1)
    live = norms > 1e-8 * norms.max().clamp_min(1e-30)
    if not bool(live.any()):
        raise ClipleakError("the adapter gradient is zero: no feature can be read off it")
    rows = g[live] / norms[live, None]
    live_idx = torch.nonzero(live).flatten()
    if b == 1:
        _, _, vh = torch.linalg.svd(g, full_matrices=False)
        return AdapterFeatures(F.normalize(_orient(vh[0], w1, live_idx)[None].float(), dim=-1), 1)
    feats: list[torch.Tensor] = []
    remaining = torch.ones(rows.shape[0], dtype=torch.bool)
    cos = (rows @ rows.t()).abs()
    while len(feats) < b and bool(remaining.any()):
        adj = (cos > tol) & remaining[None, :] & remaining[:, None]
        j = int(adj.sum(1).argmax())
        members = torch.nonzero(adj[j]).flatten()
        _, _, vh = torch.linalg.svd(rows[members], full_matrices=False)
        v = _orient(vh[0], w1, live_idx[members])
        remaining[members] = False
        if all(abs(float(v @ f)) < distinct for f in feats):
            feats.append(v)
    separated = len(feats)
    if separated < b:
        # what the separated features do not explain: rows projected off their span
        basis = torch.linalg.qr(torch.stack(feats).t())[0] if feats else torch.zeros(g.shape[1], 0, dtype=g.dtype)
        resid = g - (g @ basis) @ basis.t()
        _, _, vh = torch.linalg.svd(resid, full_matrices=False)
        for v in vh:
            if len(feats) == b:
                break
            v = _orient(v, w1, live_idx)
            if all(abs(float(v @ f)) < distinct for f in feats):
                feats.append(v)
    return AdapterFeatures(F.normalize(torch.stack(feats).float(), dim=-1), separated)


def _orient(v: torch.Tensor, w1: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Pick the sign of ``v`` for which the units with a gradient are active (``W1 v > 0``)."""
    s = (w1[active] @ v).sum()
    return v if s >= 0 else -v
