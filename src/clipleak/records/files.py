"""Files written so that a kill at any moment leaves the old version or the new one, never half of either.

:func:`write_atomic` writes one file through a temporary file in the same folder and ``os.replace`` (atomic on
one file system). :func:`write_checkpoint` writes a checkpoint of several files as a folder
``<root>/step-NNNNNNN/``: the new folder is complete before the pointer ``<root>/latest`` is switched to it
(atomically) and before the older folder is removed, so there is always a loadable checkpoint.
:func:`load_checkpoint` turns a damaged one into a one-line :class:`~clipleak.errors.ClipleakError`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ClipleakError

LATEST = "latest"
STATE = "state.json"
_PREFIX = "step-"
_TMP = ".tmp-"

T = TypeVar("T")

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)``, which creates the file ``tmp`` in the same folder; ``tmp`` then
    replaces ``path`` in one step. On any failure (an interrupt included) the temporary file is removed and
    ``path`` is left as it was."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{_TMP}{p.name}-", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # the permissions a plain open() would give, not mkstemp's 0600
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """``obj`` as JSON (serialised before anything is written, so an unserialisable value leaves no file)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def write_checkpoint(root: str | Path, step: int, state: dict[str, Any],
                     write_files: Callable[[Path], object] | None = None) -> Path:
    """Write the checkpoint of ``step`` as ``root/step-NNNNNNN/``: ``write_files(folder)`` puts its tensor
    files there, then ``state`` goes to ``state.json``; point ``root/latest`` at it and remove the older
    ones; returns the new folder.

    A kill before the switch leaves the previous checkpoint as the latest, one after it the new one; a
    temporary folder left by a killed write is removed by the next one."""
    r = Path(root)
    r.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{int(step):07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{name}-", dir=r))
    try:
        if write_files is not None:
            write_files(tmp)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        final, k = r / name, 1
        while final.exists():  # the same step saved twice: the one `latest` names stays until the switch
            final, k = r / f"{name}.{k}", k + 1
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(r / LATEST, final.name)
    for old in r.iterdir():
        if old.is_dir() and old != final and old.name.startswith((_PREFIX, _TMP)):
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_file() and old.name.startswith(f"{_TMP}{LATEST}-"):  # a killed pointer switch's
            old.unlink(missing_ok=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``root/latest`` names, or ``None`` when there is no checkpoint under ``root``."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    return Path(root) / latest.read_text().strip()


def load_checkpoint(root: str | Path, read_files: Callable[[Path], T], *,
                    hint: str) -> tuple[dict[str, Any], T] | None:
    """The latest checkpoint under ``root`` as its ``state.json`` and ``read_files(folder)``; ``None`` when
    there is none. Any I/O or format error (a truncated ``state.json``, a missing tensor file) becomes one
    line naming the checkpoint and how to go on (``hint``, e.g. "delete it to start over")."""
    folder = latest_checkpoint(root)
    if folder is None:
        return None
    try:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder.name} is missing")
        return _read_state(folder), read_files(folder)
    except Exception as e:  # noqa: BLE001 - json, safetensors and torch raise several kinds for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ClipleakError(f"checkpoint {folder} is damaged ({type(e).__name__}: {first}); {hint}") from e


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{STATE} is not valid JSON, {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} is not a JSON object")
    return state
