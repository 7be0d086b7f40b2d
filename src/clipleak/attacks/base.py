"""Attack registry, shared configuration and the gradient-matching objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..engine import (
    EngineConfig,
    ProgressFn,
    State,
    Term,
    cosine_gradient_distance,
    l2_gradient_distance,
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


def engine_config(cfg: AttackConfig, label_mode: str, **overrides: Any) -> EngineConfig:
    base = {"iterations": cfg.iterations, "restarts": cfg.restarts, "lr": cfg.lr, "seed": cfg.seed,
            "labels": label_mode}
    base.update(overrides)
    return EngineConfig(**base)


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
    from . import inverting_gradients  # noqa: F401  (registers)

    if name not in ATTACKS:
        raise ClipleakError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](obs, victim, cfg or AttackConfig(), progress)
