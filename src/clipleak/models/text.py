"""The text side of a CLIP model: open_clip's text transformer, fed with token embeddings.

Prompt learning (CoOp) and contrastive pretraining both need to run the text tower on embeddings
rather than token ids; :class:`TextTower` gives uniform access for open_clip's built-in CLIP and its
CustomTextCLIP, and cuts the sequence to the pooled token (exact under the causal mask).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipleakError
from .factory import ClipModel

if TYPE_CHECKING:

    class OpenClipText(nn.Module):
        """Static view of open_clip's built-in text transformer (the model itself, or CustomTextCLIP's
        ``.text``): the members :class:`TextTower` uses. For type checking only."""

        token_embedding: nn.Embedding
        positional_embedding: nn.Parameter
        transformer: nn.Module
        ln_final: nn.Module
        text_projection: nn.Parameter | nn.Linear | None


class TextTower:
    """Uniform access to open_clip's text transformer (built-in CLIP or CustomTextCLIP)."""

    def __init__(self, model: nn.Module):
        t = model.text if hasattr(model, "text") else model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(t, n) for n in needed) or getattr(t, "cls_emb", None) is not None:
            raise ClipleakError(
                "prompt learning needs open_clip's built-in text transformer; this architecture's "
                "text tower (e.g. a Hugging Face model or CoCa) is not supported for 'coop'"
            )
        self.t = cast("OpenClipText", t)  # checked just above: open_clip's built-in text transformer
        self.pool_type: str = getattr(t, "text_pool_type", getattr(t, "pool_type", "argmax"))
        self.eos_id: Any = getattr(t, "text_eos_id", getattr(t, "eos_id", None))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.t.token_embedding(tokens)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        raise ClipleakError(f"unsupported text pool type {self.pool_type!r}")

    def encode_embeddings(self, x: torch.Tensor, pool_idx: torch.Tensor) -> torch.Tensor:
        """Text features from token embeddings ``x`` (n, L, D), pooled at ``pool_idx``.

        With a causal mask the pooled token never attends to later positions, so the sequence is
        cut to ``max(pool_idx) + 1`` tokens: exactly the same output, several times cheaper.
        """
        t = self.t
        mask = getattr(t, "attn_mask", None)
        length = x.shape[1]
        if mask is not None:
            length = int(pool_idx.max()) + 1
        x = x[:, :length] + t.positional_embedding[:length].to(x.dtype)
        m = mask[:length, :length] if mask is not None else None
        x = t.transformer(x, attn_mask=m)
        x = t.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool_idx]
        proj = t.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x


@torch.no_grad()
def class_text_features(clip: ClipModel, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Normalised class text features ``(K, E)``; with several templates, the normalised mean
    of the per-template features (CLIP's prompt ensembling)."""
    model = clip.model
    was_training = model.training
    model.eval()
    try:
        feats = []
        for t in templates:
            tokens = clip.tokenizer([t.format(n) for n in classnames]).to(model.logit_scale.device)
            feats.append(F.normalize(model.encode_text(tokens), dim=-1))
    finally:
        model.train(was_training)
    return F.normalize(torch.stack(feats).mean(0), dim=-1)
