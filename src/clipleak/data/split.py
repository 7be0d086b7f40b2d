"""The seeded, stratified public / validation / private split of a data set.

* **public**: what an attacker may use as prior knowledge (:func:`load_public`): targets and priors are
  trained on it, attacks start from it, baselines are drawn from it.
* **validation**: where clipleak's own choices are tuned (recipes, attack settings); never shown to an
  attack, never reported as a headline figure (:func:`load_validation`).
* **private**: the client's images, reachable only through :mod:`clipleak.client`; headline figures are
  measured on it.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from ..errors import ClipleakError
from .sources import ImageSet, load_all
from .spec import DataSpec, check_fractions

Part = Literal["public", "validation", "private"]
PARTS: tuple[str, ...] = ("public", "validation", "private")


class Split(NamedTuple):
    """Sorted, disjoint index tensors that together cover the data set."""

    public: torch.Tensor
    validation: torch.Tensor
    private: torch.Tensor


def split_indices(
    labels: torch.Tensor, seed: int, private_fraction: float, validation_fraction: float = 0.0
) -> Split:
    """Stratified seeded split into public, validation and private indices.

    Each class ``c`` with ``n_c`` images is permuted with the split's generator; its first
    ``round(n_c * (private_fraction + validation_fraction))`` images are held out (at least 1 per part
    asked for, and at least one image stays public); of the hold-out, the first
    ``hold - round(n_c * validation_fraction)`` are private and the rest validation. So the public part
    depends only on the sum of the two fractions.
    """
    check_fractions(private_fraction, validation_fraction)
    labels = torch.as_tensor(labels).reshape(-1).long()
    gen = torch.Generator().manual_seed(int(seed))
    parts: dict[str, list[torch.Tensor]] = {p: [] for p in PARTS}
    need = 3 if validation_fraction > 0 else 2
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).reshape(-1)
        n = int(members.numel())
        if n < need:
            raise ClipleakError(f"class {c} has only {n} image(s); need at least {need} per class to split")
        hold = min(n - 1, max(need - 1, math.floor(n * (private_fraction + validation_fraction) + 0.5)))
        n_val = 0
        if validation_fraction > 0:
            n_val = min(hold - 1, max(1, math.floor(n * validation_fraction + 0.5)))
        perm = members[torch.randperm(n, generator=gen)]
        parts["private"].append(perm[: hold - n_val])
        parts["validation"].append(perm[hold - n_val : hold])
        parts["public"].append(perm[hold:])
    empty = torch.zeros(0, dtype=torch.long)
    out = {p: torch.sort(torch.cat(v)).values if v else empty for p, v in parts.items()}
    return Split(out["public"], out["validation"], out["private"])


def split_of(spec: DataSpec, full: ImageSet) -> Split:
    """:func:`split_indices` for a loaded set, naming the classes that are too small to split."""
    counts = torch.bincount(full.labels, minlength=full.n_classes)
    need = 3 if spec.validation_fraction > 0 else 2
    small = [f"{full.classnames[k]} ({int(counts[k])})" for k in range(full.n_classes) if counts[k] < need]
    if small:
        raise ClipleakError(
            f"{spec.name}: need at least {need} images per class to split public/validation/private; "
            "too few in: " + ", ".join(small)
        )
    return split_indices(full.labels, spec.split_seed, spec.private_fraction, spec.validation_fraction)


def load_part(spec: DataSpec, image_size: int, part: Part) -> ImageSet:
    """One part of ``spec``'s split at ``image_size``. Only :mod:`clipleak.client` asks for ``private``
    (a test checks); attackers get :func:`load_public`."""
    if part not in PARTS:
        raise ClipleakError(f"unknown split part {part!r}; one of {', '.join(PARTS)}")
    full = load_all(spec, image_size)
    idx = getattr(split_of(spec, full), part)
    out = full.subset(idx)
    out.source = f"{full.source} {part} split ({spec.describe()}: {len(out)} of {len(full)} images)"
    return out


def load_public(spec: DataSpec, image_size: int) -> ImageSet:
    """The PUBLIC part of ``spec``'s split at ``image_size`` (what an attacker may know)."""
    return load_part(spec, image_size, "public")


def load_validation(spec: DataSpec, image_size: int) -> ImageSet:
    """The VALIDATION part: where recipes and attack settings are tuned (never a headline figure)."""
    return load_part(spec, image_size, "validation")


def spec_of_observation(meta: dict[str, Any]) -> DataSpec:
    """The data spec an observation's metadata records (its public facts: name and split)."""
    data = meta.get("data")
    if not data:
        raise ClipleakError("the observation records no data set, so no public data can be used")
    return DataSpec.from_dict(data)


def public_for_observation(meta: dict[str, Any]) -> tuple[DataSpec, ImageSet]:
    """The public split an observation's metadata refers to (what the attacker may use)."""
    spec = spec_of_observation(meta)
    return spec, load_public(spec, int(meta["image_size"]))


def check_same_split(spec: DataSpec, card: dict[str, Any] | None, what: str) -> None:
    """Refuse when a target's or prior's card records another split than ``spec``.

    A target or prior trained on another split has seen some of this split's private images: every
    figure measured on them would be inflated. Cards without a split (a user's own checkpoint, a CSV
    run) are not checked.
    """
    if not card:
        return
    recorded = card.get("data_spec")
    if recorded is None:
        return
    other = DataSpec.from_dict(recorded)
    if other.name != spec.name:
        raise ClipleakError(f"{what} was trained on data set {other.name!r}, but this run uses {spec.name!r}: "
                            "use the same data set, or a target/prior trained on it")
    if not other.same_split(spec):
        raise ClipleakError(
            f"{what} was trained on the public part of split [{other.describe()}], but this run uses "
            f"[{spec.describe()}]: some of its private images are that model's training images. "
            "Use the split on the card, or train a target/prior for this split"
        )
