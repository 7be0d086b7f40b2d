"""Gradient matching and its literature presets: recipes of small parts on the one engine, not new loops.

One attack function (:func:`gradient_matching`) assembles an objective from parts -- a gradient distance
(cosine or L2), image priors (total variation, GradViT's patch-border TV and l2, the BatchNorm-statistics
prior of a CNN trained on the public split, or a VAE's latent space), per-term weight schedules -- picks
the labels (observation, joint soft labels, or read analytically off the update first) and hands all of
it to :func:`clipleak.engine.optimise`. Each preset is a typed config with the source's defaults:

* ``dlg`` -- Deep Leakage from Gradients (Zhu et al., NeurIPS 2019): L2 gradient distance, free pixels,
  labels optimised jointly as soft labels, L-BFGS (lr 1, one evaluation per step, no line search).
* ``idlg`` -- iDLG (Zhao et al., 2020): DLG with the labels read analytically off the update first
  (for full fine-tuning through the text features, :mod:`clipleak.recover.vit`).
* ``ig`` -- Inverting Gradients (Geiping et al., NeurIPS 2020): cosine distance + TV, Adam on signed
  gradients, step decay, box constraint, restarts.
* ``gradvit`` -- GradViT (Hatamizadeh et al., CVPR 2022): gradient matching + the BN-statistics prior of
  ``tiny-mnist-cnn`` + patch-border TV + auxiliary TV / l2, Adam lr 0.1 with cosine decay, restarts, and
  the schedule of the unofficial reimplementation: the image prior off for the first half of the run,
  then on while the gradient term's weight halves. Labels analytic (GradInversion-style) when not shared.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..data import public_for_observation
from ..engine import Parametrization, Term, image_l2, optimise, patch_border_variation, switch_at
from ..errors import ClipleakError
from ..peft import Victim
from ..priors import PriorCNN, bn_prior_term, check_prior, decoder_images, load_prior
from ..records import Observation, ProgressFn, Reconstruction
from ..recover import public_features, recovered_features
from .common import (
    ImageSearchConfig,
    engine_config,
    gradient_matching_term,
    image_parametrization,
    load_decoder,
    resolve_labels,
    run_tag,
)
from .featmatch import feature_loss
from .registry import register

LABEL_READS = ("joint", "analytic")
STARTS = ("random", "prototype", "neighbours", "decoder")


@dataclass
class GradientMatchingConfig(ImageSearchConfig):
    """Gradient matching: image-search settings plus the parts a preset is made of.

    ``metric``: cosine | l2. ``optimizer``: adam | lbfgs; ``signed``: Adam on signed gradients;
    ``decay``: step | cosine | none. ``label_read``: when the labels are not shared, ``joint`` (soft labels
    optimised with the images) or ``analytic`` (read off the update first, then fixed). ``bn_prior``: a
    prior-CNN file (names such as ``tiny-mnist-cnn`` are resolved by the API), weighted ``bn_weight``;
    ``patch_weight``: TV across ViT patch borders; ``l2_weight``: mean squared pixel. ``switch``: the
    fraction of the run at which the image priors (BN, patch, l2) switch on and the gradient weight
    becomes ``grad_after`` (``None``: priors on from the start, gradient weight 1 throughout).
    ``start``: ``random`` (``init`` noise), ``prototype`` (the public split's mean image of each image's
    label, which needs the labels first: shared or ``label_read="analytic"``), ``neighbours`` (the mean of
    the ``start_k`` public images of that label whose features are nearest the feature read off the
    update) or ``decoder`` (the ``decoder`` file's image of that feature); restarts after the first start
    from it plus Gaussian noise of std ``start_noise``. ``feature_weight``: a per-image term
    ``1 - cos(f(x_i), f_i)`` to the image features read off the update (``recovered_features``: for full
    fine-tuning the rank-one visual-projection gradient), in the order of the labels read with them.
    ``combine``: ``best`` (the restart whose gradient distance ends lowest) or ``mean`` (the restarts'
    pixel-wise mean: GradViT keeps its restarts consistent; meaningful when they share a start).
    """

    preset: ClassVar[str] = "gradient matching"
    source: ClassVar[str] = ""
    metric: str = "cosine"
    optimizer: str = "adam"
    signed: bool = False
    decay: str = "cosine"
    label_read: str = "joint"
    bn_prior: str | None = None
    bn_weight: float = 0.0
    patch_weight: float = 0.0
    l2_weight: float = 0.0
    switch: float | None = None
    grad_after: float = 1.0
    start: str = "random"
    start_noise: float = 0.0
    start_k: int = 8
    decoder: str | None = None
    combine: str = "best"
    feature_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in ("cosine", "l2"):
            raise ClipleakError(f"unknown gradient distance {self.metric!r} (cosine, l2)")
        if self.label_read not in LABEL_READS:
            raise ClipleakError(f"label_read must be joint or analytic, not {self.label_read!r}")
        if self.switch is not None and not 0.0 <= self.switch <= 1.0:
            raise ClipleakError(f"switch must be a fraction of the run in [0, 1], got {self.switch}")
        if self.bn_weight > 0 and not self.bn_prior:
            raise ClipleakError("a BN prior weight needs a prior CNN (bn_prior, e.g. tiny-mnist-cnn)")
        if self.optimizer == "lbfgs" and self.signed:
            raise ClipleakError("L-BFGS needs the true gradient: signed=False")
        if self.start not in STARTS:
            raise ClipleakError(f"start must be one of {', '.join(STARTS)}, not {self.start!r}")
        if self.start != "random" and self.prior.startswith("generative:"):
            raise ClipleakError("a prototype start is a pixel start: use prior none or tv")
        if self.start == "decoder" and not self.decoder:
            raise ClipleakError("a decoder start needs a decoder file (decoder, e.g. tiny-mnist-decoder)")
        if self.start_k < 1:
            raise ClipleakError(f"start_k must be >= 1, got {self.start_k}")
        if self.start_noise < 0 or self.feature_weight < 0:
            raise ClipleakError("start_noise and feature_weight must be >= 0")

    @classmethod
    def describe(cls) -> str:
        """The preset's source and its defaults, for --help and `clipleak attacks`."""
        defaults = ", ".join(f"{f.name}={getattr(cls, f.name, None)!r}" for f in fields(cls)
                             if f.name not in ("checkpoint", "grayscale", "seed", "init"))
        return f"{cls.source}. Defaults: {defaults}"


@dataclass
class DLGConfig(GradientMatchingConfig):
    """DLG (Zhu et al., NeurIPS 2019): L2 gradient distance, free pixels, joint soft labels, L-BFGS lr 1."""

    preset: ClassVar[str] = "dlg"
    source: ClassVar[str] = "DLG, Zhu et al., NeurIPS 2019"
    metric: str = "l2"
    optimizer: str = "lbfgs"
    lr: float = 1.0
    decay: str = "none"
    prior: str = "none"
    restarts: int = 1
    iterations: int = 300
    label_read: str = "joint"


@dataclass
class IDLGConfig(DLGConfig):
    """iDLG (Zhao et al., 2020): DLG with the labels read off the update first."""

    preset: ClassVar[str] = "idlg"
    source: ClassVar[str] = "iDLG, Zhao et al., arXiv 2001.02610 (2020)"
    label_read: str = "analytic"


@dataclass
class IGConfig(GradientMatchingConfig):
    """Inverting Gradients: the image-search settings plus the gradient distance (``cosine`` or ``l2``)."""

    preset: ClassVar[str] = "ig"
    source: ClassVar[str] = "Inverting Gradients, Geiping et al., NeurIPS 2020"
    signed: bool = True
    decay: str = "step"


@dataclass
class GradViTConfig(GradientMatchingConfig):
    """GradViT (Hatamizadeh et al., CVPR 2022) with the unofficial reimplementation's weights.

    Deviations, said plainly: the gradient distance is cosine (scale-free, so the prior weights mean the
    same on any target), restarts are kept best-by-gradient (no cross-restart registration loss), and
    the prior network is ``tiny-mnist-cnn`` (trained on the public MNIST split), not an ImageNet ResNet.
    """

    preset: ClassVar[str] = "gradvit"
    source: ClassVar[str] = ("GradViT, Hatamizadeh et al., CVPR 2022 (arXiv 2203.11894); weights of the "
                             "unofficial reimplementation")
    lr: float = 0.1
    restarts: int = 2
    prior: str = "tv"
    tv_weight: float = 1e-4
    l2_weight: float = 1e-4
    patch_weight: float = 1e-4
    bn_prior: str | None = "tiny-mnist-cnn"
    bn_weight: float = 0.1
    switch: float | None = 0.5
    grad_after: float = 0.5
    label_read: str = "analytic"


def _patch_size(victim: Victim) -> int:
    conv = getattr(victim.clip.visual, "conv1", None)
    ks = getattr(conv, "kernel_size", None)
    return int(ks[0]) if ks else 0


def objective(obs: Observation, victim: Victim, cfg: GradientMatchingConfig,
              start_images: torch.Tensor | None = None,
              features: torch.Tensor | None = None) -> tuple[Parametrization, list[Term]]:
    """The parametrisation and weighted, scheduled terms that ``cfg`` describes.

    ``start_images``: the pixels the restarts start from; ``features``: the per-image feature targets of
    the ``feature`` term (needed when ``cfg.feature_weight > 0``).
    """
    param, prior_terms = image_parametrization(cfg, obs, victim, start_images=start_images,
                                               start_noise=cfg.start_noise)
    grad = gradient_matching_term(victim, obs, metric=cfg.metric)
    if cfg.switch is not None:
        grad.schedule = switch_at(cfg.switch, 1.0, cfg.grad_after)
    extra: list[Term] = []
    if cfg.bn_prior:
        net = load_prior(cfg.bn_prior)
        check_prior(net, victim.clip_info.image_size, kind="cnn", data=obs.meta.get("data"))
        assert isinstance(net, PriorCNN)
        net.to(victim.device)
        extra.append(bn_prior_term(net, cfg.bn_weight))
    if cfg.patch_weight > 0:
        p = _patch_size(victim)
        extra.append(Term("patch", lambda s: patch_border_variation(s.images, p), weight=cfg.patch_weight))
    if cfg.l2_weight > 0:
        extra.append(Term("l2", lambda s: image_l2(s.images), weight=cfg.l2_weight))
    if cfg.switch is not None:
        for t in extra:
            t.schedule = switch_at(cfg.switch, 0.0, 1.0)
    if cfg.feature_weight > 0:  # on from the start: the read-out is exact, not a prior
        if features is None:
            raise ClipleakError("a feature term needs the features read off the update")
        target = features.detach()
        extra.append(Term("feature", lambda s: feature_loss(victim, s.images, target), weight=cfg.feature_weight))
    return param, [grad, *prior_terms, *extra]


def start_images(obs: Observation, victim: Victim, cfg: GradientMatchingConfig, labels: torch.Tensor,
                 features: torch.Tensor | None) -> torch.Tensor:
    """The pixels ``cfg.start`` asks for, ``(B, 3, H, W)``, from public knowledge and the read-out only.

    ``prototype``: the public mean image of each label; ``neighbours``: the mean of the ``start_k`` public
    images of that label nearest (cosine) to the recovered feature; ``decoder``: the decoder's image.
    """
    if cfg.start == "decoder":
        assert features is not None
        dec = load_decoder(cfg.decoder, obs, victim)
        assert dec is not None
        return decoder_images(dec, features)
    _, public = public_for_observation(obs.meta)
    size = victim.clip_info.image_size
    if public.images.shape[-1] != size:
        raise ClipleakError(f"public images are {public.images.shape[-1]} px, the target takes {size}")
    if cfg.start == "prototype":
        return public.prototypes()[labels.long().cpu()]
    assert features is not None
    out = []
    for b in range(labels.shape[0]):
        pool = torch.nonzero(public.labels == int(labels[b])).flatten()
        bank = public_features(victim.clip_info, public, pool)
        sims = F.normalize(features[b:b + 1].float(), dim=-1) @ bank.t()
        top = sims.flatten().topk(min(cfg.start_k, pool.numel())).indices
        out.append(public.images[pool[top.cpu()]].float().mean(0))
    return torch.stack(out)


def gradient_matching(obs: Observation, victim: Victim, cfg: GradientMatchingConfig,
                      progress: ProgressFn | None = None) -> Reconstruction:
    """Run the preset ``cfg`` describes on the engine; labels from the observation, jointly, or analytic."""
    label_mode, labels = resolve_labels(obs, cfg.labels)
    source = "observation"
    notes: list[str] = []
    features = None
    if label_mode == "infer" and cfg.label_read == "analytic":
        est = recovered_features(obs, victim, labels="predicted")
        labels, label_mode, source = est.labels, "known", f"read off the update first ({est.label_source})"
        notes, features = est.notes, est.features
    elif label_mode == "infer":
        source = "inferred (joint soft labels)"
    if cfg.feature_weight > 0 and features is None:
        if label_mode != "known":
            raise ClipleakError("a feature term needs the labels first: label_read='analytic' or shared labels")
        est = recovered_features(obs, victim, labels="known")
        features, notes = est.features, est.notes
    starts = None
    if cfg.start != "random":
        if label_mode != "known" or labels is None:
            raise ClipleakError(f"a {cfg.start} start needs the labels first: label_read='analytic' or shared labels")
        if cfg.start in ("neighbours", "decoder") and features is None:
            est = recovered_features(obs, victim, labels="known" if obs.labels is not None else "predicted")
            features = est.features
        starts = start_images(obs, victim, cfg, labels, features)
    if cfg.iterations == 0:  # the start itself is the reconstruction (what the search starts from)
        if starts is None or labels is None:
            raise ClipleakError("iterations=0 needs a start other than random (prototype, neighbours, decoder)")
        return Reconstruction(
            images=starts.clamp(0, 1), labels=labels.clone(), label_source=source, attack=cfg.preset, history={},
            meta={"attack_config": {**cfg.to_dict(), "preset": cfg.preset, "source": cfg.source},
                  "observation": obs.meta, "seconds": 0.0, "seconds_per_iteration": 0.0,
                  "parametrization": {"kind": f"{cfg.start} start only"}, "label_notes": notes})
    param, terms = objective(obs, victim, cfg, start_images=starts, features=features)
    pixels = cfg.prior in ("none", "tv")  # signed steps belong to pixel space; a latent search runs plain Adam
    ecfg = engine_config(cfg, label_mode, signed=cfg.signed and pixels,
                         decay=cfg.decay if pixels or not cfg.signed else "cosine", optimizer=cfg.optimizer,
                         combine=cfg.combine)
    res = optimise(param, terms, ecfg, batch=obs.batch_size, num_classes=len(obs.classnames),
                   known_labels=labels, selection="gradient", progress=progress, checkpoint=cfg.checkpoint,
                   checkpoint_tag=run_tag(cfg, obs), task=f"attack {cfg.preset}",
                   device=victim.device)
    schedule = {t.name: {"weight": t.weight,
                         "switch_iteration": None if cfg.switch is None else _switch_iteration(cfg),
                         # the weight multipliers either side of the switch (the report labels the switch)
                         "before": t.schedule(0, cfg.iterations),
                         "after": t.schedule(cfg.iterations, cfg.iterations)}
                for t in terms}
    return Reconstruction(
        images=res.images, labels=res.labels, label_source=source, attack=cfg.preset, history=res.history,
        meta={"attack_config": {**cfg.to_dict(), "preset": cfg.preset, "source": cfg.source},
              "observation": obs.meta, "restart_losses": res.restart_losses, "best_restart": res.best_restart,
              "seconds": res.seconds, "seconds_per_iteration": res.seconds_per_iteration,
              "schedule": schedule, "label_notes": notes, **res.extra},
    )


def _switch_iteration(cfg: GradientMatchingConfig) -> int:
    """The first iteration at which :func:`switch_at` gives the 'after' weights."""
    assert cfg.switch is not None
    return next((it for it in range(cfg.iterations) if it >= cfg.switch * cfg.iterations), cfg.iterations)


PRESETS: dict[str, type[GradientMatchingConfig]] = {"dlg": DLGConfig, "idlg": IDLGConfig, "ig": IGConfig,
                                                    "gradvit": GradViTConfig}
for _name, _cls in PRESETS.items():
    register(_name, _cls, _cls.describe())(gradient_matching)
