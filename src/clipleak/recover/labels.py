"""Labels read before any image search."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..peft import Victim


def predict_labels(victim: Victim, features: torch.Tensor) -> torch.Tensor:
    """Class of each recovered (normalised, pre-adapter) feature under the victim's own classifier."""
    with torch.no_grad():
        f = features
        if victim.adapter is not None:
            a = victim.cfg.adapter_ratio
            f = a * victim.adapter(f) + (1 - a) * f
        logits = F.normalize(f, dim=-1) @ victim.text_features().t()
    return logits.argmax(-1)
