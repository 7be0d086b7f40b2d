"""The one training loop: a schedule fitted to a step count or a time budget, checkpoints, progress.

Pretraining a target, training a prior and (later) private fine-tuning differ in their step function
only. The loop calls ``step(s, total)`` for ``s = start, start + 1, ...``; ``total`` is the planned
schedule length (the step function derives its learning rate from it), or ``None`` while a time
budget is being calibrated: then the speed of a few steps after the first (which is slower) fixes the
schedule length, and the plan is kept from then on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ClipleakError
from ..records import ProgressEvent, ProgressFn

CALIBRATION_STEPS = 3


@dataclass
class Budget:
    """``steps`` fixes the schedule (deterministic); ``seconds`` alone fits the schedule to the budget;
    both: ``seconds`` is a hard stop. ``seconds`` counts training time only."""

    steps: int | None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ClipleakError("give the number of steps, a time budget, or both")
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) < 1):
            raise ClipleakError(f"steps must be a positive integer, got {self.steps!r}")
        if self.seconds is not None and not float(self.seconds) > 0:
            raise ClipleakError(f"time budget must be positive, got {self.seconds!r} s")


@dataclass
class LoopState:
    """Where a run stands; checkpoints store it and a resumed run continues from it."""

    step: int = 0
    total: int | None = None
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    stopped: str | None = None
    completed: bool = False

    def running_loss(self, window: int = 20) -> float:
        """Mean of the last ``window`` losses (NaN before the first step)."""
        return float(np.mean(self.losses[-window:])) if self.losses else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total, "train_seconds": self.train_seconds,
                "losses": list(self.losses), "curve": list(self.curve)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        return cls(step=int(d["step"]), total=d.get("total_steps"), train_seconds=float(d["train_seconds"]),
                   losses=list(d.get("losses", [])), curve=list(d.get("curve", [])))


StepFn = Callable[[int, int | None], float]
"""``step(s, total) -> loss``: one optimisation step ``s`` (0-based) of a schedule of ``total`` steps."""


def train_loop(
    step: StepFn,
    budget: Budget,
    *,
    task: str,
    state: LoopState | None = None,
    progress: ProgressFn | None = None,
    checkpoint: Callable[[LoopState], None] | None = None,
    checkpoint_every: int = 10**9,
    evaluate: Callable[[LoopState], dict[str, float]] | None = None,
    eval_every_s: float | None = None,
    stop_after: int | None = None,
    lr_of: Callable[[int, int | None], float] | None = None,
) -> LoopState:
    """Run ``step`` until the schedule ends or the time budget runs out; returns the final state.

    Args:
        state: a resumed run's state (its planned ``total`` is kept).
        checkpoint: called every ``checkpoint_every`` steps (not at the last one) and when the time
            budget stops the run, so a later run with a larger budget can resume.
        evaluate: called every ``eval_every_s`` seconds of training (not counted as training time);
            its numbers go into ``state.curve`` with the step and the seconds.
        stop_after: abandon the run after that many steps as if the process had been killed (for tests
            of resuming): no checkpoint at that step, ``completed`` stays False.
        lr_of: the learning rate of a step, shown in progress events.
    """
    st = state if state is not None else LoopState(total=budget.steps)
    if st.total is None:
        st.total = budget.steps
    calib: tuple[int, float] | None = None
    next_eval = (len(st.curve) + 1) * eval_every_s if eval_every_s else math.inf

    def notify(phase: str, **values: float) -> None:
        if progress is not None:
            progress(ProgressEvent(task, st.step, st.total, phase=phase,
                                   values={"loss": st.running_loss(), "elapsed_s": st.train_seconds, **values}))

    while st.total is None or st.step < st.total:
        if budget.seconds is not None and st.train_seconds >= budget.seconds:
            st.stopped = f"time budget of {budget.seconds:g} s reached at step {st.step}"
            break
        t0 = time.perf_counter()
        loss = step(st.step, st.total)
        st.step += 1
        st.losses.append(float(loss))
        if st.total is None:  # fit the schedule to the time budget from the speed of a few steps
            now = time.perf_counter()
            if calib is None:
                calib = (st.step, now)  # the first step of a process is slower: measure from the next
            elif st.step - calib[0] >= CALIBRATION_STEPS:
                assert budget.seconds is not None
                per_step = (now - calib[1]) / (st.step - calib[0])
                st.total = max(st.step + 1, int(budget.seconds / per_step))
        if checkpoint is not None and st.step % checkpoint_every == 0 and (st.total is None or st.step < st.total):
            checkpoint(st)
        st.train_seconds += time.perf_counter() - t0
        notify("run", **({"lr": lr_of(st.step - 1, st.total)} if lr_of is not None else {}))
        if evaluate is not None and st.train_seconds >= next_eval:
            point = evaluate(st)
            st.curve.append({"train_seconds": round(st.train_seconds, 2), "step": st.step, **point})
            notify("eval", **point)
            next_eval = (len(st.curve) + 1) * float(eval_every_s or math.inf)
        if stop_after is not None and st.step >= stop_after and (st.total is None or st.step < st.total):
            return st
    if st.total is None:  # the budget ran out before the speed was measured
        st.total = st.step
    if st.stopped is not None and checkpoint is not None:
        checkpoint(st)
    st.completed = True
    notify("done")
    return st
