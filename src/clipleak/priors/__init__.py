"""Learned image priors trained on the PUBLIC split: a convolutional VAE (latent search) and an FGLA-style
feature-to-image decoder; both stored with cards (:mod:`.store`). Trained by :mod:`clipleak.training`."""

from .common import expand_gray, layout
from .decoder import FeatureDecoder, decoder_images
from .store import FORMAT, KINDS, Prior, check_prior, load_prior, prior_card_path, prior_weights_path, save_prior
from .vae import ConvVAE, LatentImages, latent_prior_loss, vae_codes

__all__ = [
    "FORMAT", "KINDS", "ConvVAE", "FeatureDecoder", "LatentImages", "Prior", "check_prior", "decoder_images",
    "expand_gray", "latent_prior_loss", "layout", "load_prior", "prior_card_path", "prior_weights_path",
    "save_prior", "vae_codes",
]
