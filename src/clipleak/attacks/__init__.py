"""Reconstruction attacks: objective pieces for the one engine, each with a typed config.

Importing this package registers every attack: the gradient-matching presets ``dlg``, ``idlg``, ``ig``
and ``gradvit`` (:mod:`.gradient_matching`), ``featmatch``, and the analytic ViT read-outs
``closed-form`` and ``projection`` (:mod:`.analytic`), and ``mip`` (:mod:`.mip`: labels predicted from the
gradient, inverse gradient estimation, a learned decoder). Attack code sees only an observation, the model
and public data; it never imports :mod:`clipleak.client`.
"""

from . import analytic, featmatch, gradient_matching, mip
from .analytic import ClosedFormConfig, ProjectionConfig
from .common import ImageSearchConfig, gradient_matching_term, resolve_labels
from .featmatch import FeatMatchConfig, feature_loss
from .gradient_matching import PRESETS, DLGConfig, GradientMatchingConfig, GradViTConfig, IDLGConfig, IGConfig
from .mip import MIPConfig
from .registry import ATTACKS, AttackSpec, attack_spec, make_config, register, run_attack

__all__ = [
    "ATTACKS", "PRESETS", "AttackSpec", "ClosedFormConfig", "DLGConfig", "FeatMatchConfig", "GradViTConfig",
    "GradientMatchingConfig", "IDLGConfig", "IGConfig", "ImageSearchConfig", "MIPConfig", "ProjectionConfig",
    "analytic", "attack_spec", "feature_loss", "featmatch", "gradient_matching", "gradient_matching_term",
    "make_config", "mip", "register", "resolve_labels", "run_attack",
]
