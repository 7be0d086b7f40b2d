"""Differential privacy for the client's update: per-example DP-SGD, Dp-CLIP's per-batch clipping, and
accounting with Opacus's RDP and PRV accountants; and the defenses without noise beside them (top-k
pruning, quantisation, sign, clipping: :mod:`.defenses`), applied after DP.

    from clipleak.privacy import DpSetting, epsilon, noise_multiplier
    epsilon(1.0, 0.01, 1000, 1e-5)                  # 2.10 (RDP)
    noise_multiplier(3.0, 1e-5, 0.01, 1000)         # sigma for epsilon 3
    DpSetting("per-example", clip=1.0, epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000).resolve()

This floor imports only peft, models, data, records and errors; the client (``clipleak.client.share``)
and the API build defended observations on it.
"""

from .accountant import ACCOUNTANTS, check_inputs, epsilon, noise_multiplier, prv_bounds
from .defenses import (
    DEFENSE_KINDS,
    Defense,
    apply_defense,
    level_defense,
    parse_defense,
    parse_defense_sweep,
    prune_mask,
)
from .mechanisms import (
    CLIPPINGS,
    clip_gradient,
    clip_per_example,
    dp_clip,
    dp_sgd,
    gaussian_noise,
    global_norm,
    per_example_factors,
)
from .per_example import (
    PER_EXAMPLE_METHODS,
    clipped_sum,
    coop_text_feature_dp,
    per_example_gradients,
    per_example_gradients_from_raw,
    text_feature_gradients,
    text_feature_gradients_from_raw,
)
from .setting import MECHANISMS, SITES, DpSetting, composed_from_dict, composed_to_dict, privatise

__all__ = [
    "ACCOUNTANTS",
    "CLIPPINGS",
    "DEFENSE_KINDS",
    "MECHANISMS",
    "PER_EXAMPLE_METHODS",
    "SITES",
    "Defense",
    "DpSetting",
    "apply_defense",
    "check_inputs",
    "clip_gradient",
    "clip_per_example",
    "clipped_sum",
    "composed_from_dict",
    "composed_to_dict",
    "coop_text_feature_dp",
    "dp_clip",
    "dp_sgd",
    "epsilon",
    "gaussian_noise",
    "global_norm",
    "level_defense",
    "noise_multiplier",
    "parse_defense",
    "parse_defense_sweep",
    "per_example_factors",
    "per_example_gradients",
    "per_example_gradients_from_raw",
    "privatise",
    "prune_mask",
    "prv_bounds",
    "text_feature_gradients",
    "text_feature_gradients_from_raw",
]
