"""The values that travel between stages: observations, ground truth, reconstructions, progress events;
and the atomic file and checkpoint writer every stage saves through (:mod:`.files`).

Small typed dataclasses, saved as safetensors + JSON; this package imports nothing else of clipleak
but :mod:`clipleak.errors`.
"""

from .files import (
    STATE,
    latest_checkpoint,
    read_checkpoint,
    read_state,
    write_atomic,
    write_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from .observation import Observation, Truth, distinct_images, gradient_view, tensor_path
from .progress import ProgressEvent, ProgressFn
from .reconstruction import Reconstruction

__all__ = [
    "STATE", "Observation", "ProgressEvent", "ProgressFn", "Reconstruction", "Truth", "distinct_images",
    "gradient_view", "latest_checkpoint", "read_checkpoint", "read_state", "tensor_path", "write_atomic",
    "write_checkpoint", "write_json_atomic", "write_text_atomic",
]
