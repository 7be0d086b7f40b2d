"""Named local artifacts: target CLIPs that clipleak pretrains itself, once, and then reuses.

``build_model("tiny-32", "tiny-mnist")`` (or ``--weights tiny-mnist`` on the command line) resolves the
name to ``<cache>/tiny-mnist.safetensors``; the first use trains it with :func:`clipleak.pretrain.pretrain`
on the public MNIST split (a one-time cost of 10-15 minutes on 2 CPU cores) and every later use loads the
file. The cache folder is ``$CLIPLEAK_CACHE`` or ``~/.cache/clipleak``. A model card
(``<name>.card.json``) lies beside each file; a file whose card does not match the registered recipe
(or whose SHA-256 does not match its card) is rebuilt. Training is deterministic for a fixed thread
count, so a rebuilt artifact is the same model up to floating-point differences between machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ClipleakError
from .pretrain import PretrainConfig, ProgressFn, card_path, checkpoint_dir, pretrain


@dataclass(frozen=True)
class Artifact:
    """A registered artifact: a name, what it is, and the recipe that builds it."""

    name: str
    description: str
    config: PretrainConfig
    threads: int | None = 1  # torch threads for the build (see :func:`resolve`)


def _tiny_mnist() -> PretrainConfig:
    # Measured on 2 idle CPU cores: this recipe (time-budget schedule) reached 96.4% zero-shot on the
    # private split after 1,497 steps (111 s of training); see benchmarks/pretrain.py and the card's numbers.
    return PretrainConfig(arch="tiny-32", data="mnist", split_seed=0, steps=1500, batch_size=32, lr=1e-3,
                          weight_decay=0.1, warmup_steps=200, seed=0, augment=True, patch_dropout=0.0,
                          caption_sampling="per-class", checkpoint_every=300)


_REGISTRY: dict[str, Callable[[], PretrainConfig]] = {"tiny-mnist": _tiny_mnist}
_DESCRIPTIONS = {
    "tiny-mnist": "tiny-32 CLIP pretrained on the public MNIST split (4,000 digits, 12 caption templates)",
}


def names() -> list[str]:
    """Registered artifact names."""
    return sorted(_REGISTRY)


def is_artifact(name: object) -> bool:
    """Whether ``name`` is a registered artifact name (not a path)."""
    return isinstance(name, str) and name in _REGISTRY


def get(name: str) -> Artifact:
    """The registered artifact ``name`` (its recipe is rebuilt fresh on every call)."""
    if not is_artifact(name):
        raise ClipleakError(f"unknown artifact {name!r}; registered: {', '.join(names())}")
    return Artifact(name, _DESCRIPTIONS.get(name, ""), _REGISTRY[name]())


def cache_dir() -> Path:
    """``$CLIPLEAK_CACHE`` if set, else ``~/.cache/clipleak`` (not created here)."""
    env = os.environ.get("CLIPLEAK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clipleak"


def path_of(name: str) -> Path:
    """Where artifact ``name``'s weights live (whether or not it has been built)."""
    get(name)
    return cache_dir() / f"{name}.safetensors"


def _is_current(name: str, path: Path) -> bool:
    cp = card_path(path)
    if not path.is_file() or not cp.is_file():
        return False
    try:
        card = json.loads(cp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    from .models import arch_config, file_sha256

    cfg = get(name).config
    if card.get("config") != cfg.to_dict() or card.get("stopped_early"):
        return False
    if card.get("arch_config") != arch_config(cfg.arch):  # the architecture's definition changed
        return False
    return card.get("weights_sha256") == file_sha256(path)


def card(name: str) -> dict[str, Any] | None:
    """The model card of a built artifact, or ``None`` if it has not been built."""
    cp = card_path(path_of(name))
    return json.loads(cp.read_text()) if cp.is_file() else None


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock file so that two processes do not train the same artifact at once."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def _default_progress(name: str) -> ProgressFn:
    state = {"last": 0.0}

    def cb(step: int, total: int, info: dict[str, Any]) -> None:
        now = time.monotonic()
        phase = info.get("phase")
        if phase == "train" and now - state["last"] < 10 and step != total:
            return
        state["last"] = now
        if phase == "train":
            print(f"[clipleak] pretraining {name}: step {step}/{total}, loss {info['loss']:.3f}, "
                  f"{info['elapsed_s']:.0f} s", file=sys.stderr, flush=True)
        elif phase == "eval":
            print(f"[clipleak] pretraining {name}: measuring zero-shot accuracy", file=sys.stderr, flush=True)

    return cb


def resolve(name: str, progress: ProgressFn | None = None, *, rebuild: bool = False) -> Path:
    """Path of artifact ``name``'s weights, pretraining it first if needed (one time only).

    A half-finished build (interrupted) resumes from its checkpoint. ``progress`` gets the training
    progress (default: a line on stderr every 10 s). The build runs on ``Artifact.threads`` torch threads
    (1 for ``tiny-mnist``): the weights are then bitwise the same on any machine with the same CPU
    instruction set whatever its core count, and on a machine shared with other busy processes one
    thread was 4-6x faster than two (two threads wait on each other at every operation).
    """
    art = get(name)
    path = path_of(name)
    if not rebuild and _is_current(name, path):
        return path
    with _build_lock(path):
        if not rebuild and _is_current(name, path):  # built by another process meanwhile
            return path
        print(f"[clipleak] artifact {name!r} is not in {cache_dir()} yet: one-time pretraining "
              f"({art.description}); later uses load the file.", file=sys.stderr, flush=True)
        cb = progress or _default_progress(name)
        if checkpoint_dir(path).is_dir() and not rebuild:
            try:
                pretrain(art.config, path, resume=True, progress=cb, threads=art.threads)
            except ClipleakError as e:  # a checkpoint of an older recipe, or a damaged one
                print(f"[clipleak] not resuming ({e}); starting over", file=sys.stderr, flush=True)
                pretrain(art.config, path, resume=False, progress=cb, threads=art.threads)
        else:
            pretrain(art.config, path, resume=False, progress=cb, threads=art.threads)
        if not _is_current(name, path):
            raise ClipleakError(f"building artifact {name!r} did not produce a usable file at {path}")
    return path
