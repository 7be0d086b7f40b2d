"""CoOp: image features and labels fitted to a context gradient (the inverse gradient estimate).

The context gradient of a batch is exactly ``J^T dL/dT``: ``J`` is the Jacobian of the class text
features w.r.t. the context (computed once by forward-mode AD) and ``dL/dT`` depends only on the
batch's normalised image features and labels. So the unknowns are ``B`` features and labels, and no
step of the fit passes through either encoder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..models import math_attention
from ..peft import Victim
from ..records import Observation
from .noise import NOISE_MARGIN, relative_noise_floor


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

    ``g(F, y) = J^T vec(A)`` with ``A = dL/dT = tau / B * sum_i (softmax(tau T f_i) - e_{y_i}) f_i^T``, ``f_i``
    normalised, ``T`` the class text features and ``J`` their Jacobian w.r.t. the context (both at the
    shared context, computed once). Exact for the victim's mean cross-entropy (checked against autograd in
    the tests); float64 so the fit can go to relative residuals of 1e-6.

    The fit works in *reduced coordinates*: with ``J = U S V^T`` (per class block when the context is
    class-specific), ``|J^T vec(A) - g|^2 = |S U^T vec(A) - V^T g|^2 + const``, so ``R = S U^T`` maps an
    ``A`` to the ``r = rank(J)`` numbers the gradient determines, and no step multiplies by ``J``.
    """

    def __init__(self, victim: Victim, jac_text: tuple[torch.Tensor, torch.Tensor] | None = None):
        jac, text = jac_text if jac_text is not None else text_jacobian(victim)
        assert victim.prompt is not None
        self.class_specific = victim.prompt.ctx.dim() == 3
        self.text = text.double()
        self.k, self.e = self.text.shape
        jd = jac.double()
        self.jk = jd.reshape(self.k, self.e, -1)  # (K, E, P)
        self.scale = float(victim.logit_scale().detach())
        rows: list[torch.Tensor] = []
        bases: list[torch.Tensor] = []
        self.blocks: list[torch.Tensor] = []  # class-specific: class k's rows of R, restricted to its E columns
        if self.class_specific:
            block = jd.shape[1] // self.k
            for i in range(self.k):
                u, sv, vh = torch.linalg.svd(jd[i * self.e:(i + 1) * self.e, i * block:(i + 1) * block],
                                             full_matrices=False)
                keep = sv > 1e-7 * float(sv.max())
                r = torch.zeros(int(keep.sum()), self.k * self.e, dtype=torch.float64)
                r[:, i * self.e:(i + 1) * self.e] = sv[keep, None] * u[:, keep].t()
                rows.append(r)
                self.blocks.append(r[:, i * self.e:(i + 1) * self.e])
                v = torch.zeros(jd.shape[1], int(keep.sum()), dtype=torch.float64)
                v[i * block:(i + 1) * block] = vh[keep].t()
                bases.append(v)
        else:
            u, sv, vh = torch.linalg.svd(jd, full_matrices=False)
            keep = sv > 1e-7 * float(sv.max())
            rows.append(sv[keep, None] * u[:, keep].t())
            bases.append(vh[keep].t())
        self.R = torch.cat(rows)  # (r, K*E)
        self.V = torch.cat(bases, dim=1)  # (P, r)
        self.rank = int(self.R.shape[0])

    def weights(self, fn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``softmax(tau T f) - e_y`` per image ``(B, K)``: dL/dlogits of the cross-entropy."""
        return F.softmax(self.scale * fn @ self.text.t(), -1) - F.one_hot(labels, self.k).to(fn.dtype)

    def a_matrix(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``A = dL/dT`` ``(K, E)`` of a batch of features ``(B, E)`` (normalised here) and labels."""
        fn = F.normalize(feats, dim=-1)
        return self.scale / feats.shape[0] * self.weights(fn, labels).t() @ fn

    def gradient(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean-loss context gradient ``(P,)`` of a batch of features ``(B, E)`` and labels."""
        return torch.einsum("ke,kep->p", self.a_matrix(feats, labels), self.jk)

    def reduce(self, g: torch.Tensor) -> torch.Tensor:
        """The observed gradient in reduced coordinates ``(r,)``."""
        return self.V.t() @ g.double()

    def reduced(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted gradient of ``(feats, labels)`` in reduced coordinates ``(r,)``. With class-specific
        context ``R`` is block diagonal and is applied block by block (K times fewer operations)."""
        a = self.a_matrix(feats, labels)
        if self.blocks:
            return torch.cat([blk @ a[i] for i, blk in enumerate(self.blocks)])
        return self.R @ a.reshape(-1)

    def per_candidate(self, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Batch-1 gradients of ``N`` candidate (feature, label) pairs in reduced coordinates ``(N, r)``."""
        rk = self.R.view(self.rank, self.k, self.e)
        out = []
        for i in range(0, feats.shape[0], chunk):
            fn = F.normalize(feats[i:i + chunk].double(), dim=-1)
            w = self.weights(fn, labels[i:i + chunk])
            out.append(self.scale * torch.einsum("nk,ne,rke->nr", w, fn, rk))
        return torch.cat(out)

    def bilinear(self, z: torch.Tensor, iterations: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch 1 without any start: ``A = w f^T`` is rank one, so alternating least squares on
        ``R vec(w f^T) = z`` gives ``w`` (``tau (p - e_y)`` up to scale) and the feature direction ``f``.
        ``p - e_y`` has exactly one negative entry, at the label: that fixes the sign, and the label is
        read off ``w`` (as iDLG reads a last layer's gradient)."""
        rk = self.R.view(self.rank, self.k, self.e)
        a0 = torch.linalg.lstsq(self.R, z[:, None]).solution.view(self.k, self.e)
        u, sv, vh = torch.linalg.svd(a0, full_matrices=False)
        w, f = u[:, 0] * sv[0], vh[0]
        for _ in range(iterations):
            f = torch.linalg.lstsq(torch.einsum("rke,k->re", rk, w), z[:, None]).solution[:, 0]
            f = f / f.norm().clamp_min(1e-30)
            w = torch.linalg.lstsq(torch.einsum("rke,e->rk", rk, f), z[:, None]).solution[:, 0]
        if int((w < 0).sum()) > int((w > 0).sum()):
            w, f = -w, -f
        return w, f


def batched_levenberg_marquardt(resid: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                                iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt from every row of ``x0`` at once (each row its own problem and damping);
    returns the rows reached and their residual norms."""
    x = x0.clone()
    batched = torch.func.vmap(resid)
    jac = torch.func.vmap(torch.func.jacfwd(resid))
    r = batched(x)
    cost = r.norm(dim=1)
    lam = torch.full((x.shape[0],), 1e-2, dtype=x.dtype)
    for _ in range(iterations):
        jm = jac(x)  # (S, R, P)
        h = jm.transpose(1, 2) @ jm
        damp = lam[:, None, None] * torch.diag_embed(torch.diagonal(h, dim1=1, dim2=2) + 1e-12)
        step = torch.linalg.solve(h + damp, -(jm.transpose(1, 2) @ r[..., None]))[..., 0]
        r_new = batched(x + step)
        c_new = r_new.norm(dim=1)
        better = c_new < cost
        x = torch.where(better[:, None], x + step, x)
        r = torch.where(better[:, None], r_new, r)
        cost = torch.where(better, c_new, cost)
        lam = torch.where(better, (lam / 3).clamp_min(1e-9), lam * 4)
    return x, cost


CONVERGED = 1e-4
"""Relative residual below which a fit counts as converged (true features reach about 1e-6)."""

UNDERDETERMINED_PRIOR = 1e-3
"""Weight of the Gaussian public-feature prior when the gradient determines fewer numbers than there are
unknown feature numbers (shared context, ``B > 1``): it keeps the unobserved directions at typical values."""

DETERMINED_PRIOR = 1e-8
"""The same prior's weight for a determined batch fit (class-specific context, ``B > 1``). The client's
float32 gradient leaves the truth a relative residual of about 1e-6, and inside that tolerance two
images of one label with similar ``p - e_y`` can trade feature directions: without a prior the fit
stopped at residuals as low as the truth's with a feature at cosine 0.96-0.98 (4 of 6 validation
batches of 4, draws 8-13). A weight of 1e-8 (a prior term of about 1e-4, above that tolerance but
far below a wrong label's residual) brought every feature of those batches to cosine >= 0.9997;
1e-9: 0.96-0.98 left in 3 of them, 1e-7: >= 0.9994 and slower."""


SHARED_CONTINUATION = ((1e-2, 40), (1e-3, 40), (1e-4, 40), (1e-5, 40), (1e-6, 40), (0.0, 100))
"""(prior weight, LM steps) of a shared-context batch fit with as many gradient numbers as unknown feature
directions (batch 4 with 4 context vectors: 508 and 4 x 127): the prior's fit first, then the prior is let
go. With the right labels the system is square and LM without a prior returns to the truth from features at
cosine 0.91-0.98 (validation draws 0-1); the prior's fit alone stops at relative residual 3e-3 with features
at cosine 0.97-0.99; letting it go (1e-3, 1e-6, 0) took the right labels to 2e-5 - 3e-4 (6 of 7 validation
batches, draws 1-3 and 5-8), a wrong label multiset to 8e-4 or more (one reached 1.7e-4). Started from the
truth, that 1e-3 stage moved the fit off it (6e-5, cosine 0.96); a decade at a time, as here, took two
stalled validation batches to cosines 0.96-0.998 (validation seeds 20-23: 46% re-identified, 34% before)."""

SHARED_SWAP = ((1e-3, 20), (1e-6, 20), (0.0, 40))
"""The shorter continuation of a label multiset one label away from the best, started from the best fit."""

SHARED_POLISH = (4, 500, 1000)
"""(finalists, screen, finish) of a shared-context batch fit's finish (:func:`_finish_shared`): the label
multisets with the lowest data residuals (at most ``finalists``) each go on for ``screen`` prior-free LM steps,
and the best for ``finish`` more. Validation draws 20-27 (trained target, batch 4): re-identified 55% before,
63% with the best fit alone going on for 1,500 steps, 66% (labels 94% to 97%) with 4 finalists. It costs up
to 3,000 LM steps (about 3.5 s per 100 at batch 4 on one thread)."""

SHARED_CONVERGED = 1e-4
"""Data residual below which a shared-context label multiset is accepted without trying the next."""

SHARED_SUBSPACES = (32, 16, 8)
"""Public principal subspaces (dimension besides the mean) in which :func:`shared_label_sets` fits ``dL/dT``."""


def levenberg_marquardt(
    resid: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, iterations: int, lam: float = 1e-2,
    tol: float = 1e-8, jacobian: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """Minimise ``|resid(x)|^2`` from ``x0`` (a flat float64 vector) by damped Gauss-Newton; stops
    early once ``|resid|`` is below ``tol``. ``jacobian`` (default: forward-mode AD of ``resid``)."""
    x = x0.clone()
    r = resid(x)
    cost = float(r.norm())
    for _ in range(iterations):
        if cost < tol:
            break
        jm = jacobian(x) if jacobian is not None else torch.func.jacfwd(resid)(x)
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


@dataclass
class CoopFit:
    """Features ``(B, E)`` (normalised), labels ``(B,)`` and the relative residual of a CoOp fit.

    ``label_coefficients`` (batch 1): ``w ~ p - e_y`` read off the gradient by :meth:`CoopGradientModel.bilinear`,
    negative at the predicted label. ``determined``: the gradient's rank over the number of unknown feature
    numbers (``B * E``); below 1 the system is under-determined and the public-feature prior fills the rest.
    ``noise_floor``: the relative residual the observation's DP noise alone leaves (0: undefended).
    """

    features: torch.Tensor
    labels: torch.Tensor
    residual: float
    label_coefficients: torch.Tensor | None
    determined: float
    noise_floor: float = 0.0


def coop_features(
    obs: Observation, victim: Victim, public_feats: torch.Tensor, public_labels: torch.Tensor, *,
    labels: torch.Tensor | None = None, iterations: int = 150, screen_iterations: int = 20,
    prior_weight: float | None = None,
    model: CoopGradientModel | None = None,
    obs_noise: bool = True,
    swaps: int = 2,
) -> CoopFit:
    """Fit image features (and labels) to a CoOp context gradient (MIP's inverse gradient estimation).

    The context gradient is exactly ``J^T dL/dT`` (:class:`CoopGradientModel`): the unknowns are ``B``
    features of size ``E`` and the labels, not pixels, and no step passes through either encoder; the fit
    runs in the ``rank(J)`` reduced coordinates.

    Batch 1: the label comes first, read off the gradient (:meth:`CoopGradientModel.bilinear`); the two
    most negative coefficients give two candidate labels; each is refined by Levenberg-Marquardt
    (``screen_iterations`` steps) from the bilinear feature and from the best-fitting public feature of that
    label, and the lowest residual goes on for ``iterations`` steps.
    Batch B: ``dL/dT`` is fitted as a rank-``B`` matrix with rows summing to zero (:func:`low_rank_dl_dt`);
    a greedy pursuit picks ``B`` public candidates (feature projected into its row space, label) that together
    explain the gradient, then all features are refined jointly. When the gradient determines fewer numbers than
    there are unknowns (shared context, ``B > 1``), a Gaussian prior fitted to the public features
    (``prior_weight``; default :data:`UNDERDETERMINED_PRIOR` then) keeps the unobserved directions at typical
    values; a determined batch fit gets a much weaker one (:data:`DETERMINED_PRIOR`), batch 1 none.
    Shared context whose gradient has as many numbers as unknown feature directions (batch 2 and 4 with 4
    context vectors), undefended: the label multisets come first (:func:`shared_label_sets`; ``swaps``
    rounds of one-label changes when none fits), and each is fitted with the prior and then without it
    (:func:`_shared_batch_fit`). A determined batch fit that stalls above :data:`CONVERGED` while the label
    roots are isolated (``2 B <= K``) tries ``swaps`` rounds of one-label changes (:func:`one_label_changes`).
    Class-specific context where they are not (``K < 2 B``, e.g. batch 8 of 10 classes), labels not shared:
    the labels come first, from the signs of ``A``'s rows (:func:`signed_labels`, :func:`_signed_labels_fit`).
    ``CoopFit.residual`` is the relative residual of the gradient alone.
    Shared labels restrict the candidates to those labels.

    A defended observation (``obs.meta["defense"]``, ``obs_noise``): the fits stop at the relative residual
    the DP noise alone leaves in the reduced coordinates (:mod:`clipleak.recover.noise`) instead of
    iterating towards 1e-8, and a candidate that reaches it counts as converged; ``CoopFit.noise_floor``
    reports it.
    """
    if victim.prompt is None:
        raise ClipleakError("CoOp feature fitting needs a 'coop' observation")
    names = list(victim.trainable())
    target = torch.cat([obs.gradients[n].reshape(-1) for n in names]).double()
    model = model if model is not None else CoopGradientModel(victim)
    b, e = obs.batch_size, model.e
    if labels is not None and labels.numel() != b:
        raise ClipleakError(f"{labels.numel()} shared labels for a batch of {b}")
    z = model.reduce(target)
    zn = z.norm().clamp_min(1e-30)
    floor = relative_noise_floor(obs, model.rank, float(zn)) if obs_noise else 0.0
    tol = max(1e-8, floor)
    converged = max(CONVERGED, NOISE_MARGIN * floor)
    pf, pl = public_feats.double(), public_labels.long()
    determined = model.rank / float(b * e)
    if prior_weight is None:
        prior_weight = UNDERDETERMINED_PRIOR if determined < 1.0 else (DETERMINED_PRIOR if b > 1 else 0.0)
    # the fit runs in whitened public-feature coordinates f = mu + S u (S = Cov^(1/2)): the weakly observed
    # directions are the low-variance ones, and in u they are as easy to move as the others (on validation
    # digits LM reached relative residual 3e-6 in 150 steps this way, 1e-4 without)
    unit = F.normalize(pf, dim=-1)
    mu = unit.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((unit - mu).T))
    evals = evals.clamp_min(1e-6 * float(evals.max()))
    sq = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    inv_sq = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    lam = float(prior_weight) ** 0.5

    def resid_fn(labs: torch.Tensor, lam: float = lam) -> Callable[[torch.Tensor], torch.Tensor]:
        def resid(u: torch.Tensor) -> torch.Tensor:
            feats = mu + u.view(-1, e) @ sq
            r = (model.reduced(feats, labs) - z) / zn
            if lam > 0:
                r = torch.cat([r, lam * u / u.numel() ** 0.5])
            return r
        return resid

    def refine(feats: torch.Tensor, labs: torch.Tensor, n: int) -> tuple[torch.Tensor, float, float]:
        """LM from ``feats``: the features, the cost LM minimised (data and prior) and the relative
        residual of the data alone (what the report and, for a determined fit, the convergence test read)."""
        u0 = (F.normalize(feats.double(), dim=-1) - mu) @ inv_sq
        u, cost = levenberg_marquardt(resid_fn(labs), u0.reshape(-1), n, tol=tol)
        f = mu + u.view(-1, e) @ sq
        return f, cost, float((model.reduced(f, labs) - z).norm() / zn) if lam > 0 else cost

    if not model.class_specific and b > 1 and model.rank >= b * (e - 1) and floor == 0.0:
        # shared context with as many gradient numbers as unknown feature directions
        fitted = _shared_batch_fit(model, z, b, pf, pl, labels, resid_fn, (mu, sq, inv_sq), tol, swaps)
        if fitted is not None:
            return CoopFit(F.normalize(fitted[0].float(), dim=-1), fitted[1], fitted[2], None, determined, floor)

    if b == 1:
        w, f0 = model.bilinear(z)
        allowed = [int(labels[0])] if labels is not None else [int(i) for i in torch.argsort(w)[:2]]
        screened = []
        for y in allowed:
            yt = torch.tensor([y])
            idx = torch.nonzero(pl == y).flatten()
            starts = [f0[None]]
            if idx.numel():
                res = (model.per_candidate(pf[idx], pl[idx]) - z[None]).norm(dim=1)
                starts.append(pf[int(idx[res.argmin()])][None])
            for st in starts:
                screened.append((*refine(st, yt, screen_iterations)[:2], yt))
        screened.sort(key=lambda t: t[1])
        best: tuple[torch.Tensor, float, torch.Tensor] | None = None
        for f, _, yt in screened:  # the best screened fit first; the next ones only if it stalls
            f, cost = refine(f, yt, iterations)[:2]
            if best is None or cost < best[1]:
                best = (f, cost, yt)
            if cost < converged:
                break
        assert best is not None
        return CoopFit(F.normalize(best[0].float(), dim=-1), best[2], best[1], w.float(), determined, floor)
    # batch: a greedy pursuit picks B public candidates (feature, its label) that together explain the
    # gradient, then all features are refined jointly. (Tried on validation digits and dropped: candidates
    # with every label, re-fitting after each pick, and, while 2B <= K, reading the labels off the signs of
    # A's rows, where the label roots do better; none improved the fits.)
    # a determined fit counts as converged on its data residual; an under-determined one (whose data
    # residual any number of wrong features reach) only on data and prior together
    a = low_rank_dl_dt(model, z, b)
    candidates = _batch_candidates(model, a, b, pf, pl)

    def batch_fit(given: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        found: tuple[torch.Tensor, torch.Tensor, float, float] | None = None
        for feats_c, labs_c in candidates:
            if given is not None and any(int((labs_c == y).sum()) < int((given == y).sum()) for y in given.unique()):
                continue  # this candidate set cannot start a fit with these labels
            chosen = _pursuit(z, model.per_candidate(feats_c, labs_c), labs_c, b, given)
            labs = labs_c[chosen] if given is None else given.long()
            f, cost, data = refine(feats_c[chosen], labs, iterations)
            if found is None or cost < found[2]:
                found = (f, labs, cost, data)
            if (data if determined >= 1.0 else cost) < converged:
                break
        if found is None:
            raise ClipleakError("too few public images carry the shared labels: cannot start the CoOp fit")
        return found

    if labels is None and model.class_specific and model.k < 2 * b <= 2 * model.k:
        # label roots are not isolated here (2B > K): the labels come first, from the signs of A's rows
        f, labs, data = _signed_labels_fit(model, z, a, b, pf, pl, batch_fit,
                                           lambda st, lb: refine(st, lb, iterations)[::2], swaps, converged)
        return CoopFit(F.normalize(f.float(), dim=-1), labs, data, None, determined, floor)
    f, labs, _, data = batch_fit(labels)
    if labels is None and swaps > 0 and determined >= 1.0 and 2 * b <= model.k and data >= converged:
        # a determined fit with isolated label roots that stalled: a label is likely wrong
        f, labs, data = one_label_changes(
            model, z, pf, pl, model.per_candidate(pf, pl), (f, labs, data),
            lambda st, lb: refine(st, lb, iterations)[::2],
            list(range(model.k)), {tuple(sorted(labs.tolist()))}, swaps, converged)
    return CoopFit(F.normalize(f.float(), dim=-1), labs, data, None, determined, floor)


def _pursuit(z: torch.Tensor, cand: torch.Tensor, cand_labels: torch.Tensor, b: int,
             labels: torch.Tensor | None = None) -> list[int]:
    """Greedy pursuit: ``b`` distinct candidates (their batch-1 reduced gradients ``cand``) that together
    explain the mean-loss gradient ``z``, one per slot; with ``labels``, slot ``i`` takes only candidates
    of label ``labels[i]``."""
    chosen: list[int] = []
    total = torch.zeros_like(z)
    for i in range(b):
        ok = torch.ones(cand.shape[0], dtype=torch.bool) if labels is None else cand_labels == int(labels[i])
        if chosen:
            ok[chosen] = False
        res = ((total[None] + cand) / b - z).norm(dim=1)
        res[~ok] = float("inf")
        j = int(res.argmin())
        chosen.append(j)
        total = total + cand[j]
    return chosen


def _shared_batch_fit(
    model: CoopGradientModel, z: torch.Tensor, b: int, pf: torch.Tensor, pl: torch.Tensor,
    labels: torch.Tensor | None, resid_fn: Callable[[torch.Tensor, float], Callable[[torch.Tensor], torch.Tensor]],
    whitening: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tol: float, swaps: int,
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """A shared-context batch whose gradient has as many numbers as unknown feature directions (features,
    labels, data residual; ``None`` without a candidate label multiset).

    Each candidate label multiset (the shared labels, or :func:`shared_label_sets`) is fitted from its label
    roots, then from a pursuit among the public features (``pf``, labels ``pl``), each time with the prior
    first and then without it (:data:`SHARED_CONTINUATION`); the first below :data:`SHARED_CONVERGED` is
    taken. Otherwise up to ``swaps`` rounds change one label at a time, warm-started from the best fit
    (:data:`SHARED_SWAP`), and the lowest data residual wins. Last, the lowest-residual multisets go on without the
    prior (:func:`_finish_shared`). ``resid_fn(labels, sqrt_prior_weight)`` is the
    whitened residual of :func:`coop_features`, ``whitening`` its ``(mu, S, S^-1)``."""
    mu, sq, inv_sq = whitening
    e = model.e
    zn = z.norm().clamp_min(1e-30)
    unit = F.normalize(pf.double(), dim=-1)
    sets = [(labels.long(), None)] if labels is not None else shared_label_sets(model, z, b, pf, pl)
    cand = model.per_candidate(pf, pl)

    def let_go(start: torch.Tensor, labs: torch.Tensor,
               schedule: tuple[tuple[float, int], ...]) -> tuple[torch.Tensor, float]:
        u = ((F.normalize(start, dim=-1) - mu) @ inv_sq).reshape(-1)
        for weight, n in schedule:
            u = levenberg_marquardt(resid_fn(labs, weight ** 0.5), u, n, tol=tol)[0]
        f = mu + u.view(-1, e) @ sq
        return f, float((model.reduced(f, labs) - z).norm() / zn)

    fitted: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, float]] = {}  # the best fit per multiset

    def fit(start: torch.Tensor, labs: torch.Tensor,
            schedule: tuple[tuple[float, int], ...]) -> tuple[torch.Tensor, float]:
        f, data = let_go(start, labs, schedule)
        key = tuple(sorted(labs.tolist()))
        if key not in fitted or data < fitted[key][2]:
            fitted[key] = (f, labs, data)
        return f, data

    best_shared: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for labs, roots in sets:  # each multiset from its roots, then from a pursuit among the public features
        for start in [*([roots] if roots is not None else []), unit[_pursuit(z, cand, pl, b, labs)]]:
            f, data = fit(start, labs, SHARED_CONTINUATION)
            if best_shared is None or data < best_shared[2]:
                best_shared = (f, labs, data)
            if data < SHARED_CONVERGED:
                break
        if best_shared is not None and best_shared[2] < SHARED_CONVERGED:
            break
    if best_shared is not None and labels is None and swaps > 0 and best_shared[2] >= SHARED_CONVERGED:
        named = torch.cat([labs for labs, _ in sets])
        changed = one_label_changes(
            model, z, pf, pl, cand, best_shared, lambda st, labs: fit(st, labs, SHARED_SWAP),
            sorted(range(model.k), key=lambda y: -int((named == y).sum())),
            {tuple(sorted(labs.tolist())) for labs, _ in sets}, swaps, SHARED_CONVERGED)
        if changed[1] is not best_shared[1]:  # a short fit won: finish it
            f, data = fit(changed[0], changed[1], SHARED_CONTINUATION)
            best_shared = (f, changed[1], data) if data < changed[2] else changed
    if best_shared is None:
        return None
    return _finish_shared(list(fitted.values()), best_shared,
                          lambda st, labs, n: let_go(st, labs, ((0.0, n),)))


def _finish_shared(
    fits: list[tuple[torch.Tensor, torch.Tensor, float]], best: tuple[torch.Tensor, torch.Tensor, float],
    go_on: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, float]],
    polish: tuple[int, int, int] = SHARED_POLISH,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The finish of a shared-context batch fit (:data:`SHARED_POLISH`): the ``finalists`` fits ``(features,
    labels, data residual)`` with the lowest residuals each go on for ``screen`` prior-free LM steps
    (``go_on(features, labels, steps)``), and the lowest after that for ``finish`` more; ``best`` (the search's
    pick) is kept unless the finished fit explains the gradient better.

    With the right labels the data residual keeps falling without the prior, slowly, since the confidently
    classified digits (``|p - e_y|`` about 0.01) barely enter the gradient: validation draw 22 (trained target)
    from 2e-4 to 9.5e-7 in 1,500 steps, its two confident digits from cosine 0.78 / 0.77 to 0.88 / 0.93, where a
    wrong multiset one label away went from 8.6e-5 to 7.6e-5. The short fits of the label search (80 steps)
    cannot rank them; the finished ones can."""
    finalists, screen, finish = polish
    if screen + finish <= 0 or not fits:
        return best
    ranked = sorted(fits, key=lambda t: t[2])[:max(1, finalists)]
    screened = [(*go_on(f, labs, screen), labs) if screen > 0 else (f, data, labs) for f, labs, data in ranked]
    f, data, labs = min(screened, key=lambda t: t[1])
    if finish > 0:
        f, data = go_on(f, labs, finish)
    return (f, labs, data) if data < best[2] else best


def signed_labels(model: CoopGradientModel, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-specific context: the classes ``A = dL/dT`` marks present, read off its rows' signs (as iDLG reads a
    last layer), and every class's score. Row ``k`` is ``tau/B sum_i (p_ik - y_ik) f_i``: an image of class
    ``k`` enters it with a negative weight, the others with positive ones, and every digit's feature points
    towards its own class's text feature, so ``score_k = a_k . t_k`` is negative when class ``k``'s own
    images dominate the row. Returns ``(present, score)``: the classes with a negative score, sorted, and
    the ``(K,)`` scores. On 16 validation batches of 8 (8 with distinct labels, 8 drawn at random) every
    class with a negative score was in the batch (4-7 of the batch's 5-8 classes); the confident
    classification of the others makes their own weight ``p_y - 1`` (about -0.01) no larger than the other
    images' ``p_ik``, so a positive score does not mean absent."""
    score = (a * model.text).sum(1)
    return torch.nonzero(score < 0).flatten(), score


def _signed_labels_fit(
    model: CoopGradientModel, z: torch.Tensor, a: torch.Tensor, b: int, pf: torch.Tensor, pl: torch.Tensor,
    batch_fit: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, float, float]],
    fit: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]], swaps: int, converged: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A class-specific batch whose label roots are not isolated (``K < 2 B``): labels from the signs first.

    The ``B`` classes with the lowest :func:`signed_labels` score (all the classes marked present, then the
    least positive) are fitted (``batch_fit(labels)``: pursuit and joint refinement); if that stalls above
    ``converged``, up to ``swaps`` rounds of :func:`one_label_changes` change the slots whose class is not
    marked present, to a class not marked present; then the free fit (``batch_fit(None)``, the labels its
    pursuit picks) runs, and it is taken only if it fits better and keeps every class marked present.
    Validation batches of 8 with distinct labels (draws 20-25): the signed set alone got 75-100% of the labels
    and feature cosines 0.75-1.0, the free fit 38-75% and 0.51-0.79; neither converged in 5 of 6, and then the
    residual did not rank them (the free fit's was lower in 2). With the one-label changes: 47 of the 48 labels,
    2 batches converged (cosines 0.9998 or more)."""
    present, score = signed_labels(model, a)
    marked = set(present.tolist())
    order = torch.argsort(score).tolist()
    first = torch.tensor(sorted(order[:b]))
    f, labs, _, data = batch_fit(first)
    if data >= converged and swaps > 0:
        slots = [i for i, y in enumerate(labs.tolist()) if y not in marked]
        f, labs, data = one_label_changes(
            model, z, pf, pl, model.per_candidate(pf, pl), (f, labs, data), fit,
            [y for y in order if y not in marked], {tuple(first.tolist())}, swaps, converged, slots=slots)
    if data >= converged:
        free_f, free_labs, _, free_data = batch_fit(None)
        if free_data < data and marked <= set(free_labs.tolist()):
            f, labs, data = free_f, free_labs, free_data
    return f, labs, data


def one_label_changes(
    model: CoopGradientModel, z: torch.Tensor, pf: torch.Tensor, pl: torch.Tensor, cand: torch.Tensor,
    best: tuple[torch.Tensor, torch.Tensor, float],
    fit: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]],
    order: list[int], tried: set[tuple[int, ...]], rounds: int, converged: float, slots: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Up to ``rounds`` rounds of one-label changes of a batch fit ``best`` (features, labels, data residual)
    that stalled: each label multiset one label away (new labels in ``order``, multisets in ``tried``
    skipped) is fitted by ``fit(start, labels)``, warm-started from ``best`` with the changed slot at the
    public feature of its new label that best completes the others (``cand``: the public features' batch-1
    reduced gradients, :meth:`CoopGradientModel.per_candidate`); a round moves to the lowest residual,
    and the search stops at the first fit below ``converged`` or when a round finds nothing better.
    ``slots`` (default: all) are the batch positions whose label may change."""
    b = best[1].numel()
    unit = F.normalize(pf.double(), dim=-1)
    for _ in range(rounds):
        f0, labs0, data0 = best
        if data0 < converged:
            break
        tried.add(tuple(sorted(labs0.tolist())))
        for slot in range(b) if slots is None else slots:
            others = [i for i in range(b) if i != slot]
            rest = model.per_candidate(f0[others], labs0[others]).sum(0)
            for y in order:
                labs = labs0.clone()
                labs[slot] = y
                key = tuple(sorted(labs.tolist()))
                idx = torch.nonzero(pl == y).flatten()
                if key in tried or not idx.numel():
                    continue
                tried.add(key)
                start = f0.clone()
                start[slot] = unit[idx[((rest[None] + cand[idx]) / b - z).norm(dim=1).argmin()]]
                f, data = fit(start, labs)
                if data < best[2]:
                    best = (f, labs, data)
                if data < converged:
                    return best
        if best[2] >= data0:
            break
    return best


def low_rank_dl_dt(model: CoopGradientModel, z: torch.Tensor, b: int, iterations: int = 60,
                   basis: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-``B`` matrix ``A = dL/dT`` ``(K, E)`` that best explains the reduced gradient ``z``.

    Two facts pin ``A`` down beyond what the context Jacobian observes: it has rank ``B`` (one
    ``(p_i - e_{y_i}) f_i^T`` per image) and its rows sum to zero (``sum_k p_ik - y_ik = 0`` for
    cross-entropy), which fixes most of the directions that the Jacobian cannot see (along each class's
    text feature, and what the final LayerNorm removes). The fit is Levenberg-Marquardt on the factors
    ``A = L W`` (``K x B`` and ``B x E``) against both sets of equations, started from the minimum-norm
    solution's top ``B`` singular triplets. Class-specific context, batch 4, 4 validation batches of the
    trained target: the true features lie 98-100% inside the fitted row space and ``A`` is within 1-5%.
    Shared context at batch 4 is not determined this way in the full feature space (26-94% inside, also
    with 8 or 16 context vectors); ``basis`` (``(d, E)``, orthonormal rows) restricts ``A``'s rows to a
    subspace, such as the principal subspace of the public features (:func:`shared_label_sets`), and
    then it is."""
    k = model.k
    e = model.e if basis is None else basis.shape[0]
    zn = z.norm().clamp_min(1e-30)
    zero_sum = torch.eye(e, dtype=torch.float64).repeat(1, k)  # (E, K*E): sum over classes of A's rows
    r = model.R if basis is None else (model.R.view(-1, k, model.e) @ basis.t()).reshape(model.rank, -1)
    m = torch.cat([r / zn, zero_sum])
    rhs = torch.cat([z / zn, torch.zeros(e, dtype=torch.float64)])
    gram = m.t() @ m  # the minimum-norm start, with a ridge in place of a pseudo-inverse's cut-off
    ridge = 1e-12 * float(gram.diagonal().max())
    a0 = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), m.t() @ rhs).view(k, e)
    u, sv, vh = torch.linalg.svd(a0, full_matrices=False)
    x0 = torch.cat([(u[:, :b] * sv[:b]).reshape(-1), vh[:b].reshape(-1)])
    mk = m.view(-1, k, e)

    def resid(x: torch.Tensor) -> torch.Tensor:
        return m @ (x[:k * b].view(k, b) @ x[k * b:].view(b, e)).reshape(-1) - rhs

    def jacobian(x: torch.Tensor) -> torch.Tensor:
        left, right = x[:k * b].view(k, b), x[k * b:].view(b, e)
        return torch.cat([torch.einsum("nke,je->nkj", mk, right).reshape(m.shape[0], -1),
                          torch.einsum("nke,kj->nje", mk, left).reshape(m.shape[0], -1)], dim=1)

    x, _ = levenberg_marquardt(resid, x0, iterations, tol=0.0, jacobian=jacobian)
    a = x[:k * b].view(k, b) @ x[k * b:].view(b, e)
    return a if basis is None else a @ basis


def label_roots(model: CoopGradientModel, a: torch.Tensor, b: int, pf: torch.Tensor, pl: torch.Tensor,
                per_label: int = 20, iterations: int = 30, keep: float = 1e-2, least: int | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image roots of a rank-``B`` ``A = dL/dT``: unit features ``f`` in its row space and labels ``y``
    with ``p(f) - e_y`` in its column space (``K - 1 - B`` equations for ``B - 1`` unknowns, so isolated
    roots while ``B <= K / 2``). Each label's search starts from its public features projected into the
    row space (batched Gauss-Newton); roots whose relative residual is below ``keep``, and at least the
    ``least`` (default ``2 B``) best, are returned, best first, without duplicates (a weakly trained target's
    true roots can sit just above ``keep``). On 5 validation batches of 4 (class-specific context, trained target) the
    ``B`` best roots were the batch's images, duplicate labels included (residuals 4e-7 to 3e-4; the next
    root 3e-2 or more); in one batch two were at cosine 0.96 and 0.86 and the joint fit finishes them."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    cols, rows = u[:, :b], vh[:b]
    outside = torch.eye(model.k, dtype=torch.float64) - cols @ cols.t()
    coords = F.normalize(pf.double(), dim=-1) @ rows.t()
    feats, labs, rels = [], [], []
    for y in range(model.k):
        idx = torch.nonzero(pl == y).flatten()
        if not idx.numel():
            continue
        x = F.normalize(coords[idx[torch.argsort(coords[idx].norm(dim=1), descending=True)[:per_label]]], dim=-1)
        yt = torch.tensor([y])

        def resid(v: torch.Tensor, yt: torch.Tensor = yt) -> torch.Tensor:
            return model.weights(F.normalize(v @ rows, dim=-1)[None], yt)[0] @ outside.t()

        x, cost = batched_levenberg_marquardt(resid, x, iterations)
        f = F.normalize(x @ rows, dim=-1)
        w = model.weights(f, yt.expand(f.shape[0]))
        feats.append(f)
        labs.append(torch.full((f.shape[0],), y, dtype=torch.long))
        rels.append(cost / w.norm(dim=1).clamp_min(1e-30))
    if not feats:
        return torch.zeros(0, model.e, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    f_all, y_all, r_all = torch.cat(feats), torch.cat(labs), torch.cat(rels)
    chosen: list[int] = []
    for j in torch.argsort(r_all).tolist():
        if float(r_all[j]) >= keep and len(chosen) >= (2 * b if least is None else least):
            break
        if not any(int(y_all[j]) == int(y_all[k]) and float(f_all[j] @ f_all[k]) > 0.999 for k in chosen):
            chosen.append(j)
    return f_all[chosen], y_all[chosen]


def _batch_candidates(model: CoopGradientModel, a: torch.Tensor, b: int, pf: torch.Tensor,
                      pl: torch.Tensor, keep: int = 400) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Candidate sets for a batch pursuit: the per-image roots of the rank-B ``A = dL/dT``
    (:func:`low_rank_dl_dt`, :func:`label_roots`) while they are determined (``B <= K / 2``): the ``B`` best,
    then all that were kept; the public features projected into ``A``'s row space, which holds every image's
    feature when the gradient determines ``A``; then the public features as they are."""
    sets: list[tuple[torch.Tensor, torch.Tensor]] = []
    if 2 * b <= model.k:
        root_feats, root_labels = label_roots(model, a, b, pf, pl)
        if root_feats.shape[0] >= b:  # the B best roots as they are, then a pursuit among all of them
            sets += [(root_feats[:b], root_labels[:b]), (root_feats, root_labels)]
    basis = torch.linalg.svd(a, full_matrices=False)[2][:b]
    unit = F.normalize(pf, dim=-1)
    inside = (unit @ basis.t()).norm(dim=1)
    top = torch.argsort(inside, descending=True)[:keep]
    projected = F.normalize((unit[top] @ basis.t()) @ basis, dim=-1)
    return [*sets, (projected, pl[top]), (pf, pl)]


def shared_label_sets(model: CoopGradientModel, z: torch.Tensor, b: int, pf: torch.Tensor, pl: torch.Tensor,
                      dims: tuple[int, ...] = SHARED_SUBSPACES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Candidate label multisets of a shared-context batch, read off the gradient before any feature fit.

    With one context for all classes the gradient does not determine a rank-``B`` ``A = dL/dT`` in the full
    feature space, but the images' features lie close to the principal subspace of the public features
    (cosine 0.99 at 8 dimensions, 0.997 at 16 on validation digits), and there it does
    (:func:`low_rank_dl_dt` with ``basis``). The labels of the ``B`` best :func:`label_roots` of that ``A`` are
    one candidate per subspace dimension (``dims``), without repeats, returned with the roots themselves
    (``(B,)`` labels and ``(B, E)`` features, sorted by label). Validation draws 1-8 at batch 4: the label
    multiset was right in 3 of 8 batches at 32 dimensions (75% of the labels), 2 at 16, 1 at 8."""
    unit = F.normalize(pf.double(), dim=-1)
    mu = unit.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((unit - mu).T))
    order = torch.argsort(evals, descending=True)
    sets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for d in dims:
        rows = torch.cat([F.normalize(mu, dim=0)[None], evecs[:, order[:d]].T])
        basis = torch.linalg.qr(rows.T)[0].T
        feats, labs = label_roots(model, low_rank_dl_dt(model, z, b, basis=basis), b, pf, pl)
        if labs.numel() < b:
            continue
        key, idx = torch.sort(labs[:b], stable=True)
        if not any(torch.equal(key, other) for other, _ in sets):
            sets.append((key, feats[:b][idx]))
    return sets


POLISH = 150
UPDATE_CONVERGED = 0.05
"""Relative residual below which a fit of an E-step update counts as converged: on validation digits the
fits with the right label stopped at 0.005-0.03 (float32 simulation of a chaotic trajectory), the wrong ones
above 0.1."""


def step_batches(local_steps: int, batch_size: int, num_examples: int) -> list[list[int]]:
    """Which of the client's distinct images (numbered in order of first use) each local step used.

    A client walks a fresh permutation of its ``n`` images, ``min(B, n)`` per step, wrapping at the end
    (:func:`clipleak.fl.local.step_positions`); the permutation is secret, but numbered by first use the
    images of step ``t`` are ``(t b + j) mod n``, so the pattern is public."""
    b = min(int(batch_size), int(num_examples))
    return [[(t * b + j) % int(num_examples) for j in range(b)] for t in range(int(local_steps))]


class CoopTrajectoryModel:
    """A CoOp client's E local SGD steps, simulated exactly from candidate image features and labels.

    The client's update is ``ctx_E - ctx_0`` with ``ctx_{t+1} = ctx_t - eta grad L_t(ctx_t)``: the gradient of
    step ``t`` depends on the images only through their normalised features and labels, so the server can
    replay the whole trajectory (text encoder forward and backward per step, no image encoder) for any
    candidate features. ``simulate`` does that for ``N`` candidates at once; with ``graph=True`` the result
    is differentiable w.r.t. the features (double backward through the text encoder: math attention).
    Unlike the first-order view (the update as ``E`` times one gradient at the global context), this holds
    however far the context moves: at eta = 0.1 one step on one digit can move it by more than its norm.
    """

    def __init__(self, victim: Victim, local_steps: int, batch_size: int, num_examples: int, lr: float):
        if victim.prompt is None or victim.tower is None:
            raise ClipleakError("the CoOp trajectory model needs a 'coop' victim")
        self.prompt, self.tower = victim.prompt, victim.tower
        self.ctx0 = victim.prompt.ctx.detach().clone()
        self.scale = float(victim.logit_scale().detach())
        self.lr = float(lr)
        self.steps = step_batches(local_steps, batch_size, num_examples)
        self.distinct = min(int(num_examples), len(self.steps) * len(self.steps[0]))
        self.k = int(self.prompt.prefix.shape[0])

    def text(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised class text features ``(N, K, E)`` for ``N`` contexts (shared ``(N, M, D)`` or
        class-specific ``(N, K, M, D)``)."""
        n, p = ctx.shape[0], self.prompt
        c = ctx[:, None].expand(-1, self.k, -1, -1) if ctx.dim() == 3 else ctx
        emb = torch.cat([p.prefix.expand(n, -1, -1, -1), c, p.suffix.expand(n, -1, -1, -1)], 2)
        t = self.tower.encode_embeddings(emb.reshape(n * self.k, *emb.shape[2:]), p.pool_idx.repeat(n))
        return F.normalize(t, dim=-1).view(n, self.k, -1)

    def simulate(self, feats: torch.Tensor, labels: torch.Tensor, graph: bool = False) -> torch.Tensor:
        """Updates ``(N, P)`` of ``N`` candidates: features ``(N, d, E)`` (normalised here) and labels
        ``(N, d)`` of the ``d`` distinct images, in order of first use."""
        fn = F.normalize(feats.to(self.ctx0.dtype), dim=-1)
        c = self.ctx0.expand(fn.shape[0], *self.ctx0.shape).clone().requires_grad_(True)
        with torch.enable_grad():
            for pos in self.steps:
                if not graph:
                    c = c.detach().requires_grad_(True)
                logits = self.scale * torch.einsum("nbe,nke->nbk", fn[:, pos], self.text(c))
                loss = F.cross_entropy(logits.reshape(-1, self.k), labels[:, pos].reshape(-1), reduction="sum")
                (g,) = torch.autograd.grad(loss / len(pos), c, create_graph=graph)
                c = c - self.lr * g
        out = (c - self.ctx0).reshape(fn.shape[0], -1)
        return out if graph else out.detach()


def _whitening(public_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, ``Cov^(1/2)`` and ``Cov^(-1/2)`` of the normalised public features (the fits' coordinates)."""
    unit = F.normalize(public_feats.double(), dim=-1)
    mu = unit.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((unit - mu).T))
    evals = evals.clamp_min(1e-6 * float(evals.max()))
    return mu, evecs @ torch.diag(evals.sqrt()) @ evecs.T, evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def coop_update_features(
    obs: Observation, victim: Victim, public_feats: torch.Tensor, public_labels: torch.Tensor, *,
    labels: torch.Tensor | None = None, per_class: int = 16, starts: int = 2, max_labels: int = 3,
    iterations: int = 40, polish: int | None = None, seed: int = 0, start: CoopFit | None = None,
) -> CoopFit:
    """Fit image features and labels to a CoOp client's multi-step update (E > 1) with the exact model.

    ``obs`` is an update's gradient view (:func:`clipleak.records.gradient_view`; its ``meta["from_update"]``
    gives E, B, eta and n): the update ``-eta E view`` is fitted by :class:`CoopTrajectoryModel`, in whitened
    public-feature coordinates, by L-BFGS through the replayed trajectory.

    One distinct image (``n = 1``: every step used the same image): each label (or the shared one) is
    screened with ``per_class`` seeded public features of that label (replayed in one batch, forward only);
    the ``max_labels`` labels with the lowest screened residual are then fitted in that order, each from its
    ``starts`` best public starts, until a fit converges (:data:`UPDATE_CONVERGED`); the lowest residual
    wins. (On validation digits one start per label left a right-label fit at residual 0.15, feature cosine
    0.86; the second start reached 0.03, 0.98. Some confident digits still stall near 0.5.)
    Several distinct images: the joint fit starts from ``start`` (the first-order fit of the gradient view)
    and keeps its labels.
    """
    info = obs.meta.get("from_update") or {}
    steps, bsz, lr, n = (int(info.get("local_steps", 1)), int(info.get("batch_size", 1)), float(info.get("lr", 0)),
                         int(info.get("num_examples", 1)))
    if lr <= 0:
        raise ClipleakError("the exact update fit needs an update's gradient view (meta['from_update'])")
    names = list(victim.trainable())
    target = -lr * steps * torch.cat([obs.gradients[k].reshape(-1) for k in names]).float()
    tn = target.norm().clamp_min(1e-30)
    model = CoopTrajectoryModel(victim, steps, bsz, n, lr)
    d = model.distinct
    mu, sq, inv_sq = (t.float() for t in _whitening(public_feats))
    pf, pl = F.normalize(public_feats.float(), dim=-1), public_labels.long()

    def residual(feats: torch.Tensor, labs: torch.Tensor, m: CoopTrajectoryModel = model) -> torch.Tensor:
        with math_attention():
            return (m.simulate(feats, labs).to(target.dtype) - target[None]).norm(dim=1) / tn

    def fit(f0: torch.Tensor, labs: torch.Tensor, its: int = iterations,
            m: CoopTrajectoryModel = model) -> tuple[torch.Tensor, float]:
        dt = m.ctx0.dtype
        mu_, sq_, inv_, tgt = mu.to(dt), sq.to(dt), inv_sq.to(dt), target.to(dt)
        u = ((F.normalize(f0.to(dt), dim=-1) - mu_) @ inv_).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([u], lr=1, max_iter=its, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            with math_attention():
                loss = ((m.simulate((mu_ + u @ sq_)[None], labs[None], graph=True)[0] - tgt).norm() / tn) ** 2
            loss.backward()
            return loss

        opt.step(closure)
        f = F.normalize((mu_ + u.detach() @ sq_), dim=-1)
        return f.float(), float(residual(f[None], labs[None], m)[0])

    determined = target.numel() / float(d * pf.shape[1])
    if d > 1:
        if start is None or start.features.shape[0] != d:
            raise ClipleakError(f"the exact fit of an update over {d} images needs a start of {d} features")
        f0, labs0 = start.features, start.labels.long()
        r0 = float(residual(f0[None], labs0[None])[0])
        f, r = fit(f0, labs0)
        best = (f, r) if r < r0 else (F.normalize(f0.float(), dim=-1), r0)
        return CoopFit(best[0], labs0, best[1], None, determined)
    allowed = [int(labels[0])] if labels is not None else sorted({int(v) for v in pl.tolist()})
    g = torch.Generator().manual_seed(int(seed))
    screened: list[tuple[float, int, torch.Tensor]] = []
    for y in allowed:
        idx = torch.nonzero(pl == y).flatten()
        if not idx.numel():
            continue
        idx = idx[torch.randperm(idx.numel(), generator=g)[:per_class]]
        res = residual(pf[idx][:, None], torch.full((idx.numel(), 1), y))
        top = torch.argsort(res)[:starts]
        screened.append((float(res[top[0]]), y, pf[idx[top]]))
    if not screened:
        raise ClipleakError("no public image carries the allowed labels: cannot start the CoOp update fit")
    screened.sort(key=lambda t: t[0])
    best_fit: tuple[torch.Tensor, float, int] | None = None
    for _, y, f0s in screened[:max_labels]:
        for f0 in f0s:
            f, r = fit(f0[None], torch.tensor([y]))
            if best_fit is None or r < best_fit[1]:
                best_fit = (f, r, y)
            if r < UPDATE_CONVERGED:
                break
        if best_fit is not None and best_fit[1] < UPDATE_CONVERGED:
            break
    assert best_fit is not None
    polish = POLISH if polish is None else polish
    if polish > 0:  # the chosen fit goes on, in float64 (float32 L-BFGS stalls near residual 2e-3, and the
        # decoder needs the feature to cosine > 0.999: at 0.993 it draws another digit of the class)
        m64 = CoopTrajectoryModel(copy.deepcopy(victim).double(), steps, bsz, n, lr)
        f, r = fit(best_fit[0], torch.tensor([best_fit[2]]), polish, m64)
        if r < best_fit[1]:
            best_fit = (f, r, best_fit[2])
    return CoopFit(best_fit[0], torch.tensor([best_fit[2]]), best_fit[1], None, determined)
