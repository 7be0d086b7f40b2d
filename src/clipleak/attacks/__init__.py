"""Reconstruction attacks. Each builds objective terms and hands them to :mod:`clipleak.engine`.

Attack code sees only an observation, the model and public data; it never imports
:mod:`clipleak.client`.
"""

from .base import ATTACKS, AttackConfig, run_attack

__all__ = ["ATTACKS", "AttackConfig", "run_attack"]
