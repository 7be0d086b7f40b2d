"""An attack's output: reconstructed images, the labels it used or inferred, and how it got there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ClipleakError

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
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images.detach().contiguous(),
                   "labels": self.labels.detach().to(torch.int64).contiguous()}
        if self.features is not None:
            tensors["features"] = self.features.detach().float().contiguous()
        save_file(tensors, str(d / TENSORS))
        (d / META).write_text(json.dumps({
            "attack": self.attack, "label_source": self.label_source,
            "history": self.history, "meta": self.meta,
        }, indent=2, sort_keys=True))
        return d

    @classmethod
    def load(cls, out_dir: str | Path) -> Reconstruction:
        d = Path(out_dir)
        if not (d / TENSORS).is_file() or not (d / META).is_file():
            raise ClipleakError(f"{d} is not a reconstruction folder (needs {TENSORS} and {META})")
        t = load_file(str(d / TENSORS))
        js = json.loads((d / META).read_text())
        return cls(images=t["images"], labels=t["labels"], label_source=js["label_source"],
                   attack=js["attack"], history=js.get("history", {}), meta=js.get("meta", {}),
                   features=t.get("features"))
