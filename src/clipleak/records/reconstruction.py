"""An attack's output: reconstructed images, the labels it used or inferred, and how it got there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ClipleakError
from .files import write_atomic, write_text_atomic
from .schema import check_digest, check_images

TENSORS = "reconstruction.safetensors"
META = "reconstruction.json"


@dataclass
class Reconstruction:
    """Images ``(B, 3, H, W)`` in [0, 1] and labels ``(B,)``.

    ``label_source`` is ``"observation"`` when the shared message carried the labels, otherwise the
    name of the inference used. ``features`` is the attack's estimate of the images' normalised target
    features ``(B, E)`` when it made one (the evaluator's public-nearest-neighbour baseline uses it).
    ``history`` maps a loss-term name to its values over iterations (of the restart that was kept);
    ``meta`` holds the attack config, the observation's metadata, timings and per-restart losses.
    """

    images: torch.Tensor
    labels: torch.Tensor
    label_source: str
    attack: str
    history: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    features: torch.Tensor | None = None

    def save(self, out_dir: str | Path) -> Path:
        """Write the folder's two files atomically, the JSON last (an older one is removed first), so a
        kill never leaves a pair that loads as whole but is not."""
        d = Path(out_dir)
        tensors = {"images": self.images.detach().contiguous(),
                   "labels": self.labels.detach().to(torch.int64).contiguous()}
        if self.features is not None:
            tensors["features"] = self.features.detach().float().contiguous()
        text = json.dumps({"attack": self.attack, "label_source": self.label_source, "history": self.history,
                           "meta": self.meta}, indent=2, sort_keys=True)
        (d / META).unlink(missing_ok=True)
        write_atomic(d / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        write_text_atomic(d / META, text)
        return d

    @classmethod
    def load(cls, out_dir: str | Path) -> Reconstruction:
        """Read a reconstruction folder, checked: the JSON's fields and types, the tensors' shapes."""
        d = Path(out_dir)
        if not (d / TENSORS).is_file() or not (d / META).is_file():
            raise ClipleakError(f"{d} is not a reconstruction folder (needs {TENSORS} and {META})")
        try:
            t = load_file(str(d / TENSORS))
        except Exception as e:  # noqa: BLE001
            raise ClipleakError(f"cannot read reconstruction tensors {d / TENSORS}: {e}") from e
        try:
            js = json.loads((d / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClipleakError(f"{d / META} is not valid JSON: {e}") from e
        if not isinstance(js, dict):
            raise ClipleakError(f"{d / META}: must hold a JSON object")
        for key in ("attack", "label_source"):
            if not isinstance(js.get(key), str):
                raise ClipleakError(f"{d / META}: {key} must be a string, got {js.get(key)!r}")
        for key in ("history", "meta"):
            if not isinstance(js.get(key, {}), dict):
                raise ClipleakError(f"{d / META}: {key} must be an object")
        check_images(d / TENSORS, t.get("images"), t.get("labels"), t.get("features"))
        meta = js.get("meta", {})
        check_digest(d / META, meta)
        return cls(images=t["images"], labels=t["labels"], label_source=js["label_source"],
                   attack=js["attack"], history=js.get("history", {}), meta=meta,
                   features=t.get("features"))
