"""Learned image priors trained on the PUBLIC split: a convolutional VAE (latent search), an FGLA-style
feature-to-image decoder, and GradViT's prior network (a BatchNorm CNN whose statistics are an image
prior); all stored with cards (:mod:`.store`). Trained by :mod:`clipleak.training`."""

from .cnn import PriorCNN, bn_prior_term, bn_statistics_loss
from .common import expand_gray, layout
from .decoder import FeatureDecoder, decoder_images
from .store import FORMAT, KINDS, Prior, check_prior, load_prior, prior_card_path, prior_weights_path, save_prior
from .vae import ConvVAE, LatentImages, latent_prior_loss, vae_codes

__all__ = [
    "FORMAT", "KINDS", "ConvVAE", "FeatureDecoder", "LatentImages", "Prior", "PriorCNN", "bn_prior_term",
    "bn_statistics_loss", "check_prior", "decoder_images",
    "expand_gray", "latent_prior_loss", "layout", "load_prior", "prior_card_path", "prior_weights_path",
    "save_prior", "vae_codes",
]
