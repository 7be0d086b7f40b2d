"""The one image-feature function: what the frozen image encoder makes of images in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from .factory import ClipModel
from .text import class_text_features


def encode_images(clip: ClipModel, images01: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Image-encoder features ``(N, E)`` of images ``(N, 3, S, S)`` in [0, 1], differentiable.

    ``normalize`` gives unit vectors (what CLIP's classifier compares); without it, the raw encoder
    output (what a CLIP-Adapter takes). Computed on the model's device (images elsewhere are moved there).
    """
    f = clip.model.encode_image(clip.normalize(images01.to(clip.model.logit_scale.device)))
    return F.normalize(f, dim=-1) if normalize else f


@torch.no_grad()
def image_features(clip: ClipModel, images01: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Normalised features ``(N, E)`` of many images, in eval mode, in batches, without gradients; computed on
    the model's device, returned on the images' device."""
    model = clip.model
    was_training = model.training
    model.eval()
    try:
        feats = [encode_images(clip, images01[i:i + batch_size].contiguous()).float().to(images01.device)
                 for i in range(0, len(images01), batch_size)]
    finally:
        model.train(was_training)
    if not feats:
        raise ClipleakError("no images to compute features of")
    return torch.cat(feats)


def accuracy(img_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose nearest class text feature is their label's."""
    return int((img_feats @ text_feats.t()).argmax(-1).eq(labels).sum()) / len(labels)


def zero_shot_accuracy(clip: ClipModel, images: torch.Tensor, labels: torch.Tensor, classnames: list[str],
                       templates: list[str] | str = "a photo of a {}.", batch_size: int = 500) -> float:
    """Zero-shot classification accuracy: argmax of cos(image feature, class text feature).

    ``templates`` is one prompt or a list, whose per-class text features are averaged (prompt
    ensembling). Images are ``(N, 3, S, S)`` in [0, 1].
    """
    if isinstance(templates, str):
        templates = [templates]
    if len(images) == 0:
        raise ClipleakError("zero-shot accuracy needs at least one image")
    text = class_text_features(clip, classnames, templates).to(images.device)
    return accuracy(image_features(clip, images, batch_size=batch_size), text, labels.to(images.device))
