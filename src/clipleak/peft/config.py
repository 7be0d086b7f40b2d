"""What the client fine-tunes: the PEFT method and its hyper-parameters, serialised into every observation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import ClipleakError

Method = Literal["coop", "adapter", "full-visual", "full"]
METHODS: tuple[str, ...] = ("coop", "adapter", "full-visual", "full")


@dataclass
class PeftConfig:
    """What the client fine-tunes. Serialised into every observation."""

    method: str = "coop"
    n_ctx: int = 4
    class_specific: bool = False
    ctx_init_std: float = 0.02
    adapter_reduction: int = 4
    adapter_ratio: float = 0.2
    template: str = "a photo of a {}."
    init_seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ClipleakError(f"unknown PEFT method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.n_ctx < 1:
            raise ClipleakError("n_ctx must be at least 1")
        if not 0.0 <= self.adapter_ratio <= 1.0:
            raise ClipleakError("adapter_ratio must be in [0, 1]")
        if "{}" not in self.template:
            raise ClipleakError("template must contain '{}' where the class name goes")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftConfig:
        return cls(**d)

    @classmethod
    def from_flat(cls, d: dict[str, Any], method: str | None = None) -> PeftConfig:
        """The PEFT module a flat config spelled with :data:`FLAT_PEFT_KEYS` (fine-tuning configs, federated
        recipes and audit options written before they held a PeftConfig); ``method`` overrides the flat one."""
        return cls(method=str(method if method is not None else d.get("method", "adapter")),
                   n_ctx=int(d.get("n_ctx", 4)), class_specific=bool(d.get("class_specific", False)),
                   init_seed=int(d.get("peft_seed", 0)))


FLAT_PEFT_KEYS: tuple[str, ...] = ("method", "n_ctx", "class_specific", "peft_seed")
"""The PEFT fields configs spelled flat before they held a :class:`PeftConfig` (``peft_seed`` is its
``init_seed``)."""
