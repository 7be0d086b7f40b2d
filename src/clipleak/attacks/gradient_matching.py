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

from ..engine import Parametrization, Term, image_l2, optimise, patch_border_variation, switch_at
from ..errors import ClipleakError
from ..peft import Victim
from ..priors import PriorCNN, bn_prior_term, check_prior, load_prior
from ..records import Observation, ProgressFn, Reconstruction
from ..recover import recovered_features
from .common import (
    ImageSearchConfig,
    engine_config,
    gradient_matching_term,
    image_parametrization,
    resolve_labels,
    run_tag,
)
from .registry import register

LABEL_READS = ("joint", "analytic")


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


def objective(obs: Observation, victim: Victim, cfg: GradientMatchingConfig) -> tuple[Parametrization, list[Term]]:
    """The parametrisation and weighted, scheduled terms that ``cfg`` describes."""
    param, prior_terms = image_parametrization(cfg, obs, victim)
    grad = gradient_matching_term(victim, obs, metric=cfg.metric)
    if cfg.switch is not None:
        grad.schedule = switch_at(cfg.switch, 1.0, cfg.grad_after)
    extra: list[Term] = []
    if cfg.bn_prior:
        net = load_prior(cfg.bn_prior)
        check_prior(net, victim.clip_info.image_size, kind="cnn", data=obs.meta.get("data"))
        assert isinstance(net, PriorCNN)
        extra.append(bn_prior_term(net, cfg.bn_weight))
    if cfg.patch_weight > 0:
        p = _patch_size(victim)
        extra.append(Term("patch", lambda s: patch_border_variation(s.images, p), weight=cfg.patch_weight))
    if cfg.l2_weight > 0:
        extra.append(Term("l2", lambda s: image_l2(s.images), weight=cfg.l2_weight))
    if cfg.switch is not None:
        for t in extra:
            t.schedule = switch_at(cfg.switch, 0.0, 1.0)
    return param, [grad, *prior_terms, *extra]


def gradient_matching(obs: Observation, victim: Victim, cfg: GradientMatchingConfig,
                      progress: ProgressFn | None = None) -> Reconstruction:
    """Run the preset ``cfg`` describes on the engine; labels from the observation, jointly, or analytic."""
    label_mode, labels = resolve_labels(obs, cfg.labels)
    source = "observation"
    notes: list[str] = []
    if label_mode == "infer" and cfg.label_read == "analytic":
        est = recovered_features(obs, victim, labels="predicted")
        labels, label_mode, source = est.labels, "known", f"read off the update first ({est.label_source})"
        notes = est.notes
    elif label_mode == "infer":
        source = "inferred (joint soft labels)"
    param, terms = objective(obs, victim, cfg)
    pixels = cfg.prior in ("none", "tv")  # signed steps belong to pixel space; a latent search runs plain Adam
    ecfg = engine_config(cfg, label_mode, signed=cfg.signed and pixels,
                         decay=cfg.decay if pixels or not cfg.signed else "cosine", optimizer=cfg.optimizer)
    res = optimise(param, terms, ecfg, batch=obs.batch_size, num_classes=len(obs.classnames),
                   known_labels=labels, selection="gradient", progress=progress, checkpoint=cfg.checkpoint,
                   checkpoint_tag=run_tag(cfg, obs), task=f"attack {cfg.preset}")
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
