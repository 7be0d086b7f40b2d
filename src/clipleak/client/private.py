"""The client's private images: the ONLY way to reach the private part of a data set's seeded split.

Attack code never imports this module. The attacker sees the shared observations, the model and
:func:`clipleak.data.load_public` only; the private images (and the batches drawn from them) stay on the
client, which uses them to compute the update it shares and to write the ground-truth file that the
evaluation compares reconstructions against.
"""

from __future__ import annotations

import numbers

import torch

from ..data import DataSpec, ImageSet, load_part
from ..errors import ClipleakError


def load_private(spec: DataSpec, image_size: int, part: str = "private") -> ImageSet:
    """The PRIVATE part of ``spec``'s seeded split at ``image_size`` (disjoint from public and validation).

    ``part="validation"`` gives the validation part instead: clients drawn from it are what clipleak's own
    settings are tuned on, so that the private part stays unseen until a figure is reported.
    """
    if part not in ("private", "validation"):
        raise ClipleakError(f"clients draw from the private or the validation part, not {part!r}")
    return load_part(spec, image_size, "private" if part == "private" else "validation")


def sample_batch(
    private: ImageSet,
    batch_size: int,
    seed: int,
    classes: list[int] | None = None,
    distinct_classes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a batch without replacement: ``(images, labels, indices into private)``; deterministic per seed.

    ``classes`` restricts the draw to those labels (duplicates ignored). With ``distinct_classes`` every
    image in the batch has a different label: ``batch_size`` classes are drawn at random (among ``classes``
    if given) and one image of each. Asking for more images (or distinct classes) than are available is a
    :class:`ClipleakError`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ClipleakError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    n_classes = len(private.classnames)
    if classes is not None:
        wanted = sorted({int(c) for c in classes})
        if not wanted:
            raise ClipleakError("classes is empty: give at least one class index, or none for all")
        bad = [c for c in wanted if not 0 <= c < n_classes]
        if bad:
            raise ClipleakError(f"class index {bad[0]} out of range: the data set has {n_classes} classes")
        pool = torch.nonzero(torch.isin(private.labels, torch.tensor(wanted, dtype=torch.long))).reshape(-1)
        where = f"classes {wanted}"
    else:
        pool = torch.arange(len(private), dtype=torch.long)
        where = "the private set"
    gen = torch.Generator().manual_seed(int(seed))
    if distinct_classes:
        present = torch.unique(private.labels[pool])
        if batch_size > present.numel():
            raise ClipleakError(
                f"batch of {batch_size} distinct classes requested but {where} has only "
                f"{present.numel()} class(es) with private images"
            )
        chosen = present[torch.randperm(present.numel(), generator=gen)[:batch_size]]
        picks = []
        for c in chosen.tolist():
            members = pool[private.labels[pool] == c]
            picks.append(members[torch.randint(members.numel(), (1,), generator=gen)])
        idx = torch.cat(picks)
    else:
        if batch_size > pool.numel():
            raise ClipleakError(f"batch of {batch_size} requested but {where} has only {pool.numel()} images")
        idx = pool[torch.randperm(pool.numel(), generator=gen)[:batch_size]]
    return private.images.index_select(0, idx), private.labels.index_select(0, idx), idx
