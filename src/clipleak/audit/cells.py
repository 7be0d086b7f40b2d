"""What an audit sweeps and how its cells are named: :class:`AuditConfig`, the cell keys, the draw seeds.

Both the sweep (:mod:`.sweep`, which computes cells) and the summary (:mod:`.summary`, which reads them)
import from here; neither imports the other's internals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..attacks import attack_spec
from ..errors import ClipleakError, check_range
from ..peft import FLAT_PEFT_KEYS, PeftConfig
from ..privacy import Defense, level_defense, parse_defense_sweep
from ..training import FinetuneConfig, finetune_dp
from ..training.finetune import FLAT_DEFAULTS

MAX_IMAGES = 10_000
"""Observations per point at most: a larger audit is refused before any cell list is built."""
MAX_CANARIES = 100_000
DEFAULT_EPSILONS = (math.inf, 100.0, 30.0, 10.0, 3.0, 1.0)
DEFAULT_TARGET = ("tiny-mnist", "mnist")
"""The target and data whose decoder ships with the package (``tiny-mnist-decoder``): ``--decoder auto``
names it there and builds one from the public split everywhere else."""
AUTO_DECODER = "auto"
DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_DECODER_SECONDS = 300.0
"""The time budget of an automatically built decoder (:mod:`.decoder`), when none is given."""


@dataclass
class AuditConfig:
    """What the audit sweeps and the schedule its epsilons are calibrated for.

    ``seed`` seeds the DP noise of the shared observations, the DP fine-tuning's batches and noise, and the
    canaries; ``draw_seed`` picks which private digits are attacked: observation ``i`` of a point draws its
    batch with seed ``draw_seed + i`` (:meth:`draw_seeds`).

    ``arch`` is the target's architecture (None: the one its card records, else tiny-32); ``data`` any
    data set name or ``folder:PATH`` (class names from the sub-folders), split by ``split_seed``;
    ``prompt_template`` builds the class prompts, of ``classnames`` when given (in the order of the data's
    labels: a folder's sorted sub-folders), else of the data's own class names. ``decoder="auto"`` is the
    shipped ``tiny-mnist-decoder`` for the default target and data, else a decoder trained on the public
    split for these weights within ``decoder_seconds`` (cached, :mod:`.decoder`).

    ``defense`` (e.g. ``"prune:1,0.1,0.01,0.001"`` or ``"quantize:32,8,4,1"``; :mod:`clipleak.privacy.defenses`)
    sweeps an update defense without noise instead of epsilon: its levels are the audit's points (larger
    is weaker for every kind; prune 1, quantize 32 and clip inf are no defense), each applied to the attacked
    observations and to every step of the fine-tuning; ``epsilons`` must then be ``[inf]`` (no DP)."""

    epsilons: list[float] = field(default_factory=lambda: list(DEFAULT_EPSILONS))
    methods: list[str] = field(default_factory=lambda: ["adapter", "coop"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    attack: str = "featmatch"
    images: int = 8
    weights: str = "tiny-mnist"
    decoder: str | None = "tiny-mnist-decoder"
    iterations: int = 0
    data: str = "mnist"
    split_seed: int = 0
    arch: str | None = None
    prompt_template: str = DEFAULT_TEMPLATE
    classnames: list[str] | None = None
    decoder_seconds: float = DEFAULT_DECODER_SECONDS
    delta: float = 1e-5
    finetune: dict[str, Any] = field(default_factory=lambda: {"steps": 200, "batch_size": 25, "clip": 0.01,
                                                               "lr": 1e-2, "sampling": "poisson"})
    canaries: int = 1000
    reid_k: int = 10
    seed: int = 0
    draw_seed: int = 0
    defense: str | None = None

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
        if self.defense is not None:
            parse_defense_sweep(self.defense)
            if tuple(self.epsilons) == DEFAULT_EPSILONS:  # not chosen: a defense audit runs without DP
                self.epsilons = [math.inf]
            if [e for e in self.epsilons if not math.isinf(e)]:
                raise ClipleakError("--defense sweeps an update defense instead of epsilon: leave --epsilons out "
                                    "(or give inf)")
        for m in self.methods or ["adapter"]:
            self.ft(m, 1.0 if self.defense is None else self.points[0])
        if self.classnames is not None and (not self.classnames or any(not str(c).strip() for c in self.classnames)):
            raise ClipleakError("--classnames: give one non-empty name per class, comma-separated")
        if "{}" not in self.prompt_template:
            raise ClipleakError(f"the prompt template must hold {{}} where the class name goes, got "
                                f"{self.prompt_template!r}")
        check_range("--decoder-seconds", self.decoder_seconds, low=0, high=7 * 24 * 3600.0, low_open=True)
        if self.decoder == AUTO_DECODER and (self.weights, self.data) == DEFAULT_TARGET and self.split_seed == 0 \
                and self.arch in (None, "tiny-32"):
            self.decoder = "tiny-mnist-decoder"  # recorded as audits before "auto" existed recorded it

    @property
    def points(self) -> list[float]:
        """The swept axis: the epsilons, or the defense's levels in a defense audit."""
        return self.epsilons if self.defense is None else parse_defense_sweep(self.defense)[1]

    @property
    def axis(self) -> str:
        """What the points are, as cell names spell it: ``eps``, or the defense's kind (``prune``, ...)."""
        return "eps" if self.defense is None else parse_defense_sweep(self.defense)[0]

    def point_defense(self, point: float) -> Defense | None:
        """The update defense of a point (``None`` in an epsilon audit, or at the no-defense level; inf is
        no defense for every kind, as it is no DP)."""
        if self.defense is None or math.isinf(point):
            return None
        d = level_defense(self.axis, point)
        return None if d.is_identity else d

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
        if d["defense"] is None:  # epsilon audits written before the defense axis existed stay resumable
            d.pop("defense")
        return d

    def ft(self, method: str, eps: float, canaries: int = 0) -> FinetuneConfig:
        """The fine-tuning of a point: DP at epsilon ``eps``, or in a defense audit (``eps`` then the level)
        the defense on every step and no DP. ``finetune`` holds the schedule and the flat options the audit
        takes (``clip``, ``class_specific``, ``dp_site``, ``n_ctx``, ...): they become the config's
        PeftConfig and DpSetting here."""
        ft = dict(self.finetune)
        site = ft.pop("dp_site", "parameters")
        clip = float(ft.pop("clip", FLAT_DEFAULTS["clip"]))
        accountant = str(ft.pop("accountant", FLAT_DEFAULTS["accountant"]))
        peft = {k: ft.pop(k) for k in FLAT_PEFT_KEYS if k in ft}
        if method != "coop":  # CoOp-only options
            peft.pop("class_specific", None)
            site = "parameters"
        cfg = PeftConfig.from_flat(peft, method=method)
        base = FinetuneConfig(**{**ft, "peft": cfg, "seed": self.seed})
        if self.defense is not None:
            d = self.point_defense(eps)
            return base if d is None else replace(base, defense=d.spec)
        if math.isinf(eps):
            return base
        dp = finetune_dp("per-example", clip=clip, epsilon=float(eps), delta=self.delta, accountant=accountant,
                         site=site)
        return replace(base, dp=dp, canaries=canaries)


def saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config as ``cells.json`` saved it, with the settings added since filled in at their defaults (an
    audit folder written before ``draw_seed`` existed drew seeds 0..images-1: draw seed 0; one written
    before ``arch``, ``prompt_template``, ``classnames`` and ``decoder_seconds`` used the card's
    architecture, the default template and the data's class names, and named its decoder)."""
    return {"draw_seed": 0, "arch": None, "prompt_template": DEFAULT_TEMPLATE, "classnames": None,
            "decoder_seconds": DEFAULT_DECODER_SECONDS, **config}


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
"""A cell: (kind, method, batch size, point, observation number); kind is ``acc``, ``canary`` or ``obs``; the
point is an epsilon, or a defense level in a defense audit."""


def cell_keys(cfg: AuditConfig) -> list[Key]:
    """Every cell of the sweep in the order they run."""
    keys: list[Key] = []
    for method in cfg.methods:
        for eps in cfg.points:
            keys.append(("acc", method, 0, eps, 0))
            if cfg.canaries and cfg.defense is None and not math.isinf(eps):
                keys.append(("canary", method, 0, eps, 0))
            for b in cfg.batch_sizes:
                keys.extend(("obs", method, int(b), eps, i) for i in range(cfg.images))
    return keys


def key_text(kind: str, method: str, b: int, eps: float, i: int, axis: str = "eps") -> str:
    """The name of a cell in ``cells.json`` (an observation's number ``i``, not its draw seed); ``axis``
    names the point (``eps``, or a defense audit's kind: ``obs|adapter|b1|prune0.1|0``)."""
    if kind == "obs":
        return f"obs|{method}|b{b}|{axis}{eps_text(eps)}|{i}"
    return f"{kind}|{method}|{axis}{eps_text(eps)}"
