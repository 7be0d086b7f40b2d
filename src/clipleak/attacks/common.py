"""Pieces the attacks share: the image-search settings, the gradient-matching term, label handling,
the image parametrisation a prior asks for, and checkpoint tags."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..engine import (
    EngineConfig,
    Parametrization,
    PixelImages,
    State,
    Term,
    gradient_distance,
    total_variation,
)
from ..errors import ClipleakError
from ..peft import Victim
from ..priors import ConvVAE, FeatureDecoder, LatentImages, check_prior, load_prior, vae_codes
from ..records import Observation

LABEL_MODES = ("auto", "known", "infer")


@dataclass
class ImageSearchConfig:
    """Settings every image search shares.

    ``prior``: ``none`` (free pixels), ``tv`` (pixels + total variation) or ``generative:PATH`` (the
    latent space of the VAE file at PATH; names such as ``tiny-mnist-vae`` are resolved to files by
    the API). ``labels``: ``auto`` (the observation's labels when shared, else inferred), ``known``
    or ``infer``.
    """

    iterations: int = 300
    restarts: int = 2
    lr: float = 0.1
    tv_weight: float = 0.05
    seed: int = 0
    labels: str = "auto"
    init: str = "randn"
    grayscale: bool | None = None  # None: from the observation's data set
    checkpoint: str | None = None
    prior: str = "tv"
    latent_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.restarts < 1:
            raise ClipleakError("iterations must be >= 0 and restarts >= 1")
        if self.labels not in LABEL_MODES:
            raise ClipleakError(f"labels must be one of {', '.join(LABEL_MODES)}, not {self.labels!r}")
        if not (self.prior in ("none", "tv") or self.prior.startswith("generative:")):
            raise ClipleakError(f"unknown prior {self.prior!r}: none, tv or generative:PATH")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gradient_matching_term(victim: Victim, obs: Observation, metric: str = "cosine",
                           name: str = "gradient") -> Term:
    """Distance between the candidate batch's gradient and the observed one (double backward).

    The observed gradient is flattened (and its norm taken) once, not at every step; the candidate's loss
    runs the image tower's lean forward (:meth:`Victim.loss` with ``lean=True``: the same function with
    fewer operations to differentiate twice)."""
    params = victim.trainable()
    dist = gradient_distance(metric, [obs.gradients[n].to(torch.float32) for n in params])
    plist = list(params.values())

    def fn(state: State) -> torch.Tensor:
        loss = victim.loss(state.images, state.labels, lean=True)
        return dist(torch.autograd.grad(loss, plist, create_graph=True))

    return Term(name=name, fn=fn)


def resolve_labels(obs: Observation, mode: str) -> tuple[str, torch.Tensor | None]:
    """Decide between the observation's labels and label inference."""
    if mode not in LABEL_MODES:
        raise ClipleakError(f"labels must be auto, known or infer, not {mode!r}")
    if mode == "known" and obs.labels is None:
        raise ClipleakError("the observation does not include labels; use --labels infer")
    if mode in ("auto", "known") and obs.labels is not None:
        return "known", obs.labels.clone()
    return "infer", None


def run_tag(cfg: Any, obs: Observation) -> str:
    """What identifies a run for checkpoint/resume: attack settings and the observation."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("restarts", "checkpoint")}
    return json.dumps({"settings": settings, "observation": obs.digest()}, sort_keys=True)


def engine_config(cfg: ImageSearchConfig, label_mode: str, **overrides: Any) -> EngineConfig:
    base: dict[str, Any] = {"iterations": cfg.iterations, "restarts": cfg.restarts, "lr": cfg.lr,
                            "seed": cfg.seed, "labels": label_mode}
    base.update(overrides)
    return EngineConfig(**base)


def image_parametrization(
    cfg: ImageSearchConfig, obs: Observation, victim: Victim, start_images: torch.Tensor | None = None,
    start_noise: float = 0.0,
) -> tuple[Parametrization, list[Term]]:
    """The image parametrisation and prior terms that ``cfg.prior`` asks for.

    ``none``: free pixels. ``tv``: free pixels + total variation (``tv_weight``). ``generative:P``: the
    latent space of the VAE file ``P`` + a latent norm penalty (``latent_weight``); ``start_images``
    (e.g. a decoder's output) give the starting codes; in pixel space, restarts after the first start from
    ``start_images`` plus Gaussian noise of std ``start_noise``.
    """
    grayscale = cfg.grayscale
    if grayscale is None:
        grayscale = bool((obs.meta.get("data") or {}).get("grayscale", False))
    size = victim.clip_info.image_size
    if cfg.prior in ("none", "tv"):
        param: Parametrization = PixelImages(size, grayscale=grayscale, init=cfg.init, start=start_images,
                                                    start_noise=start_noise, device=victim.device)
        terms = [Term("tv", lambda s: total_variation(s.images), weight=cfg.tv_weight)] \
            if cfg.prior == "tv" and cfg.tv_weight > 0 else []
        return param, terms
    vae = load_prior(cfg.prior.split(":", 1)[1])
    check_prior(vae, size, kind="vae", data=obs.meta.get("data"))
    assert isinstance(vae, ConvVAE)
    vae.to(victim.device)
    starts = vae_codes(vae, start_images) if start_images is not None else None
    lat = LatentImages(vae, starts=starts)
    return lat, [lat.prior_term(cfg.latent_weight)]


def load_decoder(path: str | None, obs: Observation, victim: Victim) -> FeatureDecoder | None:
    """The feature-to-image decoder file at ``path`` (checked against the target and the split), or None."""
    if not path:
        return None
    dec = load_prior(path)
    check_prior(dec, victim.clip_info.image_size, weights_sha256=victim.clip_info.weights_sha256, kind="decoder",
                data=obs.meta.get("data"))
    assert isinstance(dec, FeatureDecoder)
    return dec.to(victim.device)
