"""What an observation gives away before any image search: the image features and the labels."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import public_for_observation
from ..errors import ClipleakError
from ..peft import Victim
from ..records import Observation
from .adapter import (
    SMOOTH_BETA,
    AdapterGradientModel,
    adapter_features,
    adapter_labels,
    adapter_target,
    fit_adapter_batch,
)
from .bank import public_features
from .coop import coop_features
from .coop_model import CoopGradientModel
from .coop_update import coop_update_features
from .defended import PUBLIC_STARTS, DefendedFit, defense_intervals, fit_defended
from .labels import predict_labels
from .noise import NOISE_MARGIN, floor_note, modelled_clip, noise_std, relative_noise_floor
from .solvers import whitening
from .vit import FULL_METHODS, projection_features


@dataclass
class FeatureEstimate:
    """Normalised image features ``(B, E)`` and labels ``(B,)`` recovered from one observation.

    ``separated`` counts the features that are single images' (the rest are mixtures the update did
    not let the attack separate); ``residual`` is the relative misfit of a fitted model (CoOp), 0 for
    an exact read-out (adapter). ``noise_floor``: the relative residual the observation's DP noise alone
    would leave (:mod:`clipleak.recover.noise`; 0 when undefended), the yardstick for ``residual``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    label_source: str
    separated: int
    residual: float = 0.0
    notes: list[str] = field(default_factory=list)
    noise_floor: float = 0.0

    def copy(self) -> FeatureEstimate:
        return FeatureEstimate(self.features.clone(), self.labels.clone(), self.label_source, self.separated,
                               self.residual, list(self.notes), self.noise_floor)

    def summary(self) -> dict[str, Any]:
        """What a report shows of the estimate (never the raw feature numbers)."""
        return {"images_separated": self.separated, "batch_size": int(self.features.shape[0]),
                "relative_residual": round(self.residual, 6), "label_source": self.label_source,
                "expected_noise_residual": round(self.noise_floor, 6) if self.noise_floor > 0 else None,
                "notes": list(self.notes)}


LABEL_MODES = ("auto", "known", "predicted", "feature")


def recovered_features(obs: Observation, victim: Victim, *, labels: str = "auto") -> FeatureEstimate:
    """The image-feature estimate this observation allows (MIP's inverse gradient estimation), with labels.

    ``labels``: ``known`` (the observation's shared labels; an error if it carries none), ``predicted``
    (read off the gradient before any image search: MIP's label prediction), ``feature`` (the victim's own
    zero-shot class of each recovered feature, which is not read off the update) or ``auto``
    (known when shared, else predicted).

    adapter: batch 1 exact, from the rank-one ``W1`` gradient; a batch is fitted to both weight gradients
    inside the span the ``W1`` gradient reveals (:func:`fit_adapter_batch`). coop: features and labels
    fitted to the context gradient (:func:`coop_features`). full-visual / full: read off the
    visual-projection gradient (:func:`clipleak.recover.vit.projection_features`). Fits are memoised per
    observation (its gradients, PEFT state, data split, target weights and the label mode), so several
    attacks on one observation fit it once and different clients never share a fit.

    The read-outs run where the victim is; their solvers work in float64, which Apple's MPS lacks, so for an
    MPS victim they run on a CPU copy of it, deliberately, and the estimate goes back to the MPS device.
    """
    if labels not in LABEL_MODES:
        raise ClipleakError(f"labels must be one of {', '.join(LABEL_MODES)}, not {labels!r}")
    if victim.device.type == "mps":
        cpu = torch.device("cpu")
        on_cpu = dataclasses.replace(obs, gradients={k: v.to(cpu) for k, v in obs.gradients.items()},
                                     peft_state={k: v.to(cpu) for k, v in obs.peft_state.items()},
                                     labels=None if obs.labels is None else obs.labels.to(cpu))
        est = recovered_features(on_cpu, copy.deepcopy(victim).to(cpu), labels=labels)
        est.features, est.labels = est.features.to(victim.device), est.labels.to(victim.device)
        return est
    if labels == "known" and obs.labels is None:
        raise ClipleakError("the observation carries no labels: use labels 'predicted' or 'feature'")
    mode = labels if labels != "auto" else ("known" if obs.labels is not None else "predicted")
    est = _recover(obs, victim, obs.labels.clone() if mode == "known" and obs.labels is not None else None)
    if mode == "feature":
        est.labels = predict_labels(victim, est.features)
        est.label_source = "zero-shot class of the recovered feature"
    return est


def _recover(obs: Observation, victim: Victim, shared: torch.Tensor | None) -> FeatureEstimate:
    key = _fit_key(obs, shared)
    if key not in _FITS:
        if len(_FITS) >= 8:
            _FITS.pop(next(iter(_FITS)))
        est = _fit(obs, victim, shared)
        _FITS[key] = _model_defense(obs, victim, shared, est)
    return _FITS[key].copy()


def _model_defense(obs: Observation, victim: Victim, shared: torch.Tensor | None,
                   est: FeatureEstimate) -> FeatureEstimate:
    """The estimate refitted to what a pruned or quantised update still says (:mod:`.defended`), from the
    read-out's estimate and from public features; ``est`` as it is for other observations (undefended,
    clipping only, DP noise, which the intervals do not model, a multi-step update, or no public data)."""
    names = list(victim.trainable())
    steps = int((obs.meta.get("from_update") or {}).get("local_steps", 1))
    if (victim.cfg.method not in ("adapter", "coop") or steps > 1 or noise_std(obs) is not None
            or not obs.meta.get("data")):
        return est
    intervals = defense_intervals(obs, names)
    if intervals is None:
        return est
    public = public_for_observation(obs.meta)[1]
    pub_feats, pub_labels = public_features(victim.clip_info, public), public.labels
    if shared is not None:  # shared labels: public starts of those labels only
        keep = torch.isin(pub_labels, shared)
        pub_feats, pub_labels = pub_feats[keep], pub_labels[keep]
    model: AdapterGradientModel | CoopGradientModel
    smooth: Callable[[bool], None] | None = None
    if victim.cfg.method == "adapter":
        model = adapter = AdapterGradientModel(victim, modelled_clip(obs))

        def softplus(on: bool) -> None:  # the ReLUs as softplus while a start is fitted smooth first
            adapter.smooth = SMOOTH_BETA if on else None
        smooth = softplus
    else:
        model = CoopGradientModel(victim)
    public_starts = PUBLIC_STARTS if shared is None or obs.batch_size == 1 else 0
    fit: DefendedFit = fit_defended(model.gradient, intervals, whitening(pub_feats), est.features,
                                    est.labels if shared is None else shared, pub_feats, pub_labels,
                                    smooth=smooth, public_starts=public_starts)
    spec = intervals.defense.spec
    note = (f"the fit models the defense ({spec}: {intervals.describe()}); relative distance to those intervals "
            f"{fit.residual:.1e}, from the {'read-out' if fit.start == 'read-out' else 'public features'}' start")
    source = est.label_source if shared is not None else f"fitted to the {spec} update's intervals"
    return FeatureEstimate(fit.features, fit.labels, source, est.separated, residual=fit.residual,
                           notes=[*est.notes, note], noise_floor=est.noise_floor)


def _fit(obs: Observation, victim: Victim, shared: torch.Tensor | None) -> FeatureEstimate:
    b = obs.batch_size
    if victim.cfg.method == "adapter":
        rec = adapter_features(obs, victim)
        clip = modelled_clip(obs)
        model = AdapterGradientModel(victim, clip)
        target = adapter_target(obs)
        floor = relative_noise_floor(obs, target.numel(), float(target.norm()))
        if b == 1:
            if shared is not None:
                labs, cost = shared, float((model.gradient(rec.features, shared) - target).norm() / target.norm())
            else:
                labs, cost = adapter_labels(model, rec.features, target, predict_labels(victim, rec.features))
            return FeatureEstimate(rec.features, labs, "observation" if shared is not None else
                                   "read off the adapter gradient", 1, residual=cost,
                                   notes=[floor_note(cost, floor, obs)] if floor > 0 else [], noise_floor=floor)
        if obs.meta.get("data"):
            public = public_for_observation(obs.meta)[1]
            pub_feats, pub_labels = public_features(victim.clip_info, public), public.labels
        else:  # no public data recorded: the clustered directions are the only starts
            pub_feats = rec.features
            pub_labels = predict_labels(victim, rec.features) if shared is None else shared
        feats, labs, cost = fit_adapter_batch(victim, obs, pub_feats, pub_labels, rec.features, labels=shared,
                                              floor=floor, clip=clip)
        done = cost < max(1e-3, NOISE_MARGIN * floor)
        notes = [] if done or floor > 0 else [
            f"the joint fit of the adapter gradient stopped at relative residual {cost:.1e}: some features "
            "may be mixtures of the batch's images rather than single images"]
        if floor > 0:
            notes.append(floor_note(cost, floor, obs))
        return FeatureEstimate(feats, labs, "observation" if shared is not None else "fitted to the adapter gradient",
                               b if done else rec.separated, residual=cost, notes=notes, noise_floor=floor)
    if victim.cfg.method == "coop":
        public = public_for_observation(obs.meta)[1]
        pub_feats = public_features(victim.clip_info, public)
        steps = int((obs.meta.get("from_update") or {}).get("local_steps", 1))
        if steps > 1:  # an E-step update: the exact replay of the client's steps (the first-order view fails)
            start = coop_features(obs, victim, pub_feats, public.labels, labels=shared) if b > 1 else None
            fit = coop_update_features(obs, victim, pub_feats, public.labels, labels=shared, start=start)
            source = "observation" if shared is not None else "fitted to the update by replaying its local steps"
        else:
            fit = coop_features(obs, victim, pub_feats, public.labels, labels=shared)
            source = "observation" if shared is not None else (
                "read off the context gradient" if b == 1 else "fitted to the context gradient")
        notes = [] if fit.determined >= 1 else [
            f"the context gradient determines {fit.determined:.0%} of the unknown feature numbers; a prior "
            "fitted to the public features fills the rest"]
        if fit.noise_floor > 0:
            notes.append(floor_note(fit.residual, fit.noise_floor, obs))
        return FeatureEstimate(fit.features, fit.labels, source, b, residual=fit.residual, notes=notes,
                               noise_floor=fit.noise_floor)
    if victim.cfg.method in FULL_METHODS:
        starts = public_for_observation(obs.meta)[1] if b > 1 else None
        rec_p = projection_features(obs, victim, labels=shared,
                                    public_images=None if starts is None else starts.images,
                                    public_labels=None if starts is None else starts.labels)
        source = "observation" if shared is not None else "fitted to the visual-projection gradient"
        return FeatureEstimate(rec_p.features, rec_p.labels, source, rec_p.separated, residual=rec_p.residual,
                               notes=list(rec_p.notes))
    raise ClipleakError(
        f"feature recovery is implemented for 'adapter', 'coop', 'full-visual' and 'full' observations; this one is "
        f"{victim.cfg.method!r} (use --attack ig)"
    )


def _fit_key(obs: Observation, shared: torch.Tensor | None) -> str:
    return json.dumps({"observation": obs.digest(), "data": obs.meta.get("data"),
                       "weights": obs.meta.get("weights_sha256"),
                       "labels": None if shared is None else shared.tolist()}, sort_keys=True)


_FITS: dict[str, FeatureEstimate] = {}
