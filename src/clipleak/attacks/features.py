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

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data import public_for_observation
from ..diagnostics import cached_public_features
from ..engine import ProgressFn, Term, optimise
from ..errors import ClipleakError
from ..models import math_attention
from ..observation import Observation
from ..peft import Victim
from ..reconstruction import Reconstruction
from .base import (
    AttackConfig,
    engine_config,
    gradient_digest,
    image_parametrization,
    load_decoder,
    register,
    run_tag,
)


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
    target, labels, source = recovered_features(obs, victim, use_shared_labels=cfg.labels != "infer")
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
    features themselves. Computed once by forward-mode AD (``P`` context numbers are few). With
    class-specific context, class ``k``'s feature depends only on its own context block, so the
    Jacobian is block diagonal and each block is one prompt's Jacobian (K times cheaper)."""
    prompt = victim.prompt
    if prompt is None or victim.tower is None:
        raise ClipleakError("the text Jacobian needs a 'coop' victim")
    ctx0 = prompt.ctx.detach()
    tower = victim.tower

    def text_of(ctx: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Normalised text features of the class prompts ``rows`` with context ``ctx``."""
        prefix = prompt.prefix[rows]
        c = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1) if ctx.dim() == 2 else ctx
        emb = torch.cat([prefix, c, prompt.suffix[rows]], dim=1)
        return F.normalize(tower.encode_embeddings(emb, prompt.pool_idx[rows]), dim=-1)

    with torch.no_grad(), math_attention():
        text = text_of(ctx0)
        if ctx0.dim() == 2:
            jac = torch.func.jacfwd(lambda c: text_of(c).reshape(-1))(ctx0).reshape(text.numel(), -1)
        else:
            k, e, block = text.shape[0], text.shape[1], ctx0[0].numel()
            jac = torch.zeros(k * e, k * block)
            for i in range(k):
                block_jac = torch.func.jacfwd(lambda c, i=i: text_of(c, slice(i, i + 1)).reshape(-1))(ctx0[i])
                jac[i * e:(i + 1) * e, i * block:(i + 1) * block] = block_jac.reshape(e, -1)
    return jac, text


class _CoopModel:
    """The CoOp context gradient as a function of the batch's image features and labels.

    ``g(F, y) = J^T vec(tau / B * sum_i (softmax(tau T f_i) - e_{y_i}) f_i^T)`` with ``f_i`` normalised,
    ``T`` the class text features and ``J`` their Jacobian w.r.t. the context (both at the shared
    context, computed once). Exact for the victim's mean cross-entropy (checked against autograd in
    the tests); float64 so the fit can go to relative residuals of 1e-6.
    """

    def __init__(self, victim: Victim):
        jac, text = text_jacobian(victim)
        self.text = text.double()
        self.k, self.e = self.text.shape
        self.jk = jac.double().reshape(self.k, self.e, -1)  # (K, E, P)
        self.scale = float(victim.logit_scale().detach())

    def _weights(self, fn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``softmax(tau T f) - e_y`` per image ``(B, K)``: dL/dlogits of the cross-entropy."""
        return F.softmax(self.scale * fn @ self.text.t(), -1) - F.one_hot(labels, self.k).to(fn.dtype)

    def gradient(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean-loss context gradient ``(P,)`` of a batch of features ``(B, E)`` and labels."""
        fn = F.normalize(feats, dim=-1)
        a = self.scale / feats.shape[0] * self._weights(fn, labels).t() @ fn  # dL/dT, (K, E)
        return torch.einsum("ke,kep->p", a, self.jk)

    def per_candidate(self, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Batch-1 gradients ``(N, P)`` of ``N`` candidate (feature, label) pairs (vectorised)."""
        out = []
        for i in range(0, feats.shape[0], chunk):
            fn = F.normalize(feats[i:i + chunk].double(), dim=-1)
            w = self._weights(fn, labels[i:i + chunk])
            out.append(self.scale * torch.einsum("nk,ne,kep->np", w, fn, self.jk))
        return torch.cat(out)


def _levenberg_marquardt(
    resid: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, iterations: int, lam: float = 1e-2,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, float]:
    """Minimise ``|resid(x)|^2`` from ``x0`` (a flat float64 vector) by damped Gauss-Newton; stops
    early once ``|resid|`` is below ``tol``."""
    x = x0.clone()
    r = resid(x)
    cost = float(r.norm())
    for _ in range(iterations):
        if cost < tol:
            break
        jm = torch.func.jacfwd(resid)(x)
        h = jm.t() @ jm
        step = torch.linalg.solve(h + lam * torch.diag(h.diagonal() + 1e-12), -(jm.t() @ r))
        r_new = resid(x + step)
        c_new = float(r_new.norm())
        if c_new < cost:
            x, r, cost, lam = x + step, r_new, c_new, max(lam / 3, 1e-9)
        else:
            lam *= 4
            if lam > 1e8:
                break
    return x, cost


def coop_features(
    obs: Observation, victim: Victim, public_feats: torch.Tensor, public_labels: torch.Tensor, *,
    labels: torch.Tensor | None = None, starts: int = 1, iterations: int = 200, screen_iterations: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit image features (and labels) to a CoOp context gradient.

    The context gradient is exactly ``J^T dL/dT`` (:class:`_CoopModel`): the unknowns are ``B``
    features of size ``E`` and the labels, not pixels, and no step passes through either encoder.
    Starts come from the attacker's public data: every public image is a candidate (its feature, its
    label); for batch 1 the ``starts`` best-fitting candidates of every label are refined by
    Levenberg-Marquardt on the relative residual (``screen_iterations`` steps), the two best run on
    to ``iterations`` steps and the better fit is kept (so the label is chosen by the fit). The fit
    converges slowly in weakly observed directions: on tiny-mnist 30 steps gave feature cosine
    0.86-0.99, 300 steps 0.976-0.9998, and the decoder needs the feature that close. For a batch, a
    greedy pursuit picks ``B`` candidates that together explain the gradient best,
    then all features are refined jointly (labels stay those of the picked candidates). Shared labels
    restrict the candidates to those labels.
    Returns ``(features (B, E) normalised, labels (B,), relative residual)``.
    """
    if victim.prompt is None:
        raise ClipleakError("CoOp feature fitting needs a 'coop' observation")
    names = list(victim.trainable())
    target = torch.cat([obs.gradients[n].reshape(-1) for n in names]).double()
    model = _CoopModel(victim)
    b, e = obs.batch_size, model.e
    if labels is not None and labels.numel() != b:
        raise ClipleakError(f"{labels.numel()} shared labels for a batch of {b}")
    pf, pl = public_feats.double(), public_labels.long()
    cand = model.per_candidate(pf, pl)  # (N, P) batch-1 gradients of the public images
    gnorm = target.norm().clamp_min(1e-30)

    def refine(feats: torch.Tensor, labs: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        x, cost = _levenberg_marquardt(lambda v: (model.gradient(v.view(-1, e), labs) - target) / gnorm,
                                       feats.reshape(-1).double(), n)
        return x.view(-1, e), cost

    if b == 1:
        allowed = range(model.k) if labels is None else [int(labels[0])]
        res = (cand - target).norm(dim=1)
        pool: list[tuple[torch.Tensor, torch.Tensor]] = []
        for y in allowed:
            idx = torch.nonzero(pl == y).flatten()
            for j in idx[res[idx].argsort()[:starts]].tolist():
                pool.append((pf[j:j + 1], torch.tensor([y])))
        if not pool:
            raise ClipleakError("no public image carries the shared label: cannot start the CoOp fit")
        short = [(*refine(f, y, screen_iterations), y) for f, y in pool]
        short.sort(key=lambda t: t[1])
        fits = [(*refine(f, y, iterations), y) for f, _, y in short[:2]]
        f, cost, y = min(fits, key=lambda t: t[1])
        return F.normalize(f.float(), dim=-1), y, cost
    # batch: greedy pursuit over candidates, then a joint refinement
    chosen: list[int] = []
    total = torch.zeros_like(target)
    for i in range(b):
        ok = torch.ones(pf.shape[0], dtype=torch.bool) if labels is None else pl == int(labels[i])
        if chosen:
            ok[chosen] = False
        if not ok.any():
            raise ClipleakError("no public image carries the shared label: cannot start the CoOp fit")
        res = ((total[None] + cand) / b - target).norm(dim=1)
        res[~ok] = float("inf")
        j = int(res.argmin())
        chosen.append(j)
        total = total + cand[j]
    labs = pl[chosen] if labels is None else labels.long()
    f, cost = refine(pf[chosen], labs, iterations)
    return F.normalize(f.float(), dim=-1), labs, cost


def recovered_features(
    obs: Observation, victim: Victim, *, use_shared_labels: bool = True
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The image-feature estimate this observation allows, with labels and where they came from.

    adapter: exact, from the rank-one rows of the ``W1`` gradient; labels predicted from the
    feature. coop: features and labels fitted to the context gradient (:func:`coop_features`),
    started from the features of the observation's public split; the last fit is memoised per
    (gradients, shared labels, target weights), so several attacks on one observation fit it once.
    """
    shared = obs.labels.clone() if (use_shared_labels and obs.labels is not None) else None
    if victim.cfg.method == "adapter":
        feats = adapter_features(obs, victim)
        if shared is not None:
            return feats, shared, "observation"
        return feats, predict_labels(victim, feats), "predicted from the recovered feature"
    if victim.cfg.method == "coop":
        key = (gradient_digest(obs), None if shared is None else tuple(shared.tolist()),
               victim.clip_info.weights_sha256)
        if key not in _COOP_FITS:
            public = public_for_observation(obs.meta)[1]
            pf = cached_public_features(victim, public)
            feats, labels, _ = coop_features(obs, victim, pf, public.labels, labels=shared)
            _COOP_FITS.clear()
            _COOP_FITS[key] = (feats, labels)
        feats, labels = (t.clone() for t in _COOP_FITS[key])
        return feats, labels, "observation" if shared is not None else "fitted to the context gradient"
    raise ClipleakError(
        f"feature recovery is implemented for 'adapter' and 'coop' observations; this one is "
        f"{victim.cfg.method!r} (use --attack ig)"
    )


_COOP_FITS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
