"""One schema check for the files that travel between stages: observations, ground truth, reconstructions.

Each check runs when a file is loaded, before any work: the fields that must be present, their types, and
the shapes the JSON states against the tensors stored beside it. A failure is one
:class:`~clipleak.errors.ClipleakError` line naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipleakError

KINDS = ("gradient", "update")
"""What an observation holds: one batch's gradient, or a federated client's multi-step update."""
DEFENSE_KINDS = ("prune", "quantize", "clip")
"""The update defenses an observation's ``defense`` may record (``kind``; :mod:`clipleak.privacy.defenses`)."""


class _Where:
    """The file being checked, for messages that name it and the field."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def fail(self, field: str, problem: str) -> ClipleakError:
        return ClipleakError(f"{self.path}: {field} {problem}")

    def mismatch(self, field: str, problem: str) -> ClipleakError:
        return self.fail(field, f"{problem}: the sidecar does not match the stored tensors")


def _int(where: _Where, meta: Mapping[str, Any], key: str, *, low: int = 1) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise where.fail(key, f"must be a whole number, got {v!r}")
    if v < low:
        raise where.fail(key, f"must be at least {low}, got {v}")
    return v


def _str(where: _Where, meta: Mapping[str, Any], key: str) -> str:
    v = meta.get(key)
    if not isinstance(v, str) or not v:
        raise where.fail(key, f"must be a non-empty string, got {v!r}")
    return v


def check_observation(meta: Any, gradients: Mapping[str, torch.Tensor], labels: torch.Tensor | None,
                      path: str | Path) -> None:
    """An observation's sidecar ``meta`` against its stored ``gradients`` and ``labels``.

    Required: ``kind`` (gradient | update; a missing kind is an error, never taken as a gradient), ``arch``,
    ``weights_sha256``, ``peft`` (an object with its ``method``), ``classnames`` (distinct strings),
    ``batch_size`` and ``image_size`` (positive whole numbers); an update also ``local_steps``, ``lr`` and
    ``num_examples``. A ``defense`` is an object (an update defense in it: a known ``kind`` and a
    ``parameter``). Checked against the tensors: ``param_shapes`` (when present) names exactly the stored
    gradients with their shapes; stored labels are one per image of the batch and name a class; a CoOp
    context has ``n_ctx`` tokens and, class-specific, one context per class name.
    """
    where = _Where(path)
    if not isinstance(meta, dict):
        raise ClipleakError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("kind", "arch", "weights_sha256", "peft", "classnames", "batch_size", "image_size")
               if k not in meta]
    if missing:
        raise ClipleakError(f"{path}: lacks {', '.join(missing)}")
    kind = meta["kind"]
    if kind not in KINDS:
        raise where.fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    _str(where, meta, "arch")
    _str(where, meta, "weights_sha256")
    batch = _int(where, meta, "batch_size")
    _int(where, meta, "image_size")
    names = meta["classnames"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise where.fail("classnames", f"must be a non-empty list of class names, got {names!r}")
    if len(set(names)) != len(names):
        raise where.fail("classnames", "must be distinct")
    peft = meta["peft"]
    if not isinstance(peft, dict) or not isinstance(peft.get("method"), str):
        raise where.fail("peft", f"must be an object with a method, got {peft!r}")
    if "labels_included" in meta and not isinstance(meta["labels_included"], bool):
        raise where.fail("labels_included", f"must be true or false, got {meta['labels_included']!r}")
    if kind == "update":
        _int(where, meta, "local_steps")
        _int(where, meta, "num_examples")
        lr = meta.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise where.fail("lr", f"must be a number > 0, got {lr!r}")
    _check_defense(where, meta)
    _check_shapes(where, meta, gradients)
    if labels is not None:
        if kind == "gradient" and tuple(labels.shape) != (batch,):
            raise where.mismatch("batch_size", f"is {batch} but the stored labels have shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            raise where.mismatch("classnames", f"has {len(names)} names but the stored labels go up to "
                             f"{int(labels.max())}")
    elif meta.get("labels_included"):
        raise where.mismatch("labels_included", "is true but the file stores no labels")
    _check_coop(where, meta, gradients)


def _check_defense(where: _Where, meta: Mapping[str, Any]) -> None:
    """``defense``, when present, is an object; an update defense in it (``kind``) names a known kind and a
    parameter (a number; ``"sign"`` for quantize)."""
    d = meta.get("defense")
    if d is None:
        return
    if not isinstance(d, dict):
        raise where.fail("defense", f"must be an object, got {d!r}")
    if "kind" not in d:
        return
    if d["kind"] not in DEFENSE_KINDS:
        raise where.fail("defense.kind", f"must be one of {', '.join(DEFENSE_KINDS)}, got {d['kind']!r}")
    p = d.get("parameter")
    number = isinstance(p, int | float) and not isinstance(p, bool)
    if not (number or (d["kind"] == "quantize" and p == "sign")):
        raise where.fail("defense.parameter", f"must be a number (or sign for quantize), got {p!r}")


def _check_shapes(where: _Where, meta: Mapping[str, Any], gradients: Mapping[str, torch.Tensor]) -> None:
    shapes = meta.get("param_shapes")
    if shapes is None:
        return
    if not isinstance(shapes, dict):
        raise where.fail("param_shapes", f"must map parameter names to shapes, got {shapes!r}")
    if set(shapes) != set(gradients):
        extra = sorted(set(shapes) - set(gradients))[:2]
        lacking = sorted(set(gradients) - set(shapes))[:2]
        raise where.mismatch("param_shapes", f"names other parameters than the stored gradients (not stored: {extra}, "
                         f"not named: {lacking})")
    for k, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise where.fail(f"param_shapes[{k!r}]", f"must be a list of whole numbers, got {shape!r}")
        if tuple(shape) != tuple(gradients[k].shape):
            raise where.mismatch(f"param_shapes[{k!r}]", f"is {shape} but the stored gradient has shape "
                             f"{list(gradients[k].shape)}")


def _check_coop(where: _Where, meta: Mapping[str, Any], gradients: Mapping[str, torch.Tensor]) -> None:
    peft = meta["peft"]
    ctx = gradients.get("prompt.ctx")
    if peft.get("method") != "coop" or ctx is None:
        return
    n_ctx, n_classes = peft.get("n_ctx"), len(meta["classnames"])
    want_dim = 3 if peft.get("class_specific") else 2
    if ctx.dim() != want_dim:
        raise where.mismatch("peft.class_specific", f"is {bool(peft.get('class_specific'))} but the stored context "
                         f"gradient has shape {list(ctx.shape)}")
    if isinstance(n_ctx, int) and ctx.shape[-2] != n_ctx:
        raise where.mismatch("peft.n_ctx", f"is {n_ctx} but the stored context gradient has shape {list(ctx.shape)}")
    if want_dim == 3 and ctx.shape[0] != n_classes:
        raise where.mismatch("classnames", f"has {n_classes} names but the stored class-specific context has "
                         f"{ctx.shape[0]}")


def check_images(where: str | Path, images: torch.Tensor | None, labels: torch.Tensor | None,
                 features: torch.Tensor | None = None) -> None:
    """A truth or reconstruction file's tensors: images ``(B, 3, H, W)``, labels ``(B,)`` whole numbers,
    features (when stored) ``(B, E)``."""
    w = _Where(where)
    if images is None or labels is None:
        raise w.fail("images and labels", "are both required")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise w.fail("images", f"must have shape (B, 3, H, W) with B >= 1, got {list(images.shape)}")
    if not images.is_floating_point():
        raise w.fail("images", f"must be floating point, got {images.dtype}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise w.fail("labels", f"must be one per image ({images.shape[0]}), got shape {list(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or (labels.numel() and int(labels.min()) < 0):
        raise w.fail("labels", "must be class indices (whole numbers >= 0)")
    if features is not None and (features.dim() != 2 or features.shape[0] != images.shape[0]):
        raise w.fail("features", f"must have shape (B, E) with B = {images.shape[0]}, got {list(features.shape)}")


def check_digest(where: str | Path, meta: Mapping[str, Any]) -> None:
    """``observation_digest``, when present, is a SHA-256 in hex."""
    d = meta.get("observation_digest")
    if d is None:
        return
    if not isinstance(d, str) or len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        raise _Where(where).fail("observation_digest", f"must be a SHA-256 in hex, got {d!r}")
