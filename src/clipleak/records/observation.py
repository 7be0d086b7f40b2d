"""What a client shares, and the client-side ground truth kept apart from it.

An :class:`Observation` is the gradient of the victim's trainable parameters on one batch (mean
cross-entropy over the class names), saved as ``NAME.safetensors`` (tensors) plus ``NAME.json``
(everything an attacker needs to rebuild the victim: architecture, weights file and its SHA-256,
PEFT config and its init seed, class names, batch size, image size, whether labels are included, the
data set and its split; the defense applied, if any: DP and/or an update defense, ``meta["defense"]``). It
holds no image and nothing that identifies which images were drawn: the batch-draw seed and the private
indices live in the client's :class:`Truth` file only.

The ground truth (:class:`Truth`) is written only on the client side, to a separate file, for
evaluation; attack code never reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ClipleakError
from .files import write_atomic, write_text_atomic
from .schema import check_digest, check_images, check_observation

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
    def peft_config(self) -> dict[str, Any]:
        """The PEFT settings the client used (``peft.PeftConfig.from_dict`` rebuilds the dataclass)."""
        return dict(self.meta["peft"])

    @property
    def defense(self) -> dict[str, Any] | None:
        """What the client applied to the update before sharing it (``meta["defense"]``): the DP setting's
        fields (``mechanism``, C, sigma, epsilon) and/or an update defense's ``kind`` and ``parameter``
        (pruning, quantisation, clipping without noise); ``None``: the plain update."""
        d = self.meta.get("defense")
        return dict(d) if d else None

    @property
    def data(self) -> dict[str, Any] | None:
        """The public facts about the client's data set: name and split (never which images)."""
        d = self.meta.get("data")
        return dict(d) if d else None

    def digest(self) -> str:
        """SHA-256 of what was shared: gradients, PEFT state and labels (names and float32 values)."""
        h = hashlib.sha256()
        for prefix, tensors in (("grad/", self.gradients), ("state/", self.peft_state)):
            for k in sorted(tensors):
                h.update((prefix + k).encode())
                h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(b"labels" + self.labels.detach().long().cpu().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and its ``.json`` sidecar; returns the tensor file path.

        Both are written atomically, the sidecar last (an older sidecar is removed first), so a kill at any
        moment leaves no pair that loads as whole but is not: at worst tensors without a sidecar, which
        :meth:`load` refuses."""
        p = tensor_path(path)
        js = p.with_suffix(".json")
        tensors = {GRAD_PREFIX + k: v.detach().contiguous() for k, v in self.gradients.items()}
        tensors.update({STATE_PREFIX + k: v.detach().contiguous() for k, v in self.peft_state.items()})
        if self.labels is not None:
            tensors[LABELS_KEY] = self.labels.detach().to(torch.int64).contiguous()
        text = json.dumps(self.meta, indent=2, sort_keys=True)  # unserialisable meta: nothing is touched
        js.unlink(missing_ok=True)
        write_atomic(p, lambda tmp: save_file(tensors, str(tmp), metadata={"clipleak": "observation"}))
        write_text_atomic(js, text)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Observation:
        """Read an observation, checked (:func:`~clipleak.records.schema.check_observation`) before use."""
        p = tensor_path(path)
        js = p.with_suffix(".json")
        if not p.is_file():
            raise ClipleakError(f"observation file not found: {p}")
        if not js.is_file():
            raise ClipleakError(f"observation sidecar not found: {js} (it must sit beside {p.name})")
        try:
            meta = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClipleakError(f"observation sidecar {js} is not valid JSON: {e}") from e
        try:
            tensors = load_file(str(p))
        except Exception as e:  # noqa: BLE001
            raise ClipleakError(f"cannot read observation tensors {p}: {e}") from e
        grads = {k[len(GRAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(GRAD_PREFIX)}
        state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        if not grads:
            raise ClipleakError(f"{p} holds no gradients")
        labels = tensors.get(LABELS_KEY)
        check_observation(meta, grads, labels, js)
        return cls(gradients=grads, meta=meta, peft_state=state, labels=labels)


UPDATE_KEYS = ("local_steps", "lr", "num_examples")
"""What an update observation (``meta["kind"] == "update"``) must record besides the gradient keys."""


def digests_match(attacked: object, truth: object, mismatch: str) -> bool | None:
    """Whether a ground truth belongs to the very update an attack read: True when the digest the truth records
    equals the attacked one's, None when either record predates digests (unchecked). A mismatch is a
    :class:`ClipleakError` with ``mismatch``, whose ``{truth}`` and ``{attacked}`` are the digests' first 12
    characters."""
    if attacked is None or truth is None:
        return None
    if attacked != truth:
        raise ClipleakError(mismatch.format(truth=str(truth)[:12], attacked=str(attacked)[:12]))
    return True


def distinct_images(local_steps: int, batch_size: int, num_examples: int) -> int:
    """How many different images E local steps at batch B touch on a client holding n of them.

    The client's sampler (:func:`clipleak.fl.local_update`) walks a fresh permutation of its data
    without replacement, batch ``min(B, n)`` per step, wrapping to the start: ``min(n, E min(B, n))``.
    """
    b = min(int(batch_size), int(num_examples))
    return min(int(num_examples), int(local_steps) * b)


def gradient_view(obs: Observation) -> Observation:
    """An update observation seen as one gradient, so that every gradient attack applies to it.

    A federated client that runs E SGD steps of learning rate eta sends ``delta = -eta sum_t g_t``
    (``g_t`` the mean-loss gradient of step t's batch, at moving parameters). With E = 1 that is exactly
    ``-eta g``. For E > 1, to first order (parameters held at the round's global state) and when every
    image is used equally often, ``-delta / (eta E)`` is the mean-loss gradient of the batch of all
    :func:`distinct_images` the client touched. The view has that batch size, ``kind = "gradient"``,
    and keeps the update's facts under ``meta["from_update"]``. A gradient observation is returned as is.
    """
    if obs.meta.get("kind") != "update":
        return obs
    missing = [k for k in UPDATE_KEYS if k not in obs.meta]
    if missing:
        raise ClipleakError(f"update observation lacks {', '.join(missing)}")
    steps, lr, n = int(obs.meta["local_steps"]), float(obs.meta["lr"]), int(obs.meta["num_examples"])
    if steps < 1 or lr <= 0 or n < 1:
        raise ClipleakError(f"update observation has local_steps {steps}, lr {lr}, num_examples {n}")
    scale = -1.0 / (lr * steps)
    grads = {k: v * scale for k, v in obs.gradients.items()}
    d = distinct_images(steps, obs.batch_size, n)
    meta = dict(obs.meta)
    meta.update({"kind": "gradient", "batch_size": d,
                 "from_update": {k: obs.meta.get(k) for k in ("local_steps", "batch_size", "lr", "num_examples",
                                                              "round", "node_id")}})
    return Observation(gradients=grads, meta=meta, peft_state=dict(obs.peft_state), labels=obs.labels)


def tensor_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p


@dataclass
class Truth:
    """Client-side ground truth of one shared batch (for evaluation only)."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the truth (one safetensors file, its meta in the header) atomically."""
        p = tensor_path(path)
        tensors = {"images": self.images.contiguous(), "labels": self.labels.to(torch.int64).contiguous()}
        header = {"clipleak": "truth", "meta": json.dumps(self.meta)}
        write_atomic(p, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Truth:
        """Read a truth file, checked: images ``(B, 3, H, W)``, one label each, its meta a JSON object."""
        p = tensor_path(path)
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
        try:
            meta = json.loads(md.get("meta", "{}"))
        except json.JSONDecodeError as e:
            raise ClipleakError(f"{p}: meta is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise ClipleakError(f"{p}: meta must be a JSON object")
        check_images(p, t["images"], t["labels"])
        check_digest(p, meta)
        return cls(images=t["images"], labels=t["labels"], meta=meta)
