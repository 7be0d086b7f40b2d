"""Update defenses without noise: top-k pruning, quantisation (k bits or sign) and norm clipping.

A client applies one of them to what it shares -- a gradient, or a federated round's update -- after any
DP mechanism (:func:`~clipleak.privacy.privatise`): DP first (clip and noise on the raw gradient, the
guarantee is about that), then the defense. Every defense here is a deterministic function of the DP
output, so it is post-processing and the DP guarantee is kept. None of them is a privacy guarantee by
itself; the audit measures what each buys.

Kinds (``Defense.parse`` reads the text form):

* ``prune:F`` -- top-k pruning over the whole update: the ``ceil(F d)`` entries of largest magnitude among
  all d entries (every tensor flattened, in the sorted order of the tensor names) are kept, the rest set
  to 0. Ties are broken by position (the earlier entry is kept), so the mask is deterministic.
  ``F = 1`` keeps everything (no defense).
* ``quantize:K`` -- deterministic (not stochastic) uniform quantisation of each tensor to ``2^K`` levels
  evenly spaced over ``[-m, m]``, ``m`` the tensor's largest magnitude (the per-tensor scale a client
  would send beside the codes); each entry goes to its nearest level. ``K = 32`` stands for the float32
  update as it is (no quantisation). ``K = 1`` is ``quantize:sign``: two levels at +-m would inflate the
  update's norm, so one bit is signSGD instead.
* ``quantize:sign`` -- signSGD: each tensor becomes ``sign(g) * mean(|g|)`` (the per-tensor mean
  magnitude keeps the update's scale, and its L1 norm, meaningful); two values per tensor (0 where
  the entry was exactly 0).
* ``clip:C`` -- the update's global L2 norm clipped to C (flat, over all tensors), no noise: the same
  factor ``min(1, C / (norm + 1e-6))`` as the DP mechanisms. ``clip:inf`` is no defense.

The observation records the defense under ``meta["defense"]`` (``kind``, ``parameter``, ``spec`` and a
line on what was done) beside the DP setting's fields when both were applied, so the attacker knows the
setting, as for DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ClipleakError
from .mechanisms import clip_gradient

Grads = dict[str, torch.Tensor]
DEFENSE_KINDS: tuple[str, ...] = ("prune", "quantize", "clip")
NO_QUANTISATION_BITS = 32
"""``quantize:32``: the float32 update as sent (the no-defense end of a quantisation sweep)."""
MAX_BITS = 16
"""Bits of uniform quantisation above which the codes would be no coarser than float32 rounding."""
ORDER = "after the DP mechanism, if any (post-processing: the DP guarantee is kept)"


@dataclass(frozen=True)
class Defense:
    """One update defense: ``kind`` (prune | quantize | clip) and its ``parameter`` (kept fraction, bits
    or ``"sign"``, clipping norm)."""

    kind: str
    parameter: float | str

    def __post_init__(self) -> None:
        if self.kind not in DEFENSE_KINDS:
            raise ClipleakError(f"unknown defense {self.kind!r}; choose one of {', '.join(DEFENSE_KINDS)}")
        p = self.parameter
        if self.kind == "quantize":
            if p == "sign":
                return
            if isinstance(p, bool) or not isinstance(p, int | float) or float(p) != int(p) \
                    or not (1 <= int(p) <= MAX_BITS or int(p) == NO_QUANTISATION_BITS):
                raise ClipleakError(f"quantize takes 1..{MAX_BITS} bits, {NO_QUANTISATION_BITS} (none) or sign, "
                                    f"got {p!r}")
            return
        if isinstance(p, bool) or not isinstance(p, int | float) or math.isnan(float(p)):
            raise ClipleakError(f"{self.kind} takes a number, got {p!r}")
        if self.kind == "prune" and not 0 < float(p) <= 1:
            raise ClipleakError(f"prune keeps a fraction in (0, 1], got {p!r}")
        if self.kind == "clip" and not float(p) > 0:
            raise ClipleakError(f"clip takes a norm C > 0 (inf: none), got {p!r}")

    @classmethod
    def parse(cls, text: str) -> Defense:
        """``"prune:0.1"``, ``"quantize:8"``, ``"quantize:sign"``, ``"clip:1.0"`` (``quantize:1`` is sign)."""
        kind, sep, value = str(text).strip().lower().partition(":")
        if not sep or not value:
            raise ClipleakError(f"a defense is KIND:VALUE (prune:0.1, quantize:8, quantize:sign, clip:1), got {text!r}")
        if kind == "quantize":
            if value == "sign":
                return cls("quantize", "sign")
            try:
                bits = int(value)
            except ValueError:
                raise ClipleakError(f"quantize takes a whole number of bits or sign, got {value!r}") from None
            return cls("quantize", "sign" if bits == 1 else bits)
        try:
            number = float(value)
        except ValueError:
            raise ClipleakError(f"{kind} takes a number, got {value!r}") from None
        return cls(kind, number)

    @property
    def spec(self) -> str:
        """The text form (``Defense.parse(d.spec) == d``)."""
        p = self.parameter
        return f"{self.kind}:{p if isinstance(p, str) else f'{p:g}'}"

    @property
    def is_identity(self) -> bool:
        """Whether the defense leaves every update as it is (prune:1, quantize:32, clip:inf)."""
        p = self.parameter
        return ((self.kind == "prune" and float(p) >= 1) or (self.kind == "quantize" and p == NO_QUANTISATION_BITS)
                or (self.kind == "clip" and math.isinf(float(p))))

    def describe(self) -> str:
        p = self.parameter
        if self.kind == "prune":
            return (f"top-k pruning: the {float(p):g} fraction of entries of largest magnitude over the whole "
                    "update kept (ties: the earlier entry, tensors in name order), the rest zeroed")
        if self.kind == "quantize" and p == "sign":
            return "signSGD: each tensor sent as sign(g) * mean(|g|) (per-tensor mean magnitude)"
        if self.kind == "quantize":
            if p == NO_QUANTISATION_BITS:
                return "32 bits: the float32 update as it is (no quantisation)"
            return (f"deterministic uniform quantisation of each tensor to 2^{int(p)} levels over [-m, m], "
                    "m the tensor's largest magnitude, to the nearest level")
        return f"global L2 norm clipped to {float(p):g} (flat, no noise)"

    def record(self) -> dict[str, Any]:
        """What the observation records of the defense (merged into ``meta["defense"]``)."""
        return {"kind": self.kind, "parameter": self.parameter, "spec": self.spec, "applied": self.describe(),
                "order": ORDER}

    @classmethod
    def from_record(cls, d: dict[str, Any] | None) -> Defense | None:
        """The defense an observation's ``meta["defense"]`` records, or ``None`` (undefended or DP only)."""
        if not d or d.get("kind") is None:
            return None
        return cls(str(d["kind"]), d["parameter"])

    def apply(self, update: Grads) -> Grads:
        """The defended copy of ``update`` (name -> tensor; same names, shapes, dtypes and devices)."""
        return apply_defense(update, self)


def _check(update: Grads) -> None:
    if not update:
        raise ClipleakError("no update to defend")


def prune_mask(update: Grads, fraction: float) -> Grads:
    """The boolean mask of top-k pruning: ``ceil(fraction d)`` entries of largest magnitude over all d
    entries kept, ties broken by position (tensors flattened in sorted name order)."""
    _check(update)
    names = sorted(update)
    flat = torch.cat([update[k].detach().reshape(-1) for k in names])
    d = flat.numel()
    k = min(d, max(1, math.ceil(float(fraction) * d - 1e-9)))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices  # stable: equal magnitudes by position
    keep = torch.zeros(d, dtype=torch.bool, device=flat.device)
    keep[order[:k]] = True
    out, start = {}, 0
    for name in names:
        n = update[name].numel()
        out[name] = keep[start:start + n].view(update[name].shape)
        start += n
    return {name: out[name] for name in update}


def quantize_tensor(g: torch.Tensor, bits: int) -> torch.Tensor:
    """``g`` to the nearest of ``2^bits`` levels evenly spaced over ``[-m, m]``, ``m = max |g|``."""
    m = g.detach().abs().max()
    if not bool(m > 0):
        return torch.zeros_like(g)
    levels = 2 ** int(bits)
    step = 2 * m / (levels - 1)
    codes = torch.round((g + m) / step).clamp_(0, levels - 1)
    return codes * step - m


def sign_tensor(g: torch.Tensor) -> torch.Tensor:
    """signSGD with the per-tensor mean magnitude as scale: ``sign(g) * mean(|g|)``."""
    return torch.sign(g) * g.abs().mean()


def apply_defense(update: Grads, defense: Defense | None) -> Grads:
    """``update`` with ``defense`` applied (a new dict; ``None`` or an identity defense: a copy as it is)."""
    _check(update)
    if defense is None or defense.is_identity:
        return dict(update)
    p = defense.parameter
    if defense.kind == "prune":
        mask = prune_mask(update, float(p))
        return {k: torch.where(mask[k], g, torch.zeros_like(g)) for k, g in update.items()}
    if defense.kind == "quantize":
        if p == "sign":
            return {k: sign_tensor(g) for k, g in update.items()}
        return {k: quantize_tensor(g, int(p)) for k, g in update.items()}
    return clip_gradient(update, float(p), "flat")


def parse_defense(text: str | None) -> Defense | None:
    """``Defense.parse``, with ``None``, ``""`` and ``"none"`` meaning no defense."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    return Defense.parse(text)


def parse_defense_sweep(text: str) -> tuple[str, list[float]]:
    """``"prune:1,0.1,0.01"`` -> ``("prune", [1.0, 0.1, 0.01])``: one kind and its levels, each checked.

    Larger is weaker for every kind (kept fraction, bits, clipping norm); ``quantize:1`` is sign.
    """
    kind, sep, values = str(text).strip().lower().partition(":")
    if not sep or kind not in DEFENSE_KINDS:
        raise ClipleakError(f"--defense is KIND:V1,V2,... with KIND one of {', '.join(DEFENSE_KINDS)}, got {text!r}")
    levels: list[float] = []
    for v in values.split(","):
        v = v.strip()
        if not v:
            continue
        if kind == "quantize" and v == "sign":
            v = "1"
        Defense.parse(f"{kind}:{v}")  # checks the level
        levels.append(float(v))
    if not levels:
        raise ClipleakError(f"--defense {text!r} names no level")
    return kind, levels


def level_defense(kind: str, level: float) -> Defense:
    """The defense of one level of a sweep (``quantize`` 1 is sign)."""
    return Defense.parse(f"{kind}:{int(level) if kind == 'quantize' else f'{level:g}'}")
