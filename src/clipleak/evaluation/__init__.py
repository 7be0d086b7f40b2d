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

__all__ = [
    "LEAKAGE_WARNING_COSINE", "METHODS", "METHOD_LABELS", "PSNR_CAP", "LabelledImages", "evaluate", "label_accuracy",
    "label_count_accuracy", "lpips_distance", "lpips_status", "pair_by_psnr", "psnr", "psnr_matrix",
    "public_nearest_neighbour", "reid_rate", "reidentify", "same_class_gradient_cosine", "ssim", "verdict",
]
