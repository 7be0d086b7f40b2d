"""The attacker's copy of the victim, rebuilt from an observation's public facts and checked against it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import DataSpec, check_same_split
from ..errors import ClipleakError
from ..models import build_model, read_card, weights_identity
from ..records import Observation
from .config import PeftConfig
from .victim import Victim, build_victim


def rebuild_victim(obs: Observation, weights: str | Path | None = None, *, check_gradients: bool = True,
                   device: str | torch.device | None = None) -> Victim:
    """The attacker's copy of the victim, checked against the observation.

    ``weights`` overrides the path recorded in the observation (the file must still hash the same).
    When the weights have a card that records the data split they were trained on, the observation's
    split must be the same one (else the "private" images include the target's training images).
    ``device``: where the victim computes (default: the CPU, where the model is built).
    """
    meta = obs.meta
    w = weights if weights is not None else meta.get("weights")
    sha = str(meta["weights_sha256"])
    init_seed = int(sha.split(":", 1)[1]) if sha.startswith("random-init:") else 0
    if sha.startswith("random-init:"):
        w = None
    elif w is None:
        raise ClipleakError("the observation was made with a weights file; pass it with --weights")
    given = weights_identity(meta["arch"], w) if w is not None else sha  # before the model is built: seconds
    if given != sha:
        raise ClipleakError(
            f"weights {w} (sha256 {given[:12]}...) are not the ones the observation was made with "
            f"(sha256 {sha[:12]}...)"
        )
    clip = build_model(meta["arch"], w, init_seed=init_seed)
    if clip.weights_sha256 != sha:
        raise ClipleakError(
            f"weights {w} (sha256 {clip.weights_sha256[:12]}...) are not the ones the observation was "
            f"made with (sha256 {sha[:12]}...)"
        )
    if clip.image_size != int(meta["image_size"]):
        raise ClipleakError(
            f"observation says image size {meta['image_size']} but {meta['arch']} takes {clip.image_size}"
        )
    if w is not None and meta.get("data"):
        check_same_split(DataSpec.from_dict(meta["data"]), read_card(w), f"the target {Path(w).name}")
    victim = build_victim(clip, list(meta["classnames"]), PeftConfig.from_dict(meta["peft"]), device=device)
    params = victim.trainable()
    if check_gradients:
        if set(params) != set(obs.gradients):
            extra = sorted(set(obs.gradients) - set(params))[:2]
            lacking = sorted(set(params) - set(obs.gradients))[:2]
            raise ClipleakError(
                "the observation's gradients do not match the rebuilt model's trainable parameters "
                f"(unexpected: {extra}, missing: {lacking})"
            )
        for n, p in params.items():
            if tuple(p.shape) != tuple(obs.gradients[n].shape):
                raise ClipleakError(
                    f"gradient {n!r} has shape {tuple(obs.gradients[n].shape)} but the model's parameter "
                    f"is {tuple(p.shape)}: the observation does not match this model"
                )
    if obs.peft_state:
        victim.load_peft_state(obs.peft_state)
    return victim
