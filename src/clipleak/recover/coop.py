"""CoOp: image features and labels fitted to a context gradient (the inverse gradient estimate).

The context gradient of a batch is exactly ``J^T dL/dT``: ``J`` is the Jacobian of the class text
features w.r.t. the context (computed once by forward-mode AD) and ``dL/dT`` depends only on the
batch's normalised image features and labels. So the unknowns are ``B`` features and labels, and no
step of the fit passes through either encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..models import math_attention
from ..peft import Victim
from ..records import Observation


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


class CoopGradientModel:
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


def levenberg_marquardt(
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

    The context gradient is exactly ``J^T dL/dT`` (:class:`CoopGradientModel`): the unknowns are ``B``
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
    model = CoopGradientModel(victim)
    b, e = obs.batch_size, model.e
    if labels is not None and labels.numel() != b:
        raise ClipleakError(f"{labels.numel()} shared labels for a batch of {b}")
    pf, pl = public_feats.double(), public_labels.long()
    cand = model.per_candidate(pf, pl)  # (N, P) batch-1 gradients of the public images
    gnorm = target.norm().clamp_min(1e-30)

    def refine(feats: torch.Tensor, labs: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        x, cost = levenberg_marquardt(lambda v: (model.gradient(v.view(-1, e), labs) - target) / gnorm,
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
        f, cost, best_y = min(fits, key=lambda t: t[1])
        return F.normalize(f.float(), dim=-1), best_y, cost
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
