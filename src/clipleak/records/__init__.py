"""The values that travel between stages: observations, ground truth, reconstructions, progress events.

Small typed dataclasses, saved as safetensors + JSON; this package imports nothing else of clipleak
but :mod:`clipleak.errors`.
"""

from .observation import Observation, Truth, distinct_images, gradient_view, tensor_path
from .progress import ProgressEvent, ProgressFn
from .reconstruction import Reconstruction

__all__ = ["Observation", "ProgressEvent", "ProgressFn", "Reconstruction", "Truth", "distinct_images", "gradient_view",
           "tensor_path"]
