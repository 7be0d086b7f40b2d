"""Analytic attacks on full fine-tuning gradients of a ViT: no image search, read-outs in closed form.

* ``closed-form`` (APRIL, Lu et al., CVPR 2022): the batch-1 image solved from the gradients of the
  positional embedding and the patch-embedding weight (:func:`clipleak.recover.closed_form_images`).
* ``projection``: the image features read off the rank-one-per-image gradient of ``visual.proj`` (exact at
  batch 1; a fit for a batch), with labels chosen to reproduce the gradient through the text features,
  then decoded with a feature decoder (``decoder``) and optionally refined like ``featmatch``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..errors import ClipleakError
from ..peft import Victim
from ..records import Observation, ProgressFn, Reconstruction
from ..recover import closed_form_images, projection_features
from ..recover.vit import FULL_METHODS
from .common import LABEL_MODES
from .featmatch import FeatMatchConfig, feature_matching
from .registry import register


@dataclass
class ClosedFormConfig:
    """Closed-form patch recovery (APRIL). ``labels``: ``auto`` (shared if the observation has them, else
    read off the visual-projection gradient), ``known`` or ``infer``."""

    labels: str = "auto"

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ClipleakError(f"labels must be one of {', '.join(LABEL_MODES)}, not {self.labels!r}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@register("closed-form", ClosedFormConfig, "APRIL (Lu et al., CVPR 2022): the batch-1 image solved in closed form "
          "from the positional-embedding and patch-embedding gradients of a full-visual/full observation; no "
          "settings besides labels (default auto)")
def closed_form(obs: Observation, victim: Victim, cfg: ClosedFormConfig,
                progress: ProgressFn | None = None) -> Reconstruction:
    """Least squares on the patch tokens, then the input normalisation undone; exact up to float error."""
    t0 = time.perf_counter()
    if cfg.labels == "known" and obs.labels is None:
        raise ClipleakError("the observation does not include labels; use --labels infer")
    sol = closed_form_images(obs, victim)
    if cfg.labels != "infer" and obs.labels is not None:
        labels, source = obs.labels.clone(), "observation"
    else:
        labels = projection_features(obs, victim).labels
        source = "read off the visual-projection gradient"
    return Reconstruction(
        images=sol.images.clamp(0, 1), labels=labels, label_source=source, attack="closed-form", history={},
        meta={"attack_config": cfg.to_dict(), "observation": obs.meta, "seconds": time.perf_counter() - t0,
              "seconds_per_iteration": 0.0,
              "closed_form": {"relative_residual": sol.residual, "rank": sol.rank, "patches": sol.patches}},
    )


@dataclass
class ProjectionConfig(FeatMatchConfig):
    """The visual-projection read-out: featmatch's settings, but by default the decoder's output only
    (``iterations=0``, ``restarts=1``); a ``decoder`` file (or name, e.g. tiny-mnist-decoder) is needed then."""

    iterations: int = 0
    restarts: int = 1
    prior: str = "none"


@register("projection", ProjectionConfig, "the image feature read off the rank-one-per-image gradient of visual.proj "
          "(full-visual/full; exact at batch 1, fitted for a batch; labels through the text features), decoded "
          "with --decoder; defaults: iterations 0 (decoder output), restarts 1")
def projection(obs: Observation, victim: Victim, cfg: ProjectionConfig,
               progress: ProgressFn | None = None) -> Reconstruction:
    if victim.cfg.method not in FULL_METHODS:
        raise ClipleakError(f"the projection read-out needs a full-visual or full observation, not "
                            f"{victim.cfg.method!r} (use featmatch)")
    if cfg.iterations == 0 and not cfg.decoder:
        raise ClipleakError("with iterations 0 the projection attack returns the decoder's output: give a "
                            "decoder (e.g. --decoder tiny-mnist-decoder)")
    rec = feature_matching(obs, victim, cfg, progress)
    rec.attack = "projection"
    return rec


__all__ = ["ClosedFormConfig", "ProjectionConfig", "closed_form", "projection"]
