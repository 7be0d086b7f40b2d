"""The values that travel between stages: observations, ground truth, reconstructions, progress events;
and the atomic file and checkpoint writer every stage saves through (:mod:`.files`).

Small typed dataclasses, saved as safetensors + JSON; this package imports nothing else of clipleak
but :mod:`clipleak.errors`.
"""

from .files import (
    latest_checkpoint,
    load_checkpoint,
    write_atomic,
    write_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from .observation import Observation, Truth, digests_match, distinct_images, gradient_view, tensor_path
from .progress import ProgressEvent, ProgressFn
from .reconstruction import Reconstruction

__all__ = [
    "Observation", "ProgressEvent", "ProgressFn", "Reconstruction", "Truth", "digests_match", "distinct_images",
    "gradient_view", "latest_checkpoint", "load_checkpoint", "tensor_path", "write_atomic", "write_checkpoint",
    "write_json_atomic", "write_text_atomic",
]
