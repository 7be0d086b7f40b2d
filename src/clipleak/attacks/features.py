"""Image features read off a shared update, and the feature-matching attack built on them.

CLIP-Adapter: ``A(f) = ReLU(ReLU(f W1) W2)`` acts on the image feature ``f``; the gradient of
``W1`` (stored ``(hidden, E)``) is ``sum_i delta_i f_i^T``: each row is a combination of the batch's
features, and for one image it is exactly rank one, its right singular vector the feature
direction (``A`` is positively homogeneous, so the direction is all the classifier uses).
For a batch, hidden units active for only one image give rows parallel to that image's feature:
clustering the row directions separates the batch. The sign comes from the ReLU: a unit with a
non-zero gradient row was active, i.e. ``(W1 f)_j > 0``.

Labels, when not shared, are predicted from the recovered feature with the victim's own classifier
(the attacker knows the text features).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..engine import ProgressFn, Term, optimise
from ..errors import ClipleakError
from ..models import math_attention
from ..observation import Observation
from ..peft import Victim
from ..reconstruction import Reconstruction
from .base import AttackConfig, engine_config, image_parametrization, load_decoder, register, run_tag


def adapter_features(obs: Observation, victim: Victim, tol: float = 0.999) -> torch.Tensor:
    """Normalised image features ``(B, E)`` recovered from a CLIP-Adapter gradient."""
    if victim.cfg.method != "adapter" or "adapter.fc1.weight" not in obs.gradients:
        raise ClipleakError("feature recovery from the gradient needs an 'adapter' observation")
    g = obs.gradients["adapter.fc1.weight"].double()  # (hidden, E)
    w1 = victim.adapter.fc1.weight.detach().double()  # type: ignore[union-attr]
    b = obs.batch_size
    norms = g.norm(dim=1)
    live = norms > 1e-8 * norms.max().clamp_min(1e-30)
    rows = g[live] / norms[live, None]
    live_idx = torch.nonzero(live).flatten()
    feats: list[torch.Tensor] = []
    if b == 1:
        _, _, vh = torch.linalg.svd(g, full_matrices=False)
        feats.append(_orient(vh[0], w1, live_idx))
    else:
        remaining = torch.ones(rows.shape[0], dtype=torch.bool)
        cos = (rows @ rows.t()).abs()
        while len(feats) < b and remaining.any():
            adj = (cos > tol) & remaining[None, :] & remaining[:, None]
            support = adj.sum(1)
            j = int(support.argmax())
            members = torch.nonzero(adj[j]).flatten()
            _, _, vh = torch.linalg.svd(rows[members], full_matrices=False)
            feats.append(_orient(vh[0], w1, live_idx[members]))
            remaining[members] = False
        if len(feats) < b:  # fall back to the top singular directions of what is left
            _, _, vh = torch.linalg.svd(g, full_matrices=False)
            for v in vh:
                if len(feats) == b:
                    break
                if all(abs(float(v @ f)) < tol for f in feats):
                    feats.append(_orient(v, w1, live_idx))
    return F.normalize(torch.stack(feats).float(), dim=-1)


def _orient(v: torch.Tensor, w1: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Pick the sign of ``v`` for which the units with a gradient are active (``W1 v > 0``)."""
    s = (w1[active] @ v).sum()
    return v if s >= 0 else -v


def predict_labels(victim: Victim, features: torch.Tensor) -> torch.Tensor:
    """Class of each recovered (normalised, pre-adapter) feature under the victim's classifier."""
    with torch.no_grad():
        f = features
        if victim.adapter is not None:
            a = victim.cfg.adapter_ratio
            f = a * victim.adapter(f) + (1 - a) * f
        logits = F.normalize(f, dim=-1) @ victim.text_features().t()
    return logits.argmax(-1)


def feature_loss(victim: Victim, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between the images' (pre-adapter) features and the target features."""
    f = F.normalize(victim.raw_image_features(images), dim=-1)
    return (1 - (f * target).sum(-1)).mean()


@register("featmatch")
def feature_matching(
    obs: Observation, victim: Victim, cfg: AttackConfig, progress: ProgressFn | None = None
) -> Reconstruction:
    """Recover the image features from the update, then find images with those features.

    ``prior`` picks pixels (``none``/``tv``) or a VAE latent space (``generative:P``); a ``decoder``
    turns the recovered features into starting images (and with ``iterations=0`` its output is the
    reconstruction). Seconds include the feature recovery.
    """
    t0 = time.perf_counter()
    target, labels, source = recovered_features(obs, victim, use_shared_labels=cfg.labels != "infer",
                                                seed=cfg.seed)
    decoder = load_decoder(cfg, victim)
    start = None
    if decoder is not None:
        from ..priors import decoder_images

        start = decoder_images(decoder, target)
    if decoder is not None and cfg.iterations == 0:  # the decoder's output is the reconstruction
        return Reconstruction(
            images=start, labels=labels, label_source=source, attack="featmatch", history={},
            meta={"attack_config": cfg.to_dict(), "observation": obs.meta, "seconds": time.perf_counter() - t0,
                  "seconds_per_iteration": 0.0, "feature_estimate": target.tolist(),
                  "parametrization": {"kind": "decoder output"}},
        )
    param, prior_terms = image_parametrization(cfg, obs, victim, start_images=start)
    terms = [Term("feature", lambda s: feature_loss(victim, s.images, target)), *prior_terms]
    ecfg = engine_config(cfg, "known", signed=False, decay="cosine")
    res = optimise(param, terms, ecfg, batch=obs.batch_size, num_classes=len(obs.classnames),
                   known_labels=labels, selection="feature", progress=progress, checkpoint=cfg.checkpoint,
                   checkpoint_tag=run_tag(cfg, obs))
    res.seconds = time.perf_counter() - t0
    return Reconstruction(
        images=res.images, labels=labels, label_source=source, attack="featmatch", history=res.history,
        meta={"attack_config": cfg.to_dict(), "observation": obs.meta, "restart_losses": res.restart_losses,
              "best_restart": res.best_restart, "seconds": res.seconds,
              "seconds_per_iteration": res.seconds_per_iteration, "feature_estimate": target.tolist(),
              **res.extra},
    )


def text_jacobian(victim: Victim) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobian ``(K*E, P)`` of the normalised class text features w.r.t. the CoOp context, and the
    features themselves. Computed once by forward-mode AD (``P`` context numbers are few)."""
    prompt = victim.prompt
    if prompt is None or victim.tower is None:
        raise ClipleakError("the text Jacobian needs a 'coop' victim")
    ctx0 = prompt.ctx.detach()
    tower = victim.tower

    def text_of(ctx: torch.Tensor) -> torch.Tensor:
        c = ctx.unsqueeze(0).expand(prompt.prefix.shape[0], -1, -1) if ctx.dim() == 2 else ctx
        emb = torch.cat([prompt.prefix, c, prompt.suffix], dim=1)
        return F.normalize(tower.encode_embeddings(emb, prompt.pool_idx), dim=-1)

    with torch.no_grad(), math_attention():
        text = text_of(ctx0)
        jac = torch.func.jacfwd(lambda c: text_of(c).reshape(-1))(ctx0)
    return jac.reshape(text.numel(), -1), text


def coop_features(
    obs: Observation, victim: Victim, *, steps: int = 150, restarts: int = 2, seed: int = 0,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit image features (and labels) to a CoOp context gradient.

    The context gradient is exactly ``J^T dL/dT``: ``J`` (the text encoder's Jacobian at the shared
    context, computed once) does not depend on the image, and ``dL/dT`` depends only on the image
    feature and the label. So the unknowns are ``B`` features of size ``E``, not pixels, and a step
    needs no pass through either encoder.
    For batch 1 every label is tried and the best fit kept; larger batches fit soft labels jointly.
    Returns ``(features (B, E) normalised, labels (B,))``.
    """
    if victim.prompt is None:
        raise ClipleakError("CoOp feature fitting needs a 'coop' observation")
    names = list(victim.trainable())
    target = torch.cat([obs.gradients[n].reshape(-1) for n in names]).float()
    jac, text = text_jacobian(victim)  # (K*E, P), (K, E)
    scale = victim.logit_scale().detach()
    b, k = obs.batch_size, len(victim.classnames)
    emb = text.shape[-1]

    def fit(label_init: torch.Tensor | None, soft: bool, g: torch.Generator, n: int):
        u = torch.randn(b, emb, generator=g).requires_grad_(True)
        leaves = [u]
        lab_logits = None
        if soft:
            lab_logits = (0.01 * torch.randn(b, k, generator=g)).requires_grad_(True)
            leaves.append(lab_logits)
        opt = torch.optim.Adam(leaves, lr=0.05)
        loss_v = float("inf")
        for it in range(n):
            for group in opt.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * it / n))
            t_leaf = text.detach().requires_grad_(True)
            logits = scale * F.normalize(u, dim=-1) @ t_leaf.t()
            if lab_logits is not None:
                y = F.softmax(lab_logits, -1)
                loss = -(y * F.log_softmax(logits, -1)).sum(-1).mean()
            else:
                loss = F.cross_entropy(logits, label_init)
            a = torch.autograd.grad(loss, t_leaf, create_graph=True)[0]
            gc = jac.t() @ a.reshape(-1)
            d = 1 - F.cosine_similarity(gc, target, dim=0)
            grads = torch.autograd.grad(d, leaves)
            for leaf, gr in zip(leaves, grads, strict=True):
                leaf.grad = gr
            opt.step()
            loss_v = float(d.detach())
        lab = label_init if lab_logits is None else lab_logits.detach().argmax(-1)
        return loss_v, F.normalize(u.detach(), dim=-1), lab

    g = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    if labels is not None:
        cands = [(labels, False)]
    elif b == 1:
        cands = [(torch.tensor([c]), False) for c in range(k)]
    else:
        cands = [(None, True)] * restarts
    if labels is None and b == 1:  # cheap screening of every label, then a full fit of the best
        scores = [(fit(lab, False, g, max(20, steps // 5))[0], lab) for lab, _ in cands]
        cands = [(min(scores, key=lambda s: s[0])[1], False)]
    for lab, soft in cands:
        for _ in range(restarts):
            res = fit(lab, soft, g, steps)
            if best is None or res[0] < best[0]:
                best = res
    assert best is not None
    return best[1], best[2]


def recovered_features(
    obs: Observation, victim: Victim, *, use_shared_labels: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The image-feature estimate this observation allows, with labels and where they came from.

    adapter: exact, from the rank-one rows of the ``W1`` gradient; labels predicted from the
    feature. coop: features and labels fitted to the context gradient (:func:`coop_features`).
    """
    shared = obs.labels.clone() if (use_shared_labels and obs.labels is not None) else None
    if victim.cfg.method == "adapter":
        feats = adapter_features(obs, victim)
        if shared is not None:
            return feats, shared, "observation"
        return feats, predict_labels(victim, feats), "predicted from the recovered feature"
    if victim.cfg.method == "coop":
        feats, labels = coop_features(obs, victim, labels=shared, seed=seed)
        return feats, labels, "observation" if shared is not None else "fitted to the context gradient"
    raise ClipleakError(
        f"feature recovery is implemented for 'adapter' and 'coop' observations; this one is "
        f"{victim.cfg.method!r} (use --attack ig)"
    )
