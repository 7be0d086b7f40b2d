"""CoOp soft prompts: M learnable context vectors before each class name (Zhou et al. 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import TextTower
from .config import PeftConfig


class PromptLearner(nn.Module):
    """CoOp context vectors (shared ``(M, D)`` or class-specific ``(K, M, D)``)."""

    # buffers registered in __init__
    tokens: torch.Tensor
    prefix: torch.Tensor
    suffix: torch.Tensor
    pool_idx: torch.Tensor

    def __init__(self, tower: TextTower, tokenizer: Any, classnames: list[str], cfg: PeftConfig):
        super().__init__()
        m = cfg.n_ctx
        placeholder = " ".join(["X"] * m)
        device = tower.t.token_embedding.weight.device
        tokens = tokenizer([f"{placeholder} {name}." for name in classnames]).to(device)
        with torch.no_grad():
            emb = tower.embed_tokens(tokens)
        dim = emb.shape[-1]
        g = torch.Generator().manual_seed(cfg.init_seed)
        shape = (len(classnames), m, dim) if cfg.class_specific else (m, dim)
        self.ctx = nn.Parameter((torch.randn(shape, generator=g) * cfg.ctx_init_std).to(device))  # seeded on the CPU
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + m:].clone(), persistent=False)
        self.register_buffer("pool_idx", tower.pool_index(tokens), persistent=False)

    def forward(self) -> torch.Tensor:
        ctx: torch.Tensor = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)
