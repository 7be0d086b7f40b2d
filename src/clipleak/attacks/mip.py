"""MIP (Zhou et al. 2024, arXiv 2403.07901) for CLIP PEFT updates: labels first, then the image features
(inverse gradient estimation), then the images.

1. **Label prediction** from the gradient before any image search (:func:`clipleak.recover.recovered_features`
   with ``labels="predicted"``): the adapter's weight gradients are reproduced only by the true labels;
   the CoOp context gradient's ``dL/dT`` is rank one at batch 1 and ``p - e_y`` is negative only at the label.
2. **Inverse gradient estimation**: the image-feature-level signal is recovered from the PEFT gradient
   (exact for the adapter, a fit of ``J^T dL/dT`` for CoOp), so no search ever pushes a gradient back
   through the frozen text encoder.
3. **Image stage**: a feature-to-image decoder trained on the public split turns the features into
   images; optionally a search in a VAE's latent space for images whose target features match
   (``search`` steps), and optionally a refinement that matches the observed PEFT gradient from the decoded
   images (``refine`` steps, pixels + TV).

The reconstruction records each stage's own figure (label source and residual, feature recovery, image
stage seconds); the evaluator adds label accuracy and the recovered features' cosine to the truth's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from ..engine import PixelImages, Term, optimise, total_variation
from ..errors import ClipleakError
from ..peft import Victim
from ..priors import decoder_images
from ..records import Observation, ProgressFn, Reconstruction
from ..recover import LABEL_MODES, recovered_features
from .common import (
    ImageSearchConfig,
    engine_config,
    gradient_matching_term,
    image_parametrization,
    load_decoder,
    run_tag,
)
from .featmatch import feature_loss
from .registry import register


@dataclass
class MIPConfig:
    """MIP's settings. ``labels``: auto | known | predicted | feature (see ``recovered_features``);
    ``decoder``: the feature-to-image decoder file (names such as ``tiny-mnist-decoder`` are resolved by
    the API); ``search``: VAE latent-search steps after decoding (needs ``prior="generative:VAE"``);
    ``refine``: gradient-matching steps from the decoded images (pixels + TV)."""

    labels: str = "auto"
    decoder: str | None = None
    search: int = 0
    prior: str = "none"
    refine: int = 0
    tv_weight: float = 0.01
    lr: float = 0.01
    latent_weight: float = 0.01
    restarts: int = 1
    seed: int = 0
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ClipleakError(f"labels must be one of {', '.join(LABEL_MODES)}, not {self.labels!r}")
        if self.search < 0 or self.refine < 0 or self.restarts < 1:
            raise ClipleakError("search and refine must be >= 0 and restarts >= 1")
        if self.search > 0 and not self.prior.startswith("generative:"):
            raise ClipleakError("a latent search needs prior='generative:VAE' (e.g. generative:tiny-mnist-vae)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register("mip", MIPConfig, "MIP (arXiv 2403.07901): labels predicted from the gradient, image features by inverse "
          "gradient estimation, decoded by a public-split decoder; optional latent search and gradient refinement")
def mip(obs: Observation, victim: Victim, cfg: MIPConfig, progress: ProgressFn | None = None) -> Reconstruction:
    if victim.cfg.method not in ("coop", "adapter", "full-visual", "full"):
        raise ClipleakError(f"MIP needs a PEFT or fine-tune observation, not {victim.cfg.method!r}")
    t0 = time.perf_counter()
    est = recovered_features(obs, victim, labels=cfg.labels)
    t_features = time.perf_counter() - t0
    decoder = load_decoder(cfg.decoder, obs, victim)
    if decoder is None:
        raise ClipleakError("MIP's image stage needs a feature-to-image decoder (decoder=tiny-mnist-decoder, or "
                            "one trained with `clipleak prior train --kind decoder`)")
    t1 = time.perf_counter()
    images = decoder_images(decoder, est.features)
    history: dict[str, list[float]] = {}
    extra: dict[str, Any] = {"parametrization": {"kind": "decoder output"}}
    if cfg.search > 0:
        search = ImageSearchConfig(iterations=cfg.search, restarts=cfg.restarts, lr=0.05, seed=cfg.seed,
                                   labels="known", prior=cfg.prior, latent_weight=cfg.latent_weight)
        param, prior_terms = image_parametrization(search, obs, victim, start_images=images)
        target = est.features
        terms = [Term("feature", lambda s: feature_loss(victim, s.images, target)), *prior_terms]
        res = optimise(param, terms, engine_config(search, "known", signed=False, decay="cosine"),
                       batch=obs.batch_size, num_classes=len(obs.classnames), known_labels=est.labels,
                       selection="feature", progress=progress, task="mip latent search", device=victim.device)
        images, history, extra = res.images, res.history, res.extra
    if cfg.refine > 0:
        grayscale = bool((obs.meta.get("data") or {}).get("grayscale", False))
        param_px = PixelImages(victim.clip_info.image_size, grayscale=grayscale, start=images, device=victim.device)
        terms = [gradient_matching_term(victim, obs),
                 Term("tv", lambda s: total_variation(s.images), weight=cfg.tv_weight)]
        refine_cfg = ImageSearchConfig(iterations=cfg.refine, restarts=1, lr=cfg.lr, seed=cfg.seed, labels="known")
        res = optimise(param_px, terms, engine_config(refine_cfg, "known", signed=False, decay="cosine"),
                       batch=obs.batch_size, num_classes=len(obs.classnames), known_labels=est.labels,
                       selection="gradient", progress=progress, checkpoint=cfg.checkpoint,
                       checkpoint_tag=run_tag(cfg, obs), task="mip gradient refinement", device=victim.device)
        images = res.images
        history = {**history, **{f"refine {k}": v for k, v in res.history.items()}}
        extra = {**extra, "refine": res.extra}
    seconds = time.perf_counter() - t0
    stages = {
        "labels": {"mode": cfg.labels, "source": est.label_source},
        "features": {**est.summary(), "seconds": round(t_features, 3)},
        "image": {"decoder": cfg.decoder, "search_steps": cfg.search, "refine_steps": cfg.refine,
                  "seconds": round(time.perf_counter() - t1, 3)},
    }
    return Reconstruction(
        images=images.detach(), labels=est.labels, label_source=est.label_source, attack="mip", history=history,
        features=est.features,
        meta={"attack_config": cfg.to_dict(), "observation": obs.meta, "seconds": seconds,
              "seconds_per_iteration": seconds / (cfg.search + cfg.refine) if cfg.search + cfg.refine else 0.0,
              "stages": stages,
              "feature_recovery": est.summary(), **extra},
    )
