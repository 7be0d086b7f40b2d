"""Inverting Gradients (Geiping et al., NeurIPS 2020): now the ``ig`` preset of
:mod:`clipleak.attacks.gradient_matching` (cosine distance + TV, signed Adam, step decay, box, restarts;
unknown labels optimised jointly; ``prior="generative:VAE"`` searches a VAE's latent space). This module
keeps the old import path."""

from .gradient_matching import IGConfig, gradient_matching

inverting_gradients = gradient_matching

__all__ = ["IGConfig", "inverting_gradients"]
