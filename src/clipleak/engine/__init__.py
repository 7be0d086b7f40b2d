"""The one optimisation engine every reconstruction attack runs on (see :mod:`.optimise`)."""

from .objectives import (
    cosine_gradient_distance,
    gradient_distance,
    image_l2,
    l2_gradient_distance,
    patch_border_variation,
    total_variation,
)
from .optimise import (
    EngineConfig,
    Parametrization,
    PixelImages,
    RunResult,
    Schedule,
    State,
    Term,
    TermFn,
    constant,
    optimise,
    switch_at,
)

__all__ = [
    "EngineConfig", "Parametrization", "PixelImages", "RunResult", "Schedule", "State", "Term", "TermFn",
    "constant", "cosine_gradient_distance", "gradient_distance", "image_l2", "l2_gradient_distance",
    "patch_border_variation", "optimise", "switch_at", "total_variation",
]
