"""What an observation gives away before any image search: the image features and the labels."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import public_for_observation
from ..errors import ClipleakError
from ..peft import Victim
from ..records import Observation
from .adapter import adapter_features
from .bank import public_features
from .coop import CoopFit, coop_features
from .labels import predict_labels
from .vit import FULL_METHODS, projection_features


@dataclass
class FeatureEstimate:
    """Normalised image features ``(B, E)`` and labels ``(B,)`` recovered from one observation.

    ``separated`` counts the features that are single images' (the rest are mixtures the update did
    not let the attack separate); ``residual`` is the relative misfit of a fitted model (CoOp), 0 for
    an exact read-out (adapter).
    """

    features: torch.Tensor
    labels: torch.Tensor
    label_source: str
    separated: int
    residual: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What a report shows of the estimate (never the raw feature numbers)."""
        return {"images_separated": self.separated, "batch_size": int(self.features.shape[0]),
                "relative_residual": round(self.residual, 6), "label_source": self.label_source,
                "notes": list(self.notes)}


def recovered_features(obs: Observation, victim: Victim, *, use_shared_labels: bool = True) -> FeatureEstimate:
    """The image-feature estimate this observation allows, with labels and where they came from.

    adapter: exact, from the rank-one rows of the ``W1`` gradient; labels predicted from the
    feature. coop: features and labels fitted to the context gradient (:func:`coop_features`),
    started from the features of the observation's public split; full-visual / full: features and labels
    read off the visual-projection gradient (:func:`clipleak.recover.vit.projection_features`: exact at
    batch 1, a fit started from public images for a batch); fits are memoised per observation
    (its gradients, PEFT state, data split, target weights and the shared labels), so several attacks
    on one observation fit it once and different clients never share a fit.
    """
    shared = obs.labels.clone() if (use_shared_labels and obs.labels is not None) else None
    b = obs.batch_size
    if victim.cfg.method == "adapter":
        rec = adapter_features(obs, victim)
        notes = [] if rec.separated == b else [
            f"the adapter gradient separated {rec.separated} of {b} images; the other "
            f"{b - rec.separated} feature(s) are mixtures of the batch, not single images"]
        if shared is not None:
            return FeatureEstimate(rec.features, shared, "observation", rec.separated, notes=notes)
        return FeatureEstimate(rec.features, predict_labels(victim, rec.features),
                               "predicted from the recovered feature", rec.separated, notes=notes)
    if victim.cfg.method == "coop":
        key = _fit_key(obs, shared)
        if key not in _COOP_FITS:
            public = public_for_observation(obs.meta)[1]
            pf = public_features(victim.clip_info, public)
            fit = coop_features(obs, victim, pf, public.labels, labels=shared)
            if len(_COOP_FITS) >= 8:
                _COOP_FITS.pop(next(iter(_COOP_FITS)))
            _COOP_FITS[key] = fit
        fit = _COOP_FITS[key]
        source = "observation" if shared is not None else (
            "read off the context gradient" if b == 1 else "fitted to the context gradient")
        notes = [] if fit.determined >= 1 else [
            f"the context gradient determines {fit.determined:.0%} of the unknown feature numbers; a prior "
            "fitted to the public features fills the rest"]
        return FeatureEstimate(fit.features.clone(), fit.labels.clone(), source, b, residual=fit.residual,
                               notes=notes)
    if victim.cfg.method in FULL_METHODS:
        key = _fit_key(obs, shared)
        if key not in _PROJ_FITS:
            starts = public_for_observation(obs.meta)[1] if b > 1 else None
            rec_p = projection_features(obs, victim, labels=shared,
                                        public_images=None if starts is None else starts.images,
                                        public_labels=None if starts is None else starts.labels)
            if len(_PROJ_FITS) >= 8:
                _PROJ_FITS.pop(next(iter(_PROJ_FITS)))
            _PROJ_FITS[key] = (rec_p.features, rec_p.labels, rec_p.separated, rec_p.residual, rec_p.notes)
        feats, labels, separated, cost, notes = _PROJ_FITS[key]
        source = "observation" if shared is not None else "fitted to the visual-projection gradient"
        return FeatureEstimate(feats.clone(), labels.clone(), source, separated, residual=cost, notes=list(notes))
    raise ClipleakError(
        f"feature recovery is implemented for 'adapter', 'coop', 'full-visual' and 'full' observations; this one is "
        f"{victim.cfg.method!r} (use --attack ig)"
    )


def _fit_key(obs: Observation, shared: torch.Tensor | None) -> str:
    return json.dumps({"observation": obs.digest(), "data": obs.meta.get("data"),
                       "weights": obs.meta.get("weights_sha256"),
                       "labels": None if shared is None else shared.tolist()}, sort_keys=True)


_COOP_FITS: dict[str, CoopFit] = {}
_PROJ_FITS: dict[str, tuple[torch.Tensor, torch.Tensor, int, float, list[str]]] = {}
