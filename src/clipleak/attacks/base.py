"""Attack registry, shared configuration and the gradient-matching objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..engine import (
    EngineConfig,
    Parametrization,
    PixelImages,
    ProgressFn,
    State,
    Term,
    cosine_gradient_distance,
    l2_gradient_distance,
    total_variation,
)
from ..errors import ClipleakError
from ..observation import Observation
from ..peft import Victim
from ..reconstruction import Reconstruction


@dataclass
class AttackConfig:
    """Settings common to the gradient-matching attacks (attack-specific ones go in ``options``)."""

    iterations: int = 300
    restarts: int = 2
    lr: float = 0.1
    tv_weight: float = 0.05
    seed: int = 0
    labels: str = "auto"  # auto (observation's labels if shared, else infer) | known | infer
    init: str = "randn"
    grayscale: bool | None = None  # None: from the observation's data set
    checkpoint: str | None = None
    prior: str = "tv"  # none | tv | generative:PATH-or-name (a VAE: search its latent space)
    decoder: str | None = None  # feature-to-image decoder (path or name): starts / result of featmatch
    latent_weight: float = 0.01
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gradient_matching_term(
    victim: Victim, obs: Observation, metric: str = "cosine", name: str = "gradient"
) -> Term:
    """Distance between the candidate batch's gradient and the observed one (double backward)."""
    params = victim.trainable()
    names = list(params)
    targets = [obs.gradients[n].to(torch.float32) for n in names]
    plist = list(params.values())
    dist = {"cosine": cosine_gradient_distance, "l2": l2_gradient_distance}.get(metric)
    if dist is None:
        raise ClipleakError(f"unknown gradient distance {metric!r} (cosine, l2)")

    def fn(state: State) -> torch.Tensor:
        loss = victim.loss(state.images, state.labels)
        grads = torch.autograd.grad(loss, plist, create_graph=True)
        return dist(list(grads), targets)

    return Term(name=name, fn=fn)


def resolve_labels(obs: Observation, mode: str) -> tuple[str, torch.Tensor | None]:
    """Decide between the observation's labels and label inference."""
    if mode not in ("auto", "known", "infer"):
        raise ClipleakError(f"labels must be auto, known or infer, not {mode!r}")
    if mode == "known" and obs.labels is None:
        raise ClipleakError("the observation does not include labels; use --labels infer")
    if mode in ("auto", "known") and obs.labels is not None:
        return "known", obs.labels.clone()
    return "infer", None


def gradient_digest(obs: Observation) -> str:
    """SHA-256 of the observation's shared gradients (names and float32 values)."""
    import hashlib

    g = hashlib.sha256()
    for k in sorted(obs.gradients):
        g.update(k.encode())
        g.update(obs.gradients[k].detach().float().numpy().tobytes())
    return g.hexdigest()


def run_tag(cfg: AttackConfig, obs: Observation) -> str:
    """What identifies a run for checkpoint/resume: attack settings and the observation."""
    import json

    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("restarts", "checkpoint")}
    return json.dumps({"settings": settings, "gradients": gradient_digest(obs)}, sort_keys=True)


def engine_config(cfg: AttackConfig, label_mode: str, **overrides: Any) -> EngineConfig:
    base = {"iterations": cfg.iterations, "restarts": cfg.restarts, "lr": cfg.lr, "seed": cfg.seed,
            "labels": label_mode}
    base.update(overrides)
    return EngineConfig(**base)


def image_parametrization(
    cfg: AttackConfig, obs: Observation, victim: Victim, start_images: torch.Tensor | None = None
) -> tuple[Parametrization, list[Term]]:
    """The image parametrisation and prior terms that ``cfg.prior`` asks for.

    ``none``: free pixels. ``tv``: free pixels + total variation (``tv_weight``). ``generative:P``: the
    latent space of the VAE at ``P`` (a file or a named prior such as ``tiny-mnist-vae``) + a latent
    norm penalty (``latent_weight``); ``start_images`` (e.g. a decoder's output) give the starting codes.
    """
    grayscale = cfg.grayscale
    if grayscale is None:
        grayscale = bool((obs.meta.get("data") or {}).get("grayscale", False))
    size = victim.clip_info.image_size
    if cfg.prior in ("none", "tv"):
        param: Parametrization = PixelImages(size, grayscale=grayscale, init=cfg.init, start=start_images)
        terms = [Term("tv", lambda s: total_variation(s.images), weight=cfg.tv_weight)] \
            if cfg.prior == "tv" and cfg.tv_weight > 0 else []
        return param, terms
    if cfg.prior.startswith("generative:"):
        from ..priors import LatentImages, check_prior, load_prior, vae_codes

        vae = load_prior(cfg.prior.split(":", 1)[1])
        check_prior(vae, size, kind="vae")
        starts = vae_codes(vae, start_images) if start_images is not None else None
        lat = LatentImages(vae, starts=starts)
        return lat, [lat.prior_term(cfg.latent_weight)]
    raise ClipleakError(f"unknown prior {cfg.prior!r}: none, tv or generative:PATH")


def load_decoder(cfg: AttackConfig, victim: Victim):
    """The feature-to-image decoder named in ``cfg.decoder`` (checked against the target), or None."""
    if not cfg.decoder:
        return None
    from ..priors import check_prior, load_prior

    dec = load_prior(cfg.decoder)
    check_prior(dec, victim.clip_info.image_size, weights_sha256=victim.clip_info.weights_sha256, kind="decoder")
    return dec


AttackFn = Callable[[Observation, Victim, AttackConfig, ProgressFn | None], Reconstruction]
ATTACKS: dict[str, AttackFn] = {}


def register(name: str) -> Callable[[AttackFn], AttackFn]:
    def deco(fn: AttackFn) -> AttackFn:
        ATTACKS[name] = fn
        return fn

    return deco


def run_attack(
    name: str,
    obs: Observation,
    victim: Victim,
    cfg: AttackConfig | None = None,
    progress: ProgressFn | None = None,
) -> Reconstruction:
    """Run attack ``name`` (see :data:`ATTACKS`) on an observation against the rebuilt victim."""
    from . import features, inverting_gradients  # noqa: F401  (registers)

    if name not in ATTACKS:
        raise ClipleakError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](obs, victim, cfg or AttackConfig(), progress)
