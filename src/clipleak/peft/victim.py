"""The victim: a frozen CLIP with one trainable parameter-efficient module (or a fine-tune mode).

Methods (``PeftConfig.method``):

* ``coop`` -- CoOp soft prompt: M learnable context vectors, shared by all classes or one set per class
  (``class_specific=True``), placed before each class name: ``[SOT] V1..VM <classname> . [EOT]``.
* ``adapter`` -- CLIP-Adapter: ``A(f) = ReLU(ReLU(f W1) W2)`` on the image feature, mixed in with a
  residual ratio ``alpha``: ``f' = alpha A(f) + (1 - alpha) f``. Text features are fixed
  (``template.format(classname)``).
* ``full-visual`` -- the whole image encoder is trainable; text features fixed.
* ``full`` -- every CLIP parameter is trainable.

Logits are ``logit_scale * cos(f(x), t_k)``; the client's loss is cross-entropy over the class names.
Only the chosen parameters require grad; everything else stays frozen.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipleakError
from ..models import ClipModel, TextTower, encode_images, lean_encode_image, lean_supported
from .adapter import ClipAdapter
from .config import PeftConfig
from .coop import PromptLearner


class Victim(nn.Module):
    """CLIP + the client's trainable module; ``forward(images01) -> logits`` over ``classnames``."""

    # buffers registered in __init__ (fixed_text only for the fixed-text methods)
    class_tokens: torch.Tensor
    fixed_text: torch.Tensor

    def __init__(self, clip: ClipModel, classnames: list[str], cfg: PeftConfig):
        super().__init__()
        if len(classnames) < 2:
            raise ClipleakError("need at least two class names")
        if cfg.method in ("full-visual", "full"):
            # these modes train the CLIP itself: the victim gets its own copy, so that the caller's model
            # (and every other victim built on it) stays frozen
            clip = dataclasses.replace(clip, model=copy.deepcopy(clip.model))
        self.clip_info = clip
        self.clip = clip.model
        self.classnames = list(classnames)
        self.cfg = cfg
        self.clip.requires_grad_(False)
        self.tower = TextTower(self.clip) if cfg.method in ("coop", "full") else None
        self.prompt: PromptLearner | None = None
        self.adapter: ClipAdapter | None = None
        if cfg.method == "coop":
            assert self.tower is not None
            self.prompt = PromptLearner(self.tower, clip.tokenizer, self.classnames, cfg)
        elif cfg.method == "adapter":
            dim = self._embed_dim()
            self.adapter = ClipAdapter(dim, cfg.adapter_reduction, cfg.init_seed).to(self.device)
        elif cfg.method == "full-visual":
            self.clip.visual.requires_grad_(True)
        elif cfg.method == "full":
            self.clip.requires_grad_(True)
        self._lean = lean_supported(clip)  # the attack path's lean image-tower forward applies
        tokens = clip.tokenizer([cfg.template.format(n) for n in self.classnames]).to(self.device)
        self.register_buffer("class_tokens", tokens, persistent=False)
        if cfg.method in ("adapter", "full-visual"):
            with torch.no_grad():
                fixed = self.clip.encode_text(tokens)
            self.register_buffer("fixed_text", F.normalize(fixed, dim=-1), persistent=False)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (the frozen CLIP's; the PEFT module follows it)."""
        return next(self.clip.parameters()).device

    def _embed_dim(self) -> int:
        with torch.no_grad():
            x = torch.zeros(1, 3, self.clip_info.image_size, self.clip_info.image_size, device=self.device)
            return int(self.clip.encode_image(x).shape[-1])

    # -- pieces an attacker re-uses ---------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters the client trains and shares, by name (stable order)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Current values of the PEFT parameters (empty for the full fine-tune modes), on the CPU (what files
        and messages hold)."""
        if self.cfg.method in ("coop", "adapter"):
            return {n: p.detach().cpu().clone() for n, p in self.trainable().items()}
        return {}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        for n, v in state.items():
            if n not in params or params[n].shape != v.shape:
                raise ClipleakError(f"PEFT state {n!r} does not match this model's trainable parameters")
            with torch.no_grad():
                params[n].copy_(v.to(params[n].device))

    def raw_image_features(self, images01: torch.Tensor) -> torch.Tensor:
        """Image-encoder output (before the adapter, not normalised)."""
        return encode_images(self.clip_info, images01, normalize=False)

    def image_features(self, images01: torch.Tensor) -> torch.Tensor:
        """Normalised image features as the classifier sees them (after the adapter, if any)."""
        return self.features_from_raw(self.raw_image_features(images01))

    def features_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """:meth:`image_features` from the encoder output ``raw`` (:meth:`raw_image_features`)."""
        f = raw
        if self.adapter is not None:
            a = self.cfg.adapter_ratio
            f = a * self.adapter(f) + (1 - a) * f
        return F.normalize(f, dim=-1)

    def text_features(self) -> torch.Tensor:
        """Normalised class text features ``(K, E)``."""
        if self.prompt is not None:
            assert self.tower is not None
            t = self.tower.encode_embeddings(self.prompt(), self.prompt.pool_idx)
            return F.normalize(t, dim=-1)
        if self.cfg.method == "full":
            assert self.tower is not None
            emb = self.tower.embed_tokens(self.class_tokens)
            t = self.tower.encode_embeddings(emb, self.tower.pool_index(self.class_tokens))
            return F.normalize(t, dim=-1)
        return self.fixed_text

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.logits_from_raw(self.raw_image_features(images01))

    def logits_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Logits from the frozen encoder's output ``raw``: the part of :meth:`forward` that the PEFT
        parameters of ``coop`` and ``adapter`` act on (per-example gradients vmap over it alone)."""
        return self.logit_scale() * self.features_from_raw(raw) @ self.text_features().t()

    def gradient(self, images01: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradient of the mean cross-entropy w.r.t. the trainable parameters (what a client shares)."""
        params = self.trainable()
        grads = torch.autograd.grad(self.loss(images01, labels), list(params.values()))
        return {n: g.detach().clone() for n, g in zip(params, grads, strict=True)}

    def loss(self, images01: torch.Tensor, labels: torch.Tensor, *, lean: bool = False) -> torch.Tensor:
        """Mean cross-entropy; ``labels`` are class indices ``(B,)`` or soft labels ``(B, K)``.

        ``lean``: the image tower runs :func:`~clipleak.models.lean_encode_image` (the same function, equal
        up to float rounding, with fewer operations: what gradient-matching attacks differentiate twice)
        when the architecture allows it, else the model's own forward. Images and labels elsewhere than the
        victim are moved to its device."""
        labels = labels.to(self.device)
        if lean and self._lean:
            logits = self.logits_from_raw(lean_encode_image(self.clip_info, images01))
        else:
            logits = self(images01)
        if labels.dim() == 2:
            return -(labels * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return F.cross_entropy(logits, labels)


def build_victim(clip: ClipModel, classnames: list[str], cfg: PeftConfig | None = None, *,
                 device: str | torch.device | None = None) -> Victim:
    """Attach the configured PEFT module (default: CoOp, 4 shared context vectors) to a CLIP model.

    ``device``: where the victim computes (the CLIP model is moved there too, in place); ``None`` keeps the
    model's own device. The PEFT module's seeded init is drawn on the CPU first, so it is the same everywhere."""
    victim = Victim(clip, classnames, cfg or PeftConfig())
    return victim if device is None else victim.to(device)
