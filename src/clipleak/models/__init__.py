"""CLIP models from open_clip: the factory, safe weight loading, pretrained tags from the hub cache, the text
tower, image features."""

from .factory import (
    TINY_ARCHS,
    ClipModel,
    arch_config,
    build_model,
    card_path,
    file_sha256,
    list_architectures,
    load_state_dict_file,
    math_attention,
    read_card,
    register_configs,
    save_weights,
    weights_identity,
)
from .features import accuracy, encode_images, image_features, zero_shot_accuracy
from .lean import lean_encode_image, lean_supported
from .pretrained import PretrainedFile, hub_cache_dir, known_tags, resolve_pretrained
from .text import TextTower, class_text_features

__all__ = [
    "TINY_ARCHS", "ClipModel", "PretrainedFile", "TextTower", "accuracy", "arch_config", "build_model",
    "card_path", "class_text_features", "encode_images", "file_sha256", "hub_cache_dir", "image_features",
    "known_tags", "lean_encode_image", "lean_supported", "list_architectures", "load_state_dict_file",
    "math_attention", "read_card", "register_configs", "resolve_pretrained", "save_weights",
    "weights_identity", "zero_shot_accuracy",
]
