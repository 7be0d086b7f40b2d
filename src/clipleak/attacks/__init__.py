"""Reconstruction attacks: objective pieces for the one engine, each with a typed config.

Importing this package registers every attack (``ig``, ``featmatch``). Attack code sees only an
observation, the model and public data; it never imports :mod:`clipleak.client`.
"""

from . import featmatch, inverting_gradients
from .common import ImageSearchConfig, gradient_matching_term, resolve_labels
from .featmatch import FeatMatchConfig, feature_loss
from .inverting_gradients import IGConfig
from .registry import ATTACKS, AttackSpec, attack_spec, make_config, register, run_attack

__all__ = ["ATTACKS", "AttackSpec", "FeatMatchConfig", "IGConfig", "ImageSearchConfig", "attack_spec",
           "feature_loss", "featmatch", "gradient_matching_term", "inverting_gradients", "make_config", "register",
           "resolve_labels", "run_attack"]
