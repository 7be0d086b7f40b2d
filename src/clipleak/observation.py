"""What a client shares, and the client-side ground truth kept apart from it.

An :class:`Observation` is the gradient of the victim's trainable parameters on one batch (mean
cross-entropy over the class names), saved as ``NAME.safetensors`` (tensors) plus ``NAME.json``
(everything an attacker needs to rebuild the victim: architecture, weights file and its SHA-256,
PEFT config, class names, batch size, image size, seeds, whether labels are included, data set
spec of the *public* data). It holds no image.

The ground truth (:class:`Truth`) is written only on the client side, to a separate file, for
evaluation; attack code never reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import ClipleakError
from .models import build_model, math_attention
from .peft import PeftConfig, Victim, build_victim

GRAD_PREFIX = "grad/"
STATE_PREFIX = "state/"
LABELS_KEY = "labels"


@dataclass
class Observation:
    """The client's shared update and the public facts about how it was made."""

    gradients: dict[str, torch.Tensor]
    meta: dict[str, Any]
    peft_state: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.meta["batch_size"])

    @property
    def classnames(self) -> list[str]:
        return list(self.meta["classnames"])

    @property
    def peft(self) -> PeftConfig:
        return PeftConfig.from_dict(self.meta["peft"])

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and its ``.json`` sidecar; returns the tensor file path."""
        p = _tensor_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {GRAD_PREFIX + k: v.detach().contiguous() for k, v in self.gradients.items()}
        tensors.update({STATE_PREFIX + k: v.detach().contiguous() for k, v in self.peft_state.items()})
        if self.labels is not None:
            tensors[LABELS_KEY] = self.labels.detach().to(torch.int64).contiguous()
        save_file(tensors, str(p), metadata={"clipleak": "observation"})
        p.with_suffix(".json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Observation:
        p = _tensor_path(path)
        js = p.with_suffix(".json")
        if not p.is_file():
            raise ClipleakError(f"observation file not found: {p}")
        if not js.is_file():
            raise ClipleakError(f"observation sidecar not found: {js} (it must sit beside {p.name})")
        try:
            meta = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise ClipleakError(f"observation sidecar {js} is not valid JSON: {e}") from e
        missing = [k for k in ("arch", "weights_sha256", "peft", "classnames", "batch_size", "image_size")
                   if k not in meta]
        if missing:
            raise ClipleakError(f"observation sidecar {js} lacks {', '.join(missing)}")
        try:
            tensors = load_file(str(p))
        except Exception as e:  # noqa: BLE001
            raise ClipleakError(f"cannot read observation tensors {p}: {e}") from e
        grads = {k[len(GRAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(GRAD_PREFIX)}
        state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        if not grads:
            raise ClipleakError(f"{p} holds no gradients")
        return cls(gradients=grads, meta=meta, peft_state=state, labels=tensors.get(LABELS_KEY))


def _tensor_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p


def client_gradient(victim: Victim, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the mean cross-entropy w.r.t. the victim's trainable parameters."""
    params = victim.trainable()
    loss = victim.loss(images, labels)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: g.detach().clone() for n, g in zip(params, grads, strict=True)}


def share(
    victim: Victim,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    include_labels: bool = False,
    data: dict[str, Any] | None = None,
    seed: int | None = None,
) -> Observation:
    """What a client sends after computing its update on ``images`` (client side).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1] at the model's image size.
        labels: ``(B,)`` class indices.
        include_labels: whether the shared message carries the labels (some protocols do).
        data: the data set spec (public facts: name, split seed) recorded for the attacker's baselines.
        seed: the batch-sampling seed, recorded for reproducibility.
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
    grads = client_gradient(victim, images, labels)
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
        "seed": seed,
        "data": data,
        "param_shapes": {k: list(v.shape) for k, v in grads.items()},
    }
    return Observation(
        gradients=grads,
        meta=meta,
        peft_state=victim.peft_state(),
        labels=labels.clone() if include_labels else None,
    )


def rebuild_victim(obs: Observation, weights: str | Path | None = None, *, check_gradients: bool = True) -> Victim:
    """The attacker's copy of the victim, checked against the observation.

    ``weights`` overrides the path recorded in the observation (the file must still hash the same).
    """
    meta = obs.meta
    w = weights if weights is not None else meta.get("weights")
    sha = str(meta["weights_sha256"])
    init_seed = int(sha.split(":", 1)[1]) if sha.startswith("random-init:") else 0
    if sha.startswith("random-init:"):
        w = None
    elif w is None:
        raise ClipleakError("the observation was made with a weights file; pass it with --weights")
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
    victim = build_victim(clip, list(meta["classnames"]), PeftConfig.from_dict(meta["peft"]))
    params = victim.trainable()
    if not check_gradients:
        if obs.peft_state:
            victim.load_peft_state(obs.peft_state)
        return victim
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


@dataclass
class Truth:
    """Client-side ground truth of one shared batch (for evaluation only)."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        p = _tensor_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": self.images.contiguous(), "labels": self.labels.to(torch.int64).contiguous()},
                  str(p), metadata={"clipleak": "truth", "meta": json.dumps(self.meta)})
        return p

    @classmethod
    def load(cls, path: str | Path) -> Truth:
        p = _tensor_path(path)
        if not p.is_file():
            raise ClipleakError(f"ground-truth file not found: {p}")
        try:
            from safetensors import safe_open

            t = load_file(str(p))
            with safe_open(str(p), framework="pt") as f:
                md = f.metadata() or {}
        except Exception as e:  # noqa: BLE001
            raise ClipleakError(f"cannot read ground-truth file {p}: {e}") from e
        if "images" not in t or "labels" not in t:
            raise ClipleakError(f"{p} is not a clipleak ground-truth file (needs images and labels)")
        return cls(images=t["images"], labels=t["labels"], meta=json.loads(md.get("meta", "{}")))


__all__ = ["Observation", "Truth", "share", "client_gradient", "rebuild_victim", "math_attention"]
