"""What an audit sweeps and how its cells are named: :class:`AuditConfig`, the cell keys, the draw seeds.

Both the sweep (:mod:`.sweep`, which computes cells) and the summary (:mod:`.summary`, which reads them)
import from here; neither imports the other's internals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..attacks import attack_spec
from ..errors import ClipleakError, check_range
from ..training import FinetuneConfig

MAX_IMAGES = 10_000
"""Observations per point at most: a larger audit is refused before any cell list is built."""
MAX_CANARIES = 100_000


@dataclass
class AuditConfig:
    """What the audit sweeps and the schedule its epsilons are calibrated for.

    ``seed`` seeds the DP noise of the shared observations, the DP fine-tuning's batches and noise, and the
    canaries; ``draw_seed`` picks which private digits are attacked: observation ``i`` of a point draws its
    batch with seed ``draw_seed + i`` (:meth:`draw_seeds`)."""

    epsilons: list[float] = field(default_factory=lambda: [math.inf, 100.0, 30.0, 10.0, 3.0, 1.0])
    methods: list[str] = field(default_factory=lambda: ["adapter", "coop"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    attack: str = "featmatch"
    images: int = 8
    weights: str = "tiny-mnist"
    decoder: str | None = "tiny-mnist-decoder"
    iterations: int = 0
    data: str = "mnist"
    split_seed: int = 0
    delta: float = 1e-5
    finetune: dict[str, Any] = field(default_factory=lambda: {"steps": 200, "batch_size": 25, "clip": 0.01,
                                                               "lr": 1e-2, "sampling": "poisson"})
    canaries: int = 1000
    reid_k: int = 10
    seed: int = 0
    draw_seed: int = 0

    def __post_init__(self) -> None:
        check_range("--images", self.images, low=1, high=MAX_IMAGES, integer=True)
        check_range("--canaries", self.canaries, low=0, high=MAX_CANARIES, integer=True)
        check_range("--iterations", self.iterations, low=0, high=100_000, integer=True)
        attack_spec(self.attack)  # an unknown attack is refused here, before any cell is computed
        if not self.epsilons or any(not (e > 0) for e in self.epsilons):
            raise ClipleakError("epsilons must be positive numbers (inf for no defense)")
        if int(self.images) < 1 or not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ClipleakError("images and batch sizes must be positive")
        if int(self.draw_seed) < 0:
            raise ClipleakError(f"the draw seed must be >= 0, got {self.draw_seed}")
        if int(self.reid_k) < 2:
            raise ClipleakError(f"re-identification needs at least 2 candidates, got reid_k {self.reid_k}")
        for m in self.methods or ["adapter"]:
            self.ft(m, 1.0)

    @property
    def chance(self) -> float:
        """Chance of one-to-one re-identification among ``reid_k`` same-class candidates."""
        return 1.0 / int(self.reid_k)

    def draw_seeds(self) -> list[int]:
        """The seeds of the private batches drawn at every point: ``draw_seed .. draw_seed + images - 1``."""
        return [int(self.draw_seed) + i for i in range(int(self.images))]

    def label(self, method: str) -> str:
        """``method`` as tables and charts name it (CoOp's context kind and DP site when not the default)."""
        if method != "coop":
            return method
        parts = [method + (" class-specific" if self.finetune.get("class_specific") else "")]
        if self.finetune.get("dp_site", "parameters") != "parameters":
            parts.append(f"DP at the {self.finetune['dp_site']}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epsilons"] = [eps_text(e) for e in self.epsilons]
        return d

    def ft(self, method: str, eps: float, canaries: int = 0) -> FinetuneConfig:
        ft = dict(self.finetune)
        site = ft.pop("dp_site", "parameters")
        if method != "coop":  # CoOp-only options
            ft.pop("class_specific", None)
            site = "parameters"
        base = FinetuneConfig(**{**ft, "method": method, "seed": self.seed})
        if math.isinf(eps):
            return base
        return FinetuneConfig(**{**base.to_dict(), "dp": "per-example", "dp_site": site, "epsilon": float(eps),
                                 "delta": self.delta, "canaries": canaries})


def saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config as ``cells.json`` saved it, with the settings added since filled in at their defaults (an
    audit folder written before ``draw_seed`` existed drew seeds 0..images-1: draw seed 0)."""
    return {"draw_seed": 0, **config}


def eps_text(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def parse_epsilons(text: str) -> list[float]:
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if not t:
            continue
        try:
            out.append(math.inf if t in ("inf", "infinity", "none") else float(t))
        except ValueError as e:
            raise ClipleakError(f"epsilons are numbers or inf, got {t!r}") from e
    return out


Key = tuple[str, str, int, float, int]
"""A cell: (kind, method, batch size, epsilon, observation number); kind is ``acc``, ``canary`` or ``obs``."""


def cell_keys(cfg: AuditConfig) -> list[Key]:
    """Every cell of the sweep in the order they run."""
    keys: list[Key] = []
    for method in cfg.methods:
        for eps in cfg.epsilons:
            keys.append(("acc", method, 0, eps, 0))
            if cfg.canaries and not math.isinf(eps):
                keys.append(("canary", method, 0, eps, 0))
            for b in cfg.batch_sizes:
                keys.extend(("obs", method, int(b), eps, i) for i in range(cfg.images))
    return keys


def key_text(kind: str, method: str, b: int, eps: float, i: int) -> str:
    """The name of a cell in ``cells.json`` (an observation's number ``i``, not its draw seed)."""
    if kind == "obs":
        return f"obs|{method}|b{b}|eps{eps_text(eps)}|{i}"
    return f"{kind}|{method}|eps{eps_text(eps)}"
