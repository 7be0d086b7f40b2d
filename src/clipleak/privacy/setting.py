"""A client's DP setting: which mechanism, C, sigma (given, or calibrated from a target epsilon), and
what the shared observation records about it.

Mechanisms:

* ``per-example`` -- DP-SGD: per-example gradients (:func:`per_example_gradients`), each clipped to C,
  summed, N(0, (sigma C)^2) added, divided by the batch size. Sensitivity C (add/remove one example), so
  the accountant's noise multiplier is sigma. ``coop`` and ``adapter`` only.
* ``per-batch`` -- Dp-CLIP: the batch gradient clipped to C, N(0, (sigma C)^2) added. One example can
  move the clipped batch gradient from one point of the C-ball to another, so the sensitivity is 2C and
  clipleak accounts it at noise multiplier sigma / 2 (a noise multiplier calibrated from epsilon is
  doubled). Any PEFT method.

Sites (where per-example clipping and noise act; ``per-example`` only):

* ``parameters`` (default) -- on the gradient of the trained PEFT parameters: DP-SGD proper.
* ``text-features`` -- ``coop`` only: on each example's gradient w.r.t. the K x E class text features,
  the noisy sum then mapped to the prompt by one backward pass of the text encoder (post-processing;
  :func:`~clipleak.privacy.coop_text_feature_dp`). Same accounting, about the plain step's cost instead
  of B text backward passes; C bounds the text-feature gradient and the prompt's noise is correlated.

The noise generator's seed is never part of the setting or the observation (an attacker who knew it
could subtract the noise); the client keeps it in its truth file.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..errors import ClipleakError
from ..peft import PeftConfig, Victim
from .accountant import ACCOUNTANTS, epsilon, noise_multiplier
from .mechanisms import CLIPPINGS, dp_clip, dp_sgd
from .per_example import coop_text_feature_dp, per_example_gradients

MECHANISMS: tuple[str, ...] = ("per-example", "per-batch")
SITES: tuple[str, ...] = ("parameters", "text-features")
NORMALISATION = {
    "per-example": "(sum of clipped per-example gradients + noise) / batch size",
    "per-batch": "clipped batch-mean gradient + noise (no division)",
}


@dataclass(frozen=True)
class DpSetting:
    """How a client privatises its update: ``noise_multiplier``, or a target ``epsilon`` to calibrate it.

    ``epsilon`` needs ``delta``, ``sample_rate`` (batch size / data set size) and ``steps`` (the
    training schedule the budget is spent over); with ``noise_multiplier``, giving all three also
    reports the epsilon. :meth:`resolve` fills in the missing one. When both are given the noise
    multiplier wins and epsilon is recomputed from it (what the setting actually spends).

    ``awaiting_schedule``: a setting held by a training config (fine-tuning, a federated recipe), whose
    sample rate and steps come from that training's schedule: it takes ``delta`` without them, and
    :meth:`scheduled` fills them in before it is resolved.
    """

    mechanism: str
    clip: float
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    accountant: str = "rdp"
    clipping: str = "flat"
    site: str = "parameters"
    awaiting_schedule: bool = False
    resolved: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ClipleakError(f"unknown DP mechanism {self.mechanism!r}; choose one of {', '.join(MECHANISMS)}")
        if self.clipping not in CLIPPINGS:
            raise ClipleakError(f"unknown clipping {self.clipping!r}; choose one of {', '.join(CLIPPINGS)}")
        if self.site not in SITES:
            raise ClipleakError(f"unknown DP site {self.site!r}; choose one of {', '.join(SITES)}")
        if self.site != "parameters" and (self.mechanism != "per-example" or self.clipping != "flat"):
            raise ClipleakError(f"the {self.site!r} site is for the per-example mechanism with flat clipping")
        if self.accountant not in ACCOUNTANTS:
            raise ClipleakError(f"unknown accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        if not _finite(self.clip) or self.clip <= 0:
            raise ClipleakError(f"the clipping norm C must be > 0, got {self.clip!r}")
        if self.noise_multiplier is None and self.epsilon is None:
            raise ClipleakError("give a noise multiplier or a target epsilon (with delta, sample rate and steps)")
        if self.noise_multiplier is not None and (not _finite(self.noise_multiplier) or self.noise_multiplier < 0):
            raise ClipleakError(f"the noise multiplier must be >= 0, got {self.noise_multiplier!r}")
        schedule = (self.delta, self.sample_rate, self.steps)
        if self.awaiting_schedule:
            if self.sample_rate is not None or self.steps is not None:
                raise ClipleakError("a DP setting awaiting its training schedule takes no sample rate or steps")
            if self.epsilon is not None and self.delta is None:
                raise ClipleakError("a target epsilon needs delta, the sample rate and the number of steps")
        elif self.epsilon is not None and any(v is None for v in schedule):
            raise ClipleakError("a target epsilon needs delta, the sample rate and the number of steps")
        elif any(v is None for v in schedule) and any(v is not None for v in schedule):
            raise ClipleakError("give delta, the sample rate and the number of steps together (or none of them)")

    @property
    def sensitivity_factor(self) -> float:
        """Sensitivity over C: 1 for per-example DP-SGD, 2 for the per-batch mechanism."""
        return 1.0 if self.mechanism == "per-example" else 2.0

    def scheduled(self, sample_rate: float, steps: int) -> DpSetting:
        """This setting with its training schedule filled in (without ``delta`` nothing is accounted: the
        schedule is left out)."""
        if self.delta is None:
            return replace(self, awaiting_schedule=False)
        return replace(self, sample_rate=float(sample_rate), steps=int(steps), awaiting_schedule=False)

    def unscheduled(self, *, drop: bool = False) -> DpSetting:
        """This setting as a training config holds it, awaiting the schedule that sets its sample rate and
        steps (:meth:`scheduled`); a sample rate or steps given is refused, or with ``drop`` left out."""
        if self.awaiting_schedule:
            return self
        if not drop and (self.sample_rate is not None or self.steps is not None):
            raise ClipleakError("the training schedule sets the DP sample rate and steps: leave them out of the "
                                "DP setting")
        return replace(self, sample_rate=None, steps=None, awaiting_schedule=True)

    def resolve(self) -> DpSetting:
        """A copy with both ``noise_multiplier`` and (when a schedule is given) ``epsilon`` filled in.

        Calibration and accounting run once: a resolved setting returns itself."""
        if self.resolved:
            return self
        if self.awaiting_schedule:
            raise ClipleakError("this DP setting awaits its training schedule (sample rate and steps): "
                                "fill it in with scheduled()")
        k = self.sensitivity_factor
        if self.noise_multiplier is None:
            assert self.epsilon is not None
            assert self.delta is not None and self.sample_rate is not None and self.steps is not None
            sigma = k * noise_multiplier(self.epsilon, self.delta, self.sample_rate, self.steps, self.accountant)
            eps = epsilon(sigma / k, self.sample_rate, self.steps, self.delta, self.accountant)
            return replace(self, noise_multiplier=sigma, epsilon=eps, resolved=True)
        if self.delta is None or self.sample_rate is None or self.steps is None or self.noise_multiplier == 0:
            return replace(self, epsilon=None, resolved=True)
        eps = epsilon(self.noise_multiplier / k, self.sample_rate, self.steps, self.delta, self.accountant)
        return replace(self, epsilon=eps, resolved=True)

    def record(self) -> dict[str, Any]:
        """The ``defense`` entry of an observation (resolved: sigma and epsilon filled in where possible)."""
        s = self.resolve()
        assert s.noise_multiplier is not None
        d: dict[str, Any] = {f.name: getattr(s, f.name) for f in fields(s)
                             if f.name not in ("resolved", "awaiting_schedule")}
        d["accountant"] = s.accountant if s.epsilon is not None else None
        d["noise_std"] = s.noise_multiplier * s.clip
        d["sensitivity"] = s.sensitivity_factor * s.clip
        d["normalisation"] = NORMALISATION[s.mechanism]
        if s.site == "text-features":
            d["normalisation"] = ("J^T (sum of clipped per-example text-feature gradients + noise) / batch size, "
                                  "J = d(text features)/d(prompt): the noise is N(0, noise_std^2) per text-feature "
                                  "coordinate, mapped to the prompt")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DpSetting:
        keys = {"mechanism", "clip", "noise_multiplier", "epsilon", "delta", "sample_rate", "steps",
                "accountant", "clipping", "site", "awaiting_schedule"}
        return cls(**{k: v for k, v in d.items() if k in keys})

    def to_dict(self) -> dict[str, Any]:
        """The setting as given (not resolved), for configs: :meth:`from_dict` reads it back."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("resolved", "awaiting_schedule")}
        if self.awaiting_schedule:
            d.pop("sample_rate")
            d.pop("steps")
            d["awaiting_schedule"] = True
        return d


def composed_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config that holds ``peft`` (a :class:`~clipleak.peft.PeftConfig`) and ``dp`` (a
    :class:`DpSetting` or None) as a plain dict: every field, those two as their own dicts."""
    d = {f.name: getattr(config, f.name) for f in fields(config)}
    d["peft"] = config.peft.to_dict()
    d["dp"] = None if config.dp is None else config.dp.to_dict()
    return d


def composed_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """:func:`composed_to_dict`'s dict with ``peft`` and ``dp`` back as objects (a training config's DP
    setting awaits its schedule); the other keys pass through."""
    d = dict(d)
    if isinstance(d.get("peft"), dict):
        d["peft"] = PeftConfig.from_dict(d["peft"])
    if isinstance(d.get("dp"), dict):
        d["dp"] = DpSetting.from_dict({**d["dp"], "awaiting_schedule": True})
    return d


def _finite(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def privatise(victim: Victim, images01: torch.Tensor, labels: torch.Tensor, setting: DpSetting,
              seed: int) -> dict[str, torch.Tensor]:
    """The DP gradient of the victim's cross-entropy on this batch under ``setting``; noise seeded by ``seed``,
    drawn on the images' device (on the CPU the numbers are the same as ever; a GPU's generator draws others)."""
    s = setting.resolve()
    assert s.noise_multiplier is not None
    gen = torch.Generator(device=images01.device).manual_seed(int(seed))
    if s.site == "text-features":
        return coop_text_feature_dp(victim, images01, labels, s.clip, s.noise_multiplier, gen)
    if s.mechanism == "per-example":
        per = per_example_gradients(victim, images01, labels)
        return dp_sgd(per, s.clip, s.noise_multiplier, gen, s.clipping)
    return dp_clip(victim.gradient(images01, labels), s.clip, s.noise_multiplier, gen, s.clipping)
