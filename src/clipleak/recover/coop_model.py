"""The CoOp context gradient as a function of the batch's image features and labels.

The context gradient of a batch is exactly ``J^T dL/dT``: ``J`` is the Jacobian of the class text
features w.r.t. the context (computed once by forward-mode AD) and ``dL/dT`` depends only on the
batch's normalised image features and labels. So the unknowns are ``B`` features and labels, and no
step of a fit passes through either encoder. :class:`ReducedFit` is the least-squares problem every CoOp
fit solves: that model against the observed gradient, in reduced and whitened coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..models import math_attention
from ..peft import Victim
from .solvers import Whitening, levenberg_marquardt


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
                r = torch.zeros(int(keep.sum()), self.k * self.e, dtype=torch.float64, device=jd.device)
                r[:, i * self.e:(i + 1) * self.e] = sv[keep, None] * u[:, keep].t()
                rows.append(r)
                self.blocks.append(r[:, i * self.e:(i + 1) * self.e])
                v = torch.zeros(jd.shape[1], int(keep.sum()), dtype=torch.float64, device=jd.device)
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
        return F.softmax(self.scale * fn @ self.text.t(), -1) - F.one_hot(labels.to(fn.device), self.k).to(fn.dtype)

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


@dataclass
class ReducedFit:
    """The least-squares problem of every CoOp feature fit: the observed gradient ``z`` in reduced coordinates
    (:meth:`CoopGradientModel.reduce`) against the model's prediction, relative to ``|z|``.

    The unknowns are whitened public-feature coordinates ``u`` (``f = mean + u S``, :class:`~.solvers.Whitening`):
    the weakly observed directions are the low-variance ones, and in ``u`` they are as easy to move as the
    others. ``prior`` is the square root of the weight of a Gaussian public-feature prior (a term ``|u|^2``,
    scaled by the number of unknowns; 0: none). ``tol``: the relative residual at which Levenberg-Marquardt stops.
    """

    model: CoopGradientModel
    z: torch.Tensor
    whitening: Whitening
    prior: float = 0.0
    tol: float = 1e-8
    zn: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.zn = self.z.norm().clamp_min(1e-30)

    def residual(self, labels: torch.Tensor, prior: float, u: torch.Tensor) -> torch.Tensor:
        """The relative data residual of flat coordinates ``u`` with ``labels``, then the prior's (its weight
        ``prior**2``)."""
        feats = self.whitening.features(u, self.model.e)
        r = (self.model.reduced(feats, labels) - self.z) / self.zn
        if prior > 0:
            r = torch.cat([r, prior * u / u.numel() ** 0.5])
        return r

    def data_residual(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """The relative residual of the gradient alone."""
        return float((self.model.reduced(feats, labels) - self.z).norm() / self.zn)

    def refine(self, feats: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, float, float]:
        """``n`` LM steps from ``feats`` with this fit's prior: the features, the cost LM minimised (data and
        prior) and the relative residual of the data alone (what the report and, for a determined fit, the
        convergence test read)."""
        u0 = self.whitening.coords(feats)
        u, cost = levenberg_marquardt(partial(self.residual, labels, self.prior), u0.reshape(-1), n, tol=self.tol)
        f = self.whitening.features(u, self.model.e)
        return f, cost, self.data_residual(f, labels) if self.prior > 0 else cost

    def refine_data(self, feats: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """:meth:`refine`'s features and data residual."""
        f, _, data = self.refine(feats, labels, n)
        return f, data

    def continuation(self, start: torch.Tensor, labels: torch.Tensor,
                     schedule: tuple[tuple[float, int], ...]) -> tuple[torch.Tensor, float]:
        """LM from ``start`` through a schedule of ``(prior weight, steps)`` stages (each stage's own prior, not
        this fit's): the features and the data residual."""
        u = self.whitening.coords(start).reshape(-1)
        for weight, n in schedule:
            u = levenberg_marquardt(partial(self.residual, labels, weight ** 0.5), u, n, tol=self.tol)[0]
        f = self.whitening.features(u, self.model.e)
        return f, self.data_residual(f, labels)

    def prior_free(self, start: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """``n`` LM steps without a prior from ``start``: the features and the data residual."""
        return self.continuation(start, labels, ((0.0, n),))
