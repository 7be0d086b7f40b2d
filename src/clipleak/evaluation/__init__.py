"""Evaluation: image metrics, baselines (blank, class prototype, public nearest neighbour), one-to-one
re-identification, the leakage diagnostic and a plain-words verdict."""

from .diagnostics import LEAKAGE_WARNING_COSINE, public_nearest_neighbour, same_class_gradient_cosine
from .metrics import (
    PSNR_CAP,
    LabelledImages,
    label_accuracy,
    label_count_accuracy,
    lpips_distance,
    lpips_status,
    pair_by_psnr,
    psnr,
    psnr_matrix,
    reid_rate,
    reidentify,
    ssim,
)
from .scoring import METHOD_LABELS, METHODS, evaluate, verdict
from .stats import Interval, at_chance, bootstrap_mean, images_to_separate, pooled_rate, rate_interval, wilson

__all__ = [
    "LEAKAGE_WARNING_COSINE", "METHODS", "METHOD_LABELS", "PSNR_CAP", "Interval", "LabelledImages", "at_chance",
    "bootstrap_mean", "evaluate", "images_to_separate", "label_accuracy", "pooled_rate", "rate_interval", "wilson",
    "label_count_accuracy", "lpips_distance", "lpips_status", "pair_by_psnr", "psnr", "psnr_matrix",
    "public_nearest_neighbour", "reid_rate", "reidentify", "same_class_gradient_cosine", "ssim", "verdict",
]
