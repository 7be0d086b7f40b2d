"""The attack registry: each attack has a name, a typed config and a run function.

The registry is complete as soon as :mod:`clipleak.attacks` is imported; registering a name twice is
an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import ClipleakError
from ..peft import Victim
from ..records import Observation, ProgressFn, Reconstruction, gradient_view

AttackFn = Callable[[Observation, Victim, Any, ProgressFn | None], Reconstruction]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: its run function, its config class and a one-line summary (with source)."""

    name: str
    run: AttackFn
    config: type
    summary: str


ATTACKS: dict[str, AttackSpec] = {}


def register(name: str, config: type, summary: str) -> Callable[[AttackFn], AttackFn]:
    """Register ``fn`` as attack ``name`` taking a ``config`` instance."""

    def deco(fn: AttackFn) -> AttackFn:
        if name in ATTACKS:
            raise ClipleakError(f"attack {name!r} is registered twice")
        ATTACKS[name] = AttackSpec(name, fn, config, summary)
        return fn

    return deco


def attack_spec(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ClipleakError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def make_config(name: str, **settings: Any) -> Any:
    """Attack ``name``'s typed config with ``settings`` (an unknown setting is an error)."""
    cls = attack_spec(name).config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ClipleakError(f"unknown setting(s) for attack {name!r}: {', '.join(unknown)} "
                            f"(it takes: {', '.join(sorted(known))})")
    return cls(**settings)


def run_attack(name: str, obs: Observation, victim: Victim, cfg: Any = None,
               progress: ProgressFn | None = None) -> Reconstruction:
    """Run attack ``name`` on an observation against the rebuilt victim.

    A federated update (``meta["kind"] == "update"``) is attacked through its gradient view
    (:func:`clipleak.records.gradient_view`: ``-delta / (eta E)``, batch = the distinct images touched).

    The attack runs where the victim is: the observation's tensors are moved there, and the reconstruction
    comes back with CPU tensors (what its file holds)."""
    spec = attack_spec(name)
    obs = _on_device(gradient_view(obs), victim.device)
    cfg = cfg if cfg is not None else spec.config()
    if not isinstance(cfg, spec.config):
        raise ClipleakError(f"attack {name!r} takes a {spec.config.__name__}, not a {type(cfg).__name__}")
    rec = spec.run(obs, victim, cfg, progress)
    return dataclasses.replace(rec, images=rec.images.detach().cpu(), labels=rec.labels.cpu(),
                               features=None if rec.features is None else rec.features.detach().cpu())


def _on_device(obs: Observation, device: torch.device) -> Observation:
    """``obs`` with its tensors on ``device`` (the same object when they are there already)."""
    tensors = [*obs.gradients.values(), *obs.peft_state.values(), *([] if obs.labels is None else [obs.labels])]
    if all(t.device == device for t in tensors):
        return obs
    return dataclasses.replace(
        obs, gradients={k: v.to(device) for k, v in obs.gradients.items()},
        peft_state={k: v.to(device) for k, v in obs.peft_state.items()},
        labels=None if obs.labels is None else obs.labels.to(device))
