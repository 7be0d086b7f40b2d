"""CLIP models from open_clip: architecture by name; random init, a local weights file, or pretrained weights
named as open_clip names them.

Pretrained tags (``openai``, ``laion2b_s34b_b79k``) and ``hf-hub:ORG/NAME`` come from the Hugging Face hub
cache through open_clip's pretrained table (:mod:`.pretrained`: downloaded when online, one line saying how
to fetch them when not). Local files are read with ``weights_only=True`` (or as safetensors). Weights are
identified by the SHA-256 of their file (prefixed by the tag for pretrained weights), which observations
record so that an attacker can check that it rebuilt exactly the model the client used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ClipleakError
from ..lazy import lazy_module
from .pretrained import is_pretrained_name, resolve_pretrained, unknown_tag_error

if TYPE_CHECKING:
    import open_clip
else:  # imported on first use: see clipleak.lazy
    open_clip = lazy_module("open_clip")

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_ARCHS = ("tiny-32", "tiny-64", "tiny-224")
_registered = False


def register_configs() -> None:
    """Register clipleak's tiny model configs (:data:`TINY_ARCHS`) with open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def arch_config(arch: str) -> dict | None:
    """open_clip's config dict for ``arch`` (clipleak's tiny ones included), or None if unknown. Stored in
    model cards so a cached artifact is rebuilt when an architecture's definition changes."""
    own = CONFIG_DIR / f"{arch}.json"
    if arch in TINY_ARCHS and own.is_file():  # read directly: no open_clip import for clipleak's own configs
        return json.loads(own.read_text())
    register_configs()
    cfg = open_clip.get_model_config(arch)
    return None if cfg is None else json.loads(json.dumps(cfg))


def list_architectures() -> list[str]:
    """All architecture names open_clip can build, clipleak's tiny ones included."""
    register_configs()
    return list(open_clip.list_models())


if TYPE_CHECKING:

    class OpenClipModel(nn.Module):
        """Static view of an open_clip ``CLIP`` / ``CustomTextCLIP`` (open_clip ships no type information):
        the members clipleak uses. For type checking only; at run time it is open_clip's own class."""

        visual: nn.Module
        logit_scale: nn.Parameter

        def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

        def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...


@dataclass
class ClipModel:
    """A frozen-by-default open_clip model plus what is needed to feed it."""

    model: OpenClipModel
    tokenizer: Callable[..., torch.Tensor]  # class names / captions -> token ids (N, L)
    arch: str
    weights: str | None  # path of the weights file, a pretrained tag / hf-hub:ORG/NAME, or None for random init
    weights_sha256: str  # the file's SHA-256; "<tag>:<sha256>" for a tag; "random-init:<seed>" for random init
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the model's normalised input."""
        mean = torch.tensor(self.mean, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
        return (images01 - mean) / std


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, remembered for this process by (path, size, modification time): a command that
    checks the weights before building the model does not read a 600 MB file twice."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_of(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, safely (``weights_only=True``).

    Accepts what open_clip writes: plain state dicts (``.pt``, ``.pth``, ``.bin``, such as a hub
    repository's ``open_clip_pytorch_model.bin``), ``.safetensors``, and training checkpoints
    (``{"epoch", "state_dict", "optimizer", ...}``) with the ``module.`` prefixes of DataParallel/DDP runs
    (and ``_orig_mod.`` of ``torch.compile``). TorchScript archives (OpenAI's original ``.pt``) and other
    pickled objects are refused: loading them runs code from the file.
    """
    p = Path(path)
    if p.is_dir():
        raise ClipleakError(f"{p} is a folder; pass the weights file in it (.safetensors, .bin or .pt)")
    if not p.is_file():
        raise ClipleakError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        try:
            sd = load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ClipleakError(f"cannot read safetensors file {p}: {e}") from e
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ClipleakError(
                f"cannot read {p} as a weights-only torch checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). TorchScript archives (the original OpenAI .pt "
                "files) and pickled objects are not loaded; use the pretrained tag (--weights openai) or convert "
                "to a state dict or .safetensors."
            ) from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ClipleakError(f"{p} does not hold a state dict of tensors")
        sd = obj
    return _strip_prefixes(dict(sd))


def save_weights(model: nn.Module, path: str | Path) -> str:
    """Save a model's weights as safetensors; returns the file's SHA-256."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(p))
    return file_sha256(p)


def _looks_like_tag(weights: str) -> bool:
    """A word without path characters that is not a file: meant as a tag, not as a file name."""
    return not any(ch in weights for ch in "/\\.") and not Path(weights).exists()


def card_path(weights_path: str | Path) -> Path:
    """The card written beside a weights file by clipleak's training: ``<stem>.card.json``."""
    p = Path(weights_path)
    return p.with_name(p.stem + ".card.json")


def read_card(weights_path: str | Path) -> dict[str, Any] | None:
    """The card beside a weights file (recipe, data split, quality), or ``None`` when there is none
    (a checkpoint the user brought). An unreadable card is an error: it may hide a split mismatch."""
    cp = card_path(weights_path)
    if not cp.is_file():
        return None
    try:
        card = json.loads(cp.read_text())
    except (OSError, ValueError) as e:
        raise ClipleakError(f"cannot read the card {cp}: {e}") from e
    if not isinstance(card, dict):
        raise ClipleakError(f"the card {cp} is not a JSON object")
    return card


def weights_identity(arch: str, weights: str | Path) -> str:
    """What :func:`build_model` will record as ``weights_sha256`` for ``weights``, found without building the
    model: the file's SHA-256 for a local file, ``<tag>:<sha256>`` for a pretrained tag or hub name (read from
    the cache; offline and not cached is the same one-line error as building). Lets a command refuse weights
    that do not match an observation in seconds, before a large model is built."""
    text = str(weights)
    if Path(text).exists():
        return file_sha256(text)
    register_configs()
    if is_pretrained_name(arch, text):
        pre = resolve_pretrained(arch, text, None)
        return f"{pre.name}:{file_sha256(pre.path)}"
    if _looks_like_tag(text):
        raise unknown_tag_error(arch, text)
    raise ClipleakError(f"weights file not found: {text}")


def build_model(
    arch: str,
    weights: str | Path | None = None,
    *,
    init_seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> ClipModel:
    """Build an open_clip model by architecture name.

    Args:
        arch: any open_clip architecture (``ViT-B-32``, ``RN50``, ...) or ``tiny-32`` / ``tiny-64``.
        weights: ``None`` for a random init seeded by ``init_seed``; a local weights file (see
            :func:`load_state_dict_file`); a pretrained tag open_clip knows for ``arch`` (``openai``,
            ``laion2b_s34b_b79k``: ``open_clip.list_pretrained_tags_by_model(arch)``) or ``hf-hub:ORG/NAME``,
            read from the Hugging Face hub cache and downloaded there when online (:mod:`.pretrained`).
            Names such as ``tiny-mnist`` are turned into files above this layer
            (:func:`clipleak.artifacts.resolve`).
        init_seed: seed of the random init (ignored when weights are given).
        cache_dir: the hub cache for pretrained weights (default: huggingface_hub's, from the environment).
    """
    register_configs()
    if arch not in open_clip.list_models():
        raise ClipleakError(
            f"unknown architecture {arch!r}; try one of: {', '.join(TINY_ARCHS)}, ViT-B-32, RN50 "
            "(`clipleak models` lists all)"
        )
    text = None if weights is None else str(weights)
    local = text is not None and Path(text).exists()
    if text is not None and not local and is_pretrained_name(arch, text):
        model, sha, text, pcfg = _pretrained_model(arch, text, cache_dir)
    else:
        if text is not None and not local and _looks_like_tag(text):
            raise unknown_tag_error(arch, text)
        with _quiet_open_clip():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model = open_clip.create_model(arch, pretrained=None, device="cpu")
        sha = f"random-init:{init_seed}"
        if text is not None:
            sd = load_state_dict_file(text)
            _load_into(model, sd, text)
            sha = file_sha256(text)
        pcfg = open_clip.get_model_preprocess_cfg(model)
    model.eval().requires_grad_(False)
    model.to(device)
    size = pcfg.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return ClipModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        arch=arch,
        weights=text,
        weights_sha256=sha,
        image_size=size,
        mean=tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )


def _pretrained_model(arch: str, name: str, cache_dir: str | Path | None) -> tuple[Any, str, str, dict[str, Any]]:
    """``(model, identity, canonical name, preprocess config)`` for a pretrained tag or hub repository, built
    by open_clip from the cached file with the activation (QuickGELU) and preprocessing published with it."""
    pre = resolve_pretrained(arch, name, cache_dir)
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=str(pre.path), device="cpu", weights_only=True,
                                           force_quick_gelu=pre.quick_gelu, force_preprocess_cfg=pre.preprocess)
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError / ValueError / safetensors errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipleakError(f"pretrained weights {pre.name!r} ({pre.path}) do not load into {arch}: "
                            f"{first[:300]}") from e
    return model, f"{pre.name}:{file_sha256(pre.path)}", pre.name, dict(open_clip.get_model_preprocess_cfg(model))


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    # OpenAI-format state dicts need open_clip's key conversion for custom-text models.
    if hasattr(model, "text") and not any(k.startswith("text.") for k in sd):
        sd = open_clip.model.convert_to_custom_text_state_dict(sd)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.endswith("position_ids")}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} with wrong shape (e.g. {k}: file {tuple(sd[k].shape)} vs "
                         f"model {tuple(own[k].shape)})")
        raise ClipleakError(f"weights {where} do not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    logger = logging.getLogger()
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run attention on the math SDPA backend.

    The fused CPU kernels have no double backward ("derivative for aten::_scaled_dot_product_...
    not implemented"), and every gradient-matching attack differentiates a gradient.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield
