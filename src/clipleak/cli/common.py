"""What every command shares: the console, help texts that wrap to the terminal, and one progress bar
for every long job (attacks, pretraining, prior training)."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ClipleakError
from ..records import ProgressEvent, ProgressFn

console = Console(stderr=True)


def helptext(doc: str | None) -> str:
    """A docstring as help: paragraphs kept, the line breaks inside them removed, so that the terminal
    wraps them at its own width (a hard break at 100 columns reads raggedly in an 80-column console)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def command(app: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@command(app)``: register a function as a command whose help is its docstring, rewrapped."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        app.command(name, help=helptext(fn.__doc__))(fn)
        return fn

    return deco


def _fmt(values: dict[str, float]) -> str:
    parts = []
    for k, v in values.items():
        if k == "elapsed_s" or not isinstance(v, int | float) or math.isnan(v):
            continue
        if k == "restart":
            parts.append(f"restart {int(v)}")
        elif k == "lr":
            parts.append(f"lr {v:.1e}")
        elif k == "accuracy":
            parts.append(f"accuracy {v:.1%}")
        else:
            parts.append(f"{k} {v:.4f}")
    return " ".join(parts[:4])


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressFn]:
    """A rich progress display; the yielded callback draws one bar per task from
    :class:`~clipleak.records.ProgressEvent` s."""
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=False)
    tasks: dict[str, TaskID] = {}

    def cb(ev: ProgressEvent) -> None:
        if ev.task not in tasks:
            tasks[ev.task] = prog.add_task(ev.task, total=ev.total, info="")
        info = ev.note or _fmt(ev.values)
        prog.update(tasks[ev.task], completed=ev.step, total=ev.total, info=info)

    with prog:
        yield cb


def parse_ints(text: str | None) -> list[int] | None:
    """``"3,5"`` -> ``[3, 5]``; empty -> None."""
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ClipleakError(f"expected comma-separated integers, got {text!r}") from e
