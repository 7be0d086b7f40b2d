"""A lean functional forward of open_clip's ViT image tower, for attacks that differentiate a gradient.

Gradient-matching attacks run forward, backward with ``create_graph`` and a second backward through
both at every step. On a small ViT at batch 1 that step is bound by the number of operations, not by
arithmetic: every forward operation becomes several in the first backward and more in the second.
``nn.MultiheadAttention`` (through ``F.multi_head_attention_forward`` and the math SDPA kernel) spends
about twice the operations of a plain attention written out (argument checks, separate q/k/v
projections, transposes to sequence-first and back, q and k scaled separately), and an affine
``layer_norm``'s double backward costs more than a plain one's plus a multiply-add.
:func:`lean_encode_image` computes the same function with fewer operations (the tokens of all images as
one matrix, so that each linear layer is one ``addmm``; one packed qkv projection, ``bmm``, scale,
softmax, ``bmm``; the norms' affine part outside the kernel): about 40% fewer operations in an attack
step on tiny-32, equal to ``model.encode_image`` up to float rounding. Its softmax attention is
plain autograd, so it needs no :func:`~clipleak.models.math_attention` context for the double backward.

Only the standard open_clip ViT is covered (pre-norm ``ResidualAttentionBlock`` s with
``nn.MultiheadAttention``, no layer scale, no patch dropout, no attentional pooler, token or average
pooling); :func:`lean_supported` says whether a model is, and callers fall back to ``encode_image``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .factory import ClipModel


def _is_layer_norm(m: nn.Module) -> bool:
    # open_clip's LayerNorm casts back to the input dtype (a no-op in float32); LayerNormFp32 casts to
    # float32 first: same values for float32 inputs, which is all this path is used with
    return isinstance(m, nn.LayerNorm) and m.elementwise_affine and len(m.normalized_shape) == 1


def lean_supported(clip: ClipModel) -> bool:
    """Whether :func:`lean_encode_image` computes ``clip.model.encode_image`` for this model."""
    visual = getattr(clip.model, "visual", None)
    if visual is None or type(visual).__name__ != "VisionTransformer":
        return False
    conv = getattr(visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or conv.bias is not None or conv.padding != (0, 0):
        return False
    ks = conv.kernel_size
    if ks[0] != ks[1] or conv.stride != ks or conv.dilation != (1, 1) or conv.groups != 1:
        return False  # the patch embedding must be non-overlapping square patches (a matrix product)
    size = getattr(clip, "image_size", 0)
    if not size or size % ks[0]:
        return False
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        return False
    if getattr(visual, "pool_type", None) not in ("tok", "avg") or getattr(visual, "output_tokens", False):
        return False
    if not isinstance(visual.patch_dropout, nn.Identity):
        return False
    if not (isinstance(visual.ln_pre, nn.Identity) or _is_layer_norm(visual.ln_pre)):
        return False
    if not _is_layer_norm(visual.ln_post) or visual.proj is None:
        return False
    transformer = visual.transformer
    if not getattr(transformer, "batch_first", True) or getattr(transformer, "grad_checkpointing", False):
        return False
    for blk in transformer.resblocks:
        if type(blk).__name__ != "ResidualAttentionBlock" or hasattr(blk, "ln_1_kv"):
            return False
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first or attn.dropout != 0.0:
            return False
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None:
            return False
        if attn.add_zero_attn or attn.out_proj.bias is None:
            return False
        if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
            return False
        if not (_is_layer_norm(blk.ln_1) and _is_layer_norm(blk.ln_2)):
            return False
        mlp = blk.mlp
        if not isinstance(mlp, nn.Sequential) or len(mlp) != 3:
            return False
        fc, act, proj = mlp
        if not (isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear) and fc.bias is not None
                and proj.bias is not None):
            return False
        if not isinstance(act, nn.GELU):
            return False
    return True


def _ln(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    if isinstance(m, nn.Identity):
        return x
    assert isinstance(m, nn.LayerNorm)
    # the affine part outside the kernel: the double backward of an affine layer_norm costs ~15% more
    # operations than that of a plain one plus a multiply-add
    return F.layer_norm(x, m.normalized_shape, None, None, m.eps) * m.weight + m.bias


def lean_encode_image(clip: ClipModel, images01: torch.Tensor) -> torch.Tensor:
    """``clip.model.encode_image(clip.normalize(images01))`` (raw, not normalised) with fewer operations.

    Needs :func:`lean_supported`; differentiable twice in the images and the tower's parameters.
    """
    visual: Any = clip.model.visual  # open_clip's VisionTransformer (checked by lean_supported)
    weight: torch.Tensor = visual.conv1.weight  # (D, C, P, P), stride P: the patch embedding is a matrix product
    d, c, p = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[2])
    b, g = int(images01.shape[0]), int(images01.shape[-1]) // p
    patches = clip.normalize(images01).view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
    x = patches @ weight.view(d, c * p * p).t()  # (B, grid^2, D)
    x = torch.cat([visual.class_embedding.view(1, 1, d).expand(b, 1, d), x], dim=1) + visual.positional_embedding
    n = int(x.shape[1])
    # the tokens of all images as one (B * N, D) matrix: every linear layer is one addmm, no reshapes
    x = _ln(x.reshape(b * n, d), visual.ln_pre)
    for blk in visual.transformer.resblocks:
        attn = blk.attn
        heads = int(attn.num_heads)
        hd = d // heads
        qkv = F.linear(_ln(x, blk.ln_1), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).reshape(3, b * heads, n, hd).unbind(0)
        scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(hd))
        o = torch.bmm(scores.softmax(-1), v).view(b, heads, n, hd).transpose(1, 2).reshape(b * n, d)
        x = x + F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
        fc, act, proj = blk.mlp
        x = x + F.linear(F.gelu(F.linear(_ln(x, blk.ln_2), fc.weight, fc.bias), approximate=act.approximate),
                         proj.weight, proj.bias)
    x = x.view(b, n, d)
    if visual.pool_type == "avg":
        pooled = _ln(x, visual.ln_post)[:, 1:].mean(dim=1)
    else:
        pooled = _ln(x[:, 0], visual.ln_post)
    return pooled @ visual.proj
