"""The target's features of the attacker's public images, computed once per target and split."""

from __future__ import annotations

import torch

from ..data import ImageSet
from ..models import ClipModel, image_features

_BANK: dict[tuple[str, str, str], torch.Tensor] = {}
_MAX_ENTRIES = 32


def public_features(clip: ClipModel, public: ImageSet, pool: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised (pre-adapter) features of ``public[pool]`` (all of it by default), memoised.

    The key is the target's weights hash and a digest of the selected images themselves, so two clients
    or two splits in one process (a federated simulation) are never served each other's features.
    Returned on the model's device (the memo holds them where the public images are, the CPU).
    """
    sel = public if pool is None else public.subset(pool)
    key = (clip.weights_sha256, clip.arch, sel.digest())
    if key not in _BANK:
        if len(_BANK) >= _MAX_ENTRIES:
            _BANK.pop(next(iter(_BANK)))
        _BANK[key] = image_features(clip, sel.images)
    return _BANK[key].to(clip.model.logit_scale.device)
