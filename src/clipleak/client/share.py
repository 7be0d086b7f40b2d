"""What a client sends after computing its update on a private batch, with or without differential privacy
and an update defense (pruning, quantisation, clipping: :mod:`clipleak.privacy.defenses`)."""

from __future__ import annotations

import secrets
from typing import Any

import torch

from .. import __version__
from ..errors import ClipleakError
from ..peft import Victim
from ..privacy import Defense, DpSetting, apply_defense, privatise
from ..records import Observation


def share(
    victim: Victim,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    include_labels: bool = False,
    data: dict[str, Any] | None = None,
    dp: DpSetting | None = None,
    dp_seed: int | None = None,
    defense: Defense | None = None,
) -> Observation:
    """The observation a client sends for ``images`` (client side).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1] at the model's image size.
        labels: ``(B,)`` class indices.
        include_labels: whether the shared message carries the labels (some protocols do).
        data: the data set and its split (public facts), recorded for the attacker's public data and
            baselines. Nothing that identifies the drawn images (seed, indices) goes in: those stay in
            the client's :class:`~clipleak.records.Truth`.
        dp: a DP setting (:class:`~clipleak.privacy.DpSetting`): the shared gradient is then the
            mechanism's noisy one, and the observation's ``meta["defense"]`` records the mechanism, C,
            sigma and epsilon. ``None``: the plain gradient, and no ``defense`` key (the observation is
            exactly what it was before DP existed).
        dp_seed: seed of the DP noise; keep it in the truth file, never in the observation. ``None``
            draws a fresh secret one (not reproducible).
        defense: an update defense (:class:`~clipleak.privacy.Defense`) applied to the shared gradient
            after DP (post-processing); ``meta["defense"]`` then records its ``kind`` and ``parameter``
            (beside the DP fields when both were applied).
    """
    clip = victim.clip_info
    if images.dim() != 4 or images.shape[1] != 3:
        raise ClipleakError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
    if images.shape[-1] != clip.image_size or images.shape[-2] != clip.image_size:
        raise ClipleakError(
            f"images are {images.shape[-2]}x{images.shape[-1]} but {clip.arch} takes "
            f"{clip.image_size}x{clip.image_size}"
        )
    if labels.shape != (images.shape[0],):
        raise ClipleakError("need one label per image")
    if int(labels.min()) < 0 or int(labels.max()) >= len(victim.classnames):
        raise ClipleakError(f"labels must be in [0, {len(victim.classnames) - 1}]")
    setting = dp.resolve() if dp is not None else None
    # computed on the victim's device; the observation holds CPU tensors (what a file or message carries)
    dev_images, dev_labels = images.to(victim.device), labels.to(victim.device)
    if setting is None:
        grads = victim.gradient(dev_images, dev_labels)
    else:
        seed = secrets.randbits(63) if dp_seed is None else int(dp_seed)
        grads = privatise(victim, dev_images, dev_labels, setting, seed)
    if defense is not None:  # after DP: post-processing of what DP produced
        grads = apply_defense(grads, defense)
    grads = {k: g.cpu() for k, g in grads.items()}
    meta: dict[str, Any] = {
        "kind": "gradient",
        "loss": "cross_entropy",
        "clipleak_version": __version__,
        "arch": clip.arch,
        "weights": clip.weights,
        "weights_sha256": clip.weights_sha256,
        "peft": victim.cfg.to_dict(),
        "classnames": victim.classnames,
        "batch_size": int(images.shape[0]),
        "image_size": clip.image_size,
        "labels_included": bool(include_labels),
        "data": data,
        "param_shapes": {k: list(v.shape) for k, v in grads.items()},
    }
    if setting is not None or defense is not None:
        meta["defense"] = {**(setting.record() if setting is not None else {}),
                           **(defense.record() if defense is not None else {})}
    return Observation(
        gradients=grads,
        meta=meta,
        peft_state=victim.peft_state(),
        labels=labels.cpu().clone() if include_labels else None,
    )
