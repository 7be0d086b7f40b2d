"""What the server dictates to every client each round (the training recipe), as one Flower ConfigRecord.

The honest-but-curious server knows all of it (it chose it): PEFT method, local steps E, batch size B,
learning rate eta and the DP setting. What only clients know lives in :class:`clipleak.fl.local.ClientData`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ClipleakError
from ..peft import METHODS, PeftConfig
from ..privacy import PER_EXAMPLE_METHODS, DpSetting

CONFIG_KEY = "clipleak"
"""The ConfigRecord entry that carries the recipe (a JSON string)."""
ROUND_KEY = "clipleak-round"
"""The absolute round number (a resumed run starts Flower's own counter at 1 again)."""


@dataclass
class Recipe:
    """The local training every client runs in a round."""

    method: str = "adapter"
    n_ctx: int = 4
    class_specific: bool = False
    peft_seed: int = 0
    local_steps: int = 1
    batch_size: int = 1
    lr: float = 0.1
    dp: dict[str, Any] | None = None
    weights: str | None = "tiny-mnist"
    arch: str = "tiny-32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("coop", "adapter"):
            raise ClipleakError(f"federated runs train coop or adapter, not {self.method!r} "
                                f"(known methods: {', '.join(METHODS)})")
        if self.local_steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ClipleakError("local steps, batch size and learning rate must be positive")
        if self.dp is not None:
            s = self.setting()
            assert s is not None
            if s.mechanism == "per-example" and self.method not in PER_EXAMPLE_METHODS:
                raise ClipleakError(f"per-example DP needs one of {', '.join(PER_EXAMPLE_METHODS)}")

    def peft(self) -> PeftConfig:
        return PeftConfig(method=self.method, n_ctx=self.n_ctx, class_specific=self.class_specific,
                          init_seed=self.peft_seed)

    def setting(self) -> DpSetting | None:
        """The per-step DP mechanism. ``dp["delta"]`` is not part of it: the server uses it to account the
        epsilon spent over the rounds (``AttackingFedAvg``)."""
        if self.dp is None:
            return None
        return DpSetting.from_dict({k: v for k, v in self.dp.items() if k not in ("delta", "sample_rate", "steps",
                                                                                 "epsilon")}).resolve()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls(**json.loads(text))
