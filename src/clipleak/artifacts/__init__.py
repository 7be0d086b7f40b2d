"""Named local artifacts: the one registry that turns a name like ``tiny-mnist`` into a file.

Targets (CLIPs that clipleak pretrains itself on a public split) and priors (a VAE, a feature decoder
for a target) are registered here with the recipe that builds them. :func:`resolve` returns the file
in the cache folder (``$CLIPLEAK_CACHE`` or ``~/.cache/clipleak``), building it on first use, and
rebuilding it when its card does not match the registered recipe (the recipe, the architecture's
definition, or, for a decoder, the target it was trained for), or when the file does not match its
card. A half-finished target build resumes from its checkpoint. Builds are locked, so two processes
never train the same artifact at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ClipleakError
from ..models import arch_config, card_path, file_sha256, read_card
from ..priors import save_prior
from ..records import ProgressFn, write_atomic
from ..training import (
    DEFAULT_CNN_STEPS,
    DEFAULT_DECODER_STEPS,
    DEFAULT_VAE_STEPS,
    PretrainConfig,
    PriorCheckpoints,
    build_prior,
    checkpoint_dir,
    pretrain,
)


@dataclass(frozen=True)
class PriorRecipe:
    """How a named prior is built: kind, target artifact, data and training schedule."""

    kind: str
    target: str  # a registered target (the decoder's frozen CLIP; the VAE only takes its resolution)
    arch: str
    data: str = "mnist"
    split_seed: int = 0
    steps: int = 2000
    seed: int = 0
    latent: int = 32
    augment_copies: int = 0  # decoder: small random affine copies of every public image
    base: int = 64  # decoder: widest channel count
    work_size: int | None = None  # decoder: the side its convolutions work at (None: the image size)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # fields at their defaults are left out, so that cards written before they existed stay current
        if not self.augment_copies:
            del out["augment_copies"]
        if self.base == 64:
            del out["base"]
        if self.work_size is None:
            del out["work_size"]
        return out


@dataclass(frozen=True)
class Artifact:
    """A registered artifact: its name, what it is, and the recipe that builds it."""

    name: str
    description: str
    recipe: PretrainConfig | PriorRecipe
    threads: int | None = 1  # torch threads for a target build (bitwise reproducible; see resolve)

    @property
    def kind(self) -> str:
        return "target" if isinstance(self.recipe, PretrainConfig) else self.recipe.kind


def _tiny_mnist() -> PretrainConfig:
    # Measured on 2 idle CPU cores: this recipe reached 96.4% zero-shot on held-out digits after 1,497
    # steps (111 s of training); see benchmarks/pretrain.py and the card's numbers.
    return PretrainConfig(arch="tiny-32", data="mnist", split_seed=0, steps=1500, batch_size=32, lr=1e-3,
                          weight_decay=0.1, warmup_steps=200, seed=0, augment=True, patch_dropout=0.0,
                          caption_sampling="per-class", checkpoint_every=300)


def _tiny_mnist_64() -> PretrainConfig:
    # tiny-mnist's recipe on the tiny-64 architecture (64 px, patch 8: 64 tokens, width 192): GradViT's
    # second, harder full-visual target (issue 16)
    return replace(_tiny_mnist(), arch="tiny-64")


def _tiny_mnist_224() -> PretrainConfig:
    # tiny-mnist's recipe on the tiny-224 architecture: ViT-B-32's geometry (224 px, patch 32: 7 x 7 tokens and a
    # class token), narrow and shallow (width 128, 4 layers) so that it trains on one CPU thread; the real-size
    # path's trained target (issue 27). It learns more slowly than tiny-32 (its class token pools what tiny-32
    # averages), so its schedule is three times as long: chosen on the validation split's zero-shot accuracy
    # (docs/artifacts.md)
    return replace(_tiny_mnist(), arch="tiny-224", steps=4500)


REGISTRY: dict[str, Callable[[], Artifact]] = {
    "tiny-mnist": lambda: Artifact("tiny-mnist", "tiny-32 CLIP pretrained on the public MNIST split (4,000 digits, "
                                   "12 caption templates)", _tiny_mnist()),
    "tiny-mnist-vae": lambda: Artifact("tiny-mnist-vae", "convolutional VAE (latent 32) on the public MNIST split",
                                       PriorRecipe("vae", "tiny-mnist", "tiny-32", steps=DEFAULT_VAE_STEPS)),
    "tiny-mnist-decoder": lambda: Artifact("tiny-mnist-decoder", "feature-to-image decoder for tiny-mnist, trained "
                                           "on the public MNIST split",
                                           PriorRecipe("decoder", "tiny-mnist", "tiny-32",
                                                       steps=DEFAULT_DECODER_STEPS)),
    "tiny-mnist-decoder-aug": lambda: Artifact("tiny-mnist-decoder-aug", "feature-to-image decoder for tiny-mnist "
                                               "trained on the public MNIST split plus 2 random affine copies of "
                                               "every digit, twice the channels, 4,000 steps (21.5 dB on validation "
                                               "against 20.3)",
                                               PriorRecipe("decoder", "tiny-mnist", "tiny-32", steps=4000,
                                                           augment_copies=2, base=128)),
    "tiny-mnist-cnn": lambda: Artifact("tiny-mnist-cnn", "GradViT's prior network: a BatchNorm CNN classifier "
                                       "trained on the public MNIST split, BN statistics calibrated there",
                                       PriorRecipe("cnn", "tiny-mnist", "tiny-32", steps=DEFAULT_CNN_STEPS)),
    "tiny-mnist-64": lambda: Artifact("tiny-mnist-64", "tiny-64 CLIP (64 px, 64 tokens) pretrained on the public "
                                      "MNIST split with tiny-mnist's recipe", _tiny_mnist_64()),
    "tiny-mnist-64-decoder": lambda: Artifact("tiny-mnist-64-decoder", "feature-to-image decoder for tiny-mnist-64 "
                                              "(64 px): tiny-mnist-decoder's recipe, trained on the public MNIST "
                                              "split", PriorRecipe("decoder", "tiny-mnist-64", "tiny-64",
                                                                   steps=DEFAULT_DECODER_STEPS)),
    "tiny-mnist-64-cnn": lambda: Artifact("tiny-mnist-64-cnn", "GradViT's prior network for 64 px: tiny-mnist-cnn's "
                                          "recipe at 64 px", PriorRecipe("cnn", "tiny-mnist-64", "tiny-64",
                                                                         steps=DEFAULT_CNN_STEPS)),
    "tiny-mnist-224": lambda: Artifact("tiny-mnist-224", "tiny-224 CLIP (ViT-B-32's geometry: 224 px, patch 32, "
                                       "49 tokens + class token; width 128, 4 layers) pretrained on the public "
                                       "MNIST split at 224 px with tiny-mnist's recipe", _tiny_mnist_224()),
    "tiny-mnist-224-decoder": lambda: Artifact("tiny-mnist-224-decoder", "feature-to-image decoder for "
                                               "tiny-mnist-224 (224 px): tiny-mnist-decoder-aug's recipe (2 random "
                                               "affine copies of every public digit, twice the channels, 4,000 "
                                               "steps) with its convolutions and its loss at MNIST's own 28 px "
                                               "(resized to 224)",
                                               PriorRecipe("decoder", "tiny-mnist-224", "tiny-224",
                                                           steps=4000, augment_copies=2, base=128, work_size=28)),
}
"""Name -> a function that returns the artifact with a fresh recipe (tests register small ones here)."""


def names() -> list[str]:
    """Registered artifact names."""
    return sorted(REGISTRY)


def is_artifact(name: object) -> bool:
    """Whether ``name`` is a registered artifact name (not a path)."""
    return isinstance(name, str) and name in REGISTRY


def get(name: str) -> Artifact:
    """The registered artifact ``name`` (its recipe is rebuilt fresh on every call)."""
    if name not in REGISTRY:
        raise ClipleakError(f"unknown artifact {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def cache_dir() -> Path:
    """``$CLIPLEAK_CACHE`` if set, else ``~/.cache/clipleak`` (not created here)."""
    env = os.environ.get("CLIPLEAK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clipleak"


def path_of(name: str) -> Path:
    """Where artifact ``name`` lives (whether or not it has been built)."""
    get(name)
    return cache_dir() / f"{name}.safetensors"


def card(name: str) -> dict[str, Any] | None:
    """The card of a built artifact, or ``None`` if it has not been built."""
    return read_card(path_of(name))


def _expected(art: Artifact) -> dict[str, Any]:
    """What a current build's card must record: the recipe, the architecture's definition and (for a
    decoder) the SHA-256 of the target it was trained for (resolving the target first)."""
    if isinstance(art.recipe, PretrainConfig):
        return {"recipe": art.recipe.to_dict(), "arch_config": arch_config(art.recipe.arch)}
    out: dict[str, Any] = {"recipe": art.recipe.to_dict(), "arch_config": arch_config(art.recipe.arch)}
    if art.recipe.kind == "decoder":
        out["target_sha256"] = file_sha256(resolve(art.recipe.target))
    return out


def is_current(name: str) -> bool:
    """Whether artifact ``name`` is built and matches its registered recipe (builds a decoder's target)."""
    return _is_current(path_of(name), _expected(get(name)))


def _is_current(path: Path, expected: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    try:
        c = read_card(path)
    except ClipleakError:
        return False
    if not c or c.get("stopped_early"):
        return False
    entry = c.get("artifact") or {}
    return entry.get("expected") == expected and entry.get("file_sha256") == file_sha256(path)


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock file so that two processes do not build the same artifact at once."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def _stamp(path: Path, name: str, expected: dict[str, Any]) -> None:
    """Record in the card which registered recipe the file was built from."""
    cp = card_path(path)
    c = json.loads(cp.read_text())
    c["artifact"] = {"name": name, "expected": expected, "file_sha256": file_sha256(path)}
    cp.write_text(json.dumps(c, indent=2, default=str))


SHIPPED = Path(__file__).resolve().parent / "shipped"
"""Artifacts shipped with the package, exactly as their recipe builds them (small ones only): installed into
the cache instead of rebuilt when they are current there, i.e. when the local target they were trained for has
the same SHA-256 (a target is bitwise reproducible on one CPU instruction set); otherwise built as usual."""


def _install_shipped(name: str, path: Path) -> bool:
    """Copy the shipped file and card of ``name`` to ``path`` (atomically); False when none is shipped."""
    src = SHIPPED / f"{name}.safetensors"
    if not src.is_file() or not card_path(src).is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    for shipped, installed in ((src, path), (card_path(src), card_path(path))):
        write_atomic(installed, partial(shutil.copyfile, shipped))
    return True


def resolve(name: str, progress: ProgressFn | None = None, *, rebuild: bool = False) -> Path:
    """Path of artifact ``name``, built first if needed (one time only; a decoder builds its target first).

    ``progress`` receives the training's :class:`~clipleak.records.ProgressEvent` s (the CLI draws a
    progress bar). A target is built on ``Artifact.threads`` torch threads (1 for ``tiny-mnist``): the
    weights are then bitwise the same on any machine with the same CPU instruction set, and on a machine
    shared with other busy processes one thread was 4-6x faster than two.
    """
    art = get(name)
    path = path_of(name)
    expected = _expected(art)
    if not rebuild and _is_current(path, expected):
        return path
    with build_lock(path):
        if not rebuild and _is_current(path, expected):  # built by another process meanwhile
            return path
        if not rebuild and _install_shipped(name, path) and _is_current(path, expected):
            return path
        print(f"[clipleak] {art.kind} {name!r} is not in {cache_dir()} yet: one-time training "
              f"({art.description}); later uses load the file.", file=sys.stderr, flush=True)
        task = f"build {name}"
        recipe = art.recipe
        resume = checkpoint_dir(path).is_dir() and not rebuild
        if isinstance(recipe, PretrainConfig):
            _resuming(lambda again: pretrain(recipe, path, resume=again, progress=progress, threads=art.threads,
                                             task=task), resume)
        else:
            target = resolve(recipe.target, progress) if recipe.kind == "decoder" else None

            def train(again: bool) -> PriorCheckpoints:
                ckpt = PriorCheckpoints(checkpoint_dir(path), resume=again)
                prior = build_prior(recipe.kind, data=recipe.data, arch=recipe.arch,
                                    weights=str(target) if target else None, split_seed=recipe.split_seed,
                                    steps=recipe.steps, seed=recipe.seed, latent=recipe.latent,
                                    augment_copies=recipe.augment_copies, base=recipe.base,
                                    work_size=recipe.work_size, progress=progress, task=task, checkpoints=ckpt)
                save_prior(prior, path)
                return ckpt

            _resuming(train, resume).clear()
        _stamp(path, name, expected)
        if not _is_current(path, expected):
            raise ClipleakError(f"building artifact {name!r} did not produce a usable file at {path}")
    return path


T = TypeVar("T")


def _resuming(run: Callable[[bool], T], resume: bool) -> T:
    """``run(resume)``; when resuming fails (a checkpoint of an older recipe, or a damaged one), ``run(False)``."""
    try:
        return run(resume)
    except ClipleakError as e:
        if not resume:
            raise
        print(f"[clipleak] not resuming ({e}); starting over", file=sys.stderr, flush=True)
        return run(False)


def resolve_path(text: str | None, progress: ProgressFn | None = None) -> str | None:
    """``text`` itself when it is a path (or None); the built file when it is a registered name."""
    if text is None or Path(text).exists() or not is_artifact(text):
        return text
    return str(resolve(text, progress))


__all__ = ["Artifact", "PriorRecipe", "build_lock", "cache_dir", "card", "get", "is_artifact", "names",
           "is_current", "path_of", "resolve", "resolve_path", "REGISTRY"]
