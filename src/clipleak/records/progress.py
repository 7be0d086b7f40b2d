"""One progress-report type for every long-running job (attacks, pretraining, prior training, sweeps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgressEvent:
    """Where a long job stands.

    ``task`` names the job (``"attack ig"``, ``"pretrain tiny-mnist"``, ...); ``step`` counts finished
    steps out of ``total`` (``None`` while unknown, e.g. while a time budget is being calibrated);
    ``phase`` is ``"load"``, ``"run"``, ``"eval"`` or ``"done"``; ``values`` holds numbers worth showing
    (loss, lr, restart, elapsed seconds, accuracy); ``note`` a short text (what is being loaded).
    """

    task: str
    step: int
    total: int | None
    phase: str = "run"
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""


ProgressFn = Callable[[ProgressEvent], None]
"""A callback that receives :class:`ProgressEvent` objects (the CLI draws them as rich progress bars)."""
