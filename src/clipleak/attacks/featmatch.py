"""Feature matching: read the image features (and labels) off the update, then find images with them.

The features come from :mod:`clipleak.recover` (exact for the adapter, fitted for CoOp). A
feature-to-image ``decoder`` turns them into images directly (``iterations=0`` returns its output);
otherwise (or after it) the engine searches pixels or a VAE's latent space for images whose target
features match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine import Term, optimise
from ..peft import Victim
from ..priors import decoder_images
from ..records import Observation, ProgressFn, Reconstruction
from ..recover import recovered_features
from .common import ImageSearchConfig, engine_config, image_parametrization, load_decoder, run_tag
from .registry import register


@dataclass
class FeatMatchConfig(ImageSearchConfig):
    """Feature matching: the image-search settings plus a feature-to-image ``decoder`` file (optional)."""

    decoder: str | None = None


def feature_loss(victim: Victim, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between the images' (pre-adapter) features and the target features."""
    f = F.normalize(victim.raw_image_features(images), dim=-1)
    return (1 - (f * target).sum(-1)).mean()


@register("featmatch", FeatMatchConfig, "feature matching: image features read off the update (exact for the "
          "adapter, fitted for CoOp), then decoded and/or matched")
def feature_matching(obs: Observation, victim: Victim, cfg: FeatMatchConfig,
                     progress: ProgressFn | None = None) -> Reconstruction:
    """Recover the image features from the update, then find images with those features.

    ``prior`` picks pixels (``none``/``tv``) or a VAE latent space (``generative:P``); a ``decoder``
    turns the recovered features into starting images (and with ``iterations=0`` its output is the
    reconstruction). Seconds include the feature recovery.
    """
    t0 = time.perf_counter()
    est = recovered_features(obs, victim, labels={"infer": "predicted"}.get(cfg.labels, cfg.labels))
    target, labels = est.features, est.labels
    decoder = load_decoder(cfg.decoder, obs, victim)
    start = decoder_images(decoder, target) if decoder is not None else None
    settings = cfg.to_dict()
    if start is not None and cfg.iterations == 0:  # the decoder's output is the reconstruction
        settings["prior"] = "none (decoder output only)"
        return Reconstruction(
            images=start, labels=labels, label_source=est.label_source, attack="featmatch", history={},
            features=target,
            meta={"attack_config": settings, "observation": obs.meta, "seconds": time.perf_counter() - t0,
                  "seconds_per_iteration": 0.0, "feature_recovery": est.summary(),
                  "parametrization": {"kind": "decoder output"}},
        )
    param, prior_terms = image_parametrization(cfg, obs, victim, start_images=start)
    terms = [Term("feature", lambda s: feature_loss(victim, s.images, target)), *prior_terms]
    ecfg = engine_config(cfg, "known", signed=False, decay="cosine")
    res = optimise(param, terms, ecfg, batch=obs.batch_size, num_classes=len(obs.classnames),
                   known_labels=labels, selection="feature", progress=progress, checkpoint=cfg.checkpoint,
                   checkpoint_tag=run_tag(cfg, obs), task="attack featmatch",
                   device=victim.device)
    res.seconds = time.perf_counter() - t0
    return Reconstruction(
        images=res.images, labels=labels, label_source=est.label_source, attack="featmatch", history=res.history,
        features=target,
        meta={"attack_config": settings, "observation": obs.meta, "restart_losses": res.restart_losses,
              "best_restart": res.best_restart, "seconds": res.seconds,
              "seconds_per_iteration": res.seconds_per_iteration, "feature_recovery": est.summary(),
              **res.extra},
    )
