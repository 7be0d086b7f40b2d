"""What every command shares: the console, help texts that wrap to the terminal, one progress bar for
every long job (attacks, pretraining, prior training), the check that an output can be written (made before
any work), and what an interrupted command tells its user."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

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

from ..devices import DEVICE_HELP, check_device_spec
from ..errors import ClipleakError
from ..records import ProgressEvent, ProgressFn

console = Console(stderr=True)

#: ``--device`` on every command that computes: ``device: DeviceOpt = "auto"``. The spelling is checked at
#: parse time (before torch is imported); availability when the command resolves it.
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP, callback=lambda v: check_device_spec(v))]


def helptext(doc: str | None) -> str:
    """A docstring as help: paragraphs kept, the line breaks inside them removed, so that the terminal
    wraps them at its own width (a hard break at 100 columns reads raggedly in an 80-column console)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


class Interrupted(Exception):
    """A command stopped by Ctrl-C (SIGINT); the message says what was kept and how to go on."""


def _kept(out: Any, what: str, rerun: str) -> str:
    return f"{what} kept in {out}; {rerun}" if out is not None else rerun


def interrupt_note(fn: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    """What an interrupted run of command ``fn`` (called with ``kwargs``) leaves and how to resume it."""
    key = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
    out = kwargs.get("out")
    if key == "attack.attack":
        if kwargs.get("resume", True):
            return _kept(Path(out) / "checkpoint" if out is not None else None, "finished restarts are",
                         "rerun the same command to resume")
        return "nothing was kept (--no-resume); rerun the command to start over"
    if key in ("train.pretrain", "train.prior_train"):
        ckpt = Path(out).with_name(Path(out).stem + ".ckpt") if out is not None else None
        return _kept(ckpt, "the latest checkpoint is", "rerun the same command with --resume to continue")
    if key == "train.train":
        return _kept(out, "the latest checkpoint is", "rerun the same command with --resume to continue")
    if key == "audit.audit":
        return _kept(Path(out) / "cells.json" if out is not None else None, "finished cells are",
                     "rerun the same command to continue")
    if key == "fl.run":
        return _kept(out, "finished rounds are", "rerun the same command to continue")
    return "nothing was kept; rerun the command to start over (artifacts it built are cached)"


def command(app: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@command(app)``: register a function as a command whose help is its docstring, rewrapped.

    Ctrl-C inside the command becomes :class:`Interrupted`, whose message names what the run kept and how
    to resume it (the entry point prints it and exits with 130)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted(interrupt_note(fn, kwargs)) from None

        app.command(name, help=helptext(fn.__doc__))(run)
        return fn

    return deco


def check_writable(path: str | Path, *, folder: bool, option: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written: a folder output (``folder=True``) that
    names an existing file, a file output that names an existing folder, or a place where the nearest
    existing folder is not a folder or cannot be written (a probe file is created there and removed, so a
    read-only file system is caught even for root). Nothing is created."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ClipleakError(f"{option} {p} is an existing file; give a folder")
    if not folder and p.is_dir():
        raise ClipleakError(f"{option} {p} is an existing folder; give a file name")
    base = p if folder else p.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ClipleakError(f"{option} {p}: {base} is a file, so no folder can be created under it")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".clipleak-probe-"):
            pass
    except OSError as e:
        raise ClipleakError(f"{option} {p}: cannot write in {base} ({e.strerror or e})") from e
    if not os.access(base, os.W_OK | os.X_OK):
        raise ClipleakError(f"{option} {p}: {base} is not writable")
    return p


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

