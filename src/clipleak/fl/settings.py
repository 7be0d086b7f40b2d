"""What the server dictates to every client each round (the training recipe), as one Flower ConfigRecord.

The honest-but-curious server knows all of it (it chose it): PEFT method, local steps E, batch size B,
learning rate eta and the DP setting. What only clients know lives in :class:`clipleak.fl.local.ClientData`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ClipleakError
from ..peft import FLAT_PEFT_KEYS, METHODS, PeftConfig
from ..privacy import PER_EXAMPLE_METHODS, Defense, DpSetting, composed_from_dict, composed_to_dict, parse_defense

CONFIG_KEY = "clipleak"
"""The ConfigRecord entry that carries the recipe (a JSON string)."""
ROUND_KEY = "clipleak-round"
"""The absolute round number (a resumed run starts Flower's own counter at 1 again)."""


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a PEFT state as it goes over the wire: each tensor's name, dtype, shape and bytes, in name
    order. The client writes it into its truth file and the server into the observation of the reply, so the
    evaluator can tell that a truth belongs to the very update that was attacked."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = state[name].detach().cpu().contiguous().numpy()
        h.update(f"{name}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Recipe:
    """The local training every client runs in a round: ``peft`` (coop or adapter), E local steps, batch
    size B, learning rate eta, ``defense`` (an update defense's spec, e.g. ``prune:0.1``, applied to the
    round's update) and ``dp``, the per-step mechanism with a noise multiplier (``delta``, when given, is the
    server's: it accounts the epsilon spent over the rounds; a training config's DP setting, so it awaits a
    schedule: :meth:`setting` is the mechanism each step runs)."""

    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="adapter"))
    local_steps: int = 1
    batch_size: int = 1
    lr: float = 0.1
    dp: DpSetting | None = None
    defense: str | None = None
    weights: str | None = "tiny-mnist"
    arch: str = "tiny-32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = self.peft.method
        if method not in ("coop", "adapter"):
            raise ClipleakError(f"federated runs train coop or adapter, not {method!r} "
                                f"(known methods: {', '.join(METHODS)})")
        if self.local_steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ClipleakError("local steps, batch size and learning rate must be positive")
        found = parse_defense(self.defense)  # an unknown or bad defense is refused here
        self.defense = None if found is None else found.spec
        if self.dp is not None:
            self.dp = self.dp.unscheduled(drop=True)  # the rounds are the schedule: a given one is unused
            s = self.setting()
            assert s is not None
            if s.mechanism == "per-example" and method not in PER_EXAMPLE_METHODS:
                raise ClipleakError(f"per-example DP needs one of {', '.join(PER_EXAMPLE_METHODS)}")

    def update_defense(self) -> Defense | None:
        """The update defense every client applies to its round's update after its local steps (after DP):
        pruning, quantisation or clipping (:mod:`clipleak.privacy.defenses`); ``None``: none."""
        return parse_defense(self.defense)

    def setting(self) -> DpSetting | None:
        """The per-step DP mechanism: ``dp`` without delta and epsilon (the server accounts those over the
        rounds, ``AttackingFedAvg``)."""
        if self.dp is None:
            return None
        return replace(self.dp, delta=None, epsilon=None, awaiting_schedule=False).resolve()

    def to_dict(self) -> dict[str, Any]:
        return composed_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """From :meth:`to_dict`'s form, or the flat form written before the recipe held a PeftConfig and a
        DpSetting (``method``, ``n_ctx``, ``class_specific``, ``peft_seed``; ``dp`` a dict)."""
        d = dict(d)
        if "peft" not in d or any(k in d for k in FLAT_PEFT_KEYS):
            d = _from_flat(d)
        return cls(**composed_from_dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))


def _from_flat(d: dict[str, Any]) -> dict[str, Any]:
    """A flat recipe (``method``, ``n_ctx``, ``class_specific``, ``peft_seed`` beside the schedule; ``dp`` a
    DpSetting dict whose ``sample_rate``, ``steps`` and ``epsilon`` the rounds ignored) as the composed form's
    dict: ``peft`` a PeftConfig, ``dp`` a DpSetting awaiting its schedule; the other keys pass through."""
    peft = PeftConfig.from_flat(d)
    rest = {k: v for k, v in d.items() if k not in FLAT_PEFT_KEYS}
    dp = rest.get("dp")
    if isinstance(dp, dict):
        kept = {k: v for k, v in dp.items() if k not in ("sample_rate", "steps", "epsilon")}
        rest["dp"] = DpSetting.from_dict({**kept, "awaiting_schedule": True})
    return {**rest, "peft": peft}
