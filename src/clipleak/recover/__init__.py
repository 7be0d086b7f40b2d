"""What the update gives away before any image search: image features (the inverse gradient estimate)
and labels. Exact for CLIP-Adapter; a Levenberg-Marquardt fit of ``J^T dL/dT`` for CoOp."""

from .adapter import AdapterFeatures, adapter_features
from .bank import public_features
from .coop import CoopFit, CoopGradientModel, coop_features, levenberg_marquardt, text_jacobian
from .features import FeatureEstimate, recovered_features
from .labels import predict_labels

__all__ = ["AdapterFeatures", "CoopFit", "CoopGradientModel", "FeatureEstimate", "adapter_features", "coop_features",
           "levenberg_marquardt", "predict_labels", "public_features", "recovered_features", "text_jacobian"]
