"""What the update gives away before any image search: image features (the inverse gradient estimate)
and labels. Exact for CLIP-Adapter; a Levenberg-Marquardt fit of ``J^T dL/dT`` for CoOp; for full fine-tuning of a ViT,
the image in closed form at batch 1 (APRIL) and the features off the visual projection's gradient.

Modules: ``solvers`` (Levenberg-Marquardt, its batched form, the greedy pursuit, the public-feature
whitening) serves all of them; ``coop_model`` (the ``J^T dL/dT`` model and its least-squares problem),
``coop`` (the fit's entry and batch 1), ``coop_batch`` (batch label searches and the finish) and
``coop_update`` (multi-step updates) are the CoOp read-out; ``adapter`` and ``vit`` the others."""

from .adapter import AdapterFeatures, adapter_features
from .bank import public_features
from .coop import CoopFit, coop_features
from .coop_model import CoopGradientModel, text_jacobian
from .coop_update import CoopTrajectoryModel, coop_update_features, step_batches
from .features import LABEL_MODES, FeatureEstimate, recovered_features
from .labels import predict_labels
from .solvers import levenberg_marquardt
from .vit import (
    ClosedFormImages,
    ProjectionFeatures,
    ProjectionModel,
    closed_form_images,
    labels_from_features,
    pooled_tokens,
    projection_features,
)

__all__ = [
    "LABEL_MODES", "AdapterFeatures", "ClosedFormImages", "CoopFit", "CoopGradientModel", "CoopTrajectoryModel",
    "FeatureEstimate",
    "ProjectionFeatures", "ProjectionModel", "adapter_features", "closed_form_images", "coop_features",
    "coop_update_features",
    "labels_from_features", "levenberg_marquardt", "pooled_tokens", "predict_labels", "projection_features",
    "public_features", "recovered_features", "step_batches", "text_jacobian",
]
