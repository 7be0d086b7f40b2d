"""Inverting Gradients (Geiping et al., NeurIPS 2020) on any clipleak observation.

Objective: cosine distance between the candidate's gradient and the observed one, plus total
variation; Adam on *signed* gradients with step decay (x0.1 at 3/8, 5/8 and 7/8 of the run), images
boxed to [0, 1], several seeded restarts, keeping the one with the lowest gradient distance.
When the observation carries no labels they are optimised jointly as soft labels (DLG style).
With ``prior="generative:VAE"`` the same objective is searched in the VAE's latent space (GIAS style,
Adam with cosine decay) instead of pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import optimise
from ..peft import Victim
from ..records import Observation, ProgressFn, Reconstruction
from .common import (
    ImageSearchConfig,
    engine_config,
    gradient_matching_term,
    image_parametrization,
    resolve_labels,
    run_tag,
)
from .registry import register


@dataclass
class IGConfig(ImageSearchConfig):
    """Inverting Gradients: the image-search settings plus the gradient distance (``cosine`` or ``l2``)."""

    metric: str = "cosine"


@register("ig", IGConfig, "Inverting Gradients (Geiping et al. 2020): cosine gradient matching + TV, signed Adam")
def inverting_gradients(obs: Observation, victim: Victim, cfg: IGConfig,
                        progress: ProgressFn | None = None) -> Reconstruction:
    label_mode, labels = resolve_labels(obs, cfg.labels)
    param, prior_terms = image_parametrization(cfg, obs, victim)
    terms = [gradient_matching_term(victim, obs, metric=cfg.metric), *prior_terms]
    pixels = cfg.prior in ("none", "tv")  # signed steps + step decay in pixel space (Geiping et al.)
    ecfg = engine_config(cfg, label_mode, signed=pixels, decay="step" if pixels else "cosine")
    res = optimise(param, terms, ecfg, batch=obs.batch_size, num_classes=len(obs.classnames),
                   known_labels=labels, selection="gradient", progress=progress, checkpoint=cfg.checkpoint,
                   checkpoint_tag=run_tag(cfg, obs), task="attack ig")
    return Reconstruction(
        images=res.images,
        labels=res.labels,
        label_source="observation" if label_mode == "known" else "inferred (joint soft labels)",
        attack="ig",
        history=res.history,
        meta={
            "attack_config": cfg.to_dict(),
            "observation": obs.meta,
            "restart_losses": res.restart_losses,
            "best_restart": res.best_restart,
            "seconds": res.seconds,
            "seconds_per_iteration": res.seconds_per_iteration,
            **res.extra,
        },
    )
