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


def text_jacobian(victim: Victim, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobian ``(K*E, P)`` of the normalised class text features w.r.t. the CoOp context, and the
    features themselves.

    Class ``k``'s feature depends on the context only through its own prompt, so the Jacobian is built one
    class at a time, by reverse-mode AD through that prompt alone (cut to its own pooled token): ``E``
    vector-Jacobian products per class instead of ``P`` Jacobian-vector products through all ``K`` prompts
    (``P = M D`` is several times ``E`` on real text towers, e.g. 2048 against 512 on ViT-B-32), and no
    tangent of the whole batch is ever held. ``chunk`` cotangents go through the tower at once (it bounds
    the memory). With class-specific context class ``k``'s rows are non-zero only in its own context block
    (the Jacobian is block diagonal). Float32 like the tower; on the tower's device."""
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

    shared = ctx0.dim() == 2
    with torch.no_grad(), math_attention():
        text = text_of(ctx0)
        k, e = text.shape
        block = ctx0.numel() if shared else ctx0[0].numel()
        jac = torch.zeros(k * e, block if shared else k * block, dtype=text.dtype, device=text.device)
        for i in range(k):
            def row(c: torch.Tensor, i: int = i) -> torch.Tensor:
                return text_of(c if shared else c[None], slice(i, i + 1)).reshape(-1)

            block_jac = torch.func.jacrev(row, chunk_size=chunk)(ctx0 if shared else ctx0[i]).reshape(e, -1)
            cols = slice(None) if shared else slice(i * block, (i + 1) * block)
            jac[i * e:(i + 1) * e, cols] = block_jac
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
        # the minimum-norm solution of R vec(A) = z: R's rows are orthogonal (singular values times singular
        # vectors), so it is R^T (z / |row|^2) without a least-squares solve
        a0 = (self.R.t() @ (z / (self.R * self.R).sum(1))).view(self.k, self.e)
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
    rs: torch.Tensor = field(init=False)
    ts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.zn = self.z.norm().clamp_min(1e-30)
        model, root = self.model, self.whitening.root
        # R_k S per class, laid out (K, r * E), and T S (K, E): the whitening folded into R and T once, so
        # a Jacobian costs O(r K E) per image instead of a product with an (E, E) matrix
        rs = (model.R.view(-1, model.e) @ root).view(model.rank, model.k, model.e)
        self.rs = rs.permute(1, 0, 2).reshape(model.k, -1)
        self.ts = model.text @ root

    def residual(self, labels: torch.Tensor, prior: float, u: torch.Tensor) -> torch.Tensor:
        """The relative data residual of flat coordinates ``u`` with ``labels``, then the prior's (its weight
        ``prior**2``)."""
        feats = self.whitening.features(u, self.model.e)
        r = (self.model.reduced(feats, labels) - self.z) / self.zn
        if prior > 0:
            r = torch.cat([r, prior * u / u.numel() ** 0.5])
        return r

    def jacobian(self, labels: torch.Tensor, prior: float, u: torch.Tensor) -> torch.Tensor:
        """The Jacobian of :meth:`residual` w.r.t. flat ``u``, in closed form.

        With ``A = s/B sum_i w_i f_i^T`` (``f_i`` normalised, ``w_i = p_i - e_{y_i}``), image ``i``'s block of
        ``d(R vec A)/du_i`` is ``s/(B |x_i|) [sum_k w_ik R_k S + H_i (s D_i T S) - H_i (w_i + D_i l_i) (f_i^T S)]``
        with ``x_i = mean + u_i S`` (``f_i = x_i / |x_i|``), ``H_i = [R_k f_i]_k`` ``(r, K)``, the logits
        ``l_i = s T f_i``, and the softmax Jacobian ``D_i = diag p_i - p_i p_i^T``: the product rule through
        the softmax, the normalisation and the whitening, as forward-mode AD of :meth:`residual` gives it to
        rounding, at ``O(r K E)`` per image instead of a product of ``R`` with ``E`` tangents."""
        model, root = self.model, self.whitening.root
        e, b, s = model.e, u.numel() // model.e, model.scale
        x = self.whitening.features(u, e)
        norm = x.norm(dim=1, keepdim=True)
        fn = x / norm
        logits = s * fn @ model.text.t()
        p = F.softmax(logits, -1)
        w = p - F.one_hot(labels.to(u.device), model.k).to(u.dtype)
        h = (model.R.view(-1, e) @ fn.t()).view(model.rank, model.k, b).permute(2, 0, 1)  # (B, r, K): R_k f_i
        # D_i v = p_i * (v - p_i . v), applied to the rows of T S and to l_i
        d_ts = p[:, :, None] * (self.ts[None] - (p @ self.ts)[:, None])  # (B, K, E)
        d_l = p * (logits - (p * logits).sum(1, keepdim=True))  # (B, K)
        fs = fn @ root  # (B, E): f_i^T S
        blocks = ((w @ self.rs).view(b, model.rank, e) + s * torch.bmm(h, d_ts)
                  - torch.bmm(h, (w + d_l)[:, :, None]) * fs[:, None])
        blocks = blocks * (s / b / norm[:, :, None] / self.zn)
        jac = blocks.permute(1, 0, 2).reshape(model.rank, b * e)
        if prior > 0:
            eye = torch.eye(u.numel(), dtype=u.dtype, device=u.device)
            jac = torch.cat([jac, prior / u.numel() ** 0.5 * eye])
        return jac

    def data_residual(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """The relative residual of the gradient alone."""
        return float((self.model.reduced(feats, labels) - self.z).norm() / self.zn)

    def refine(self, feats: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, float, float]:
        """``n`` LM steps from ``feats`` with this fit's prior: the features, the cost LM minimised (data and
        prior) and the relative residual of the data alone (what the report and, for a determined fit, the
        convergence test read)."""
        u0 = self.whitening.coords(feats)
        u, cost = levenberg_marquardt(partial(self.residual, labels, self.prior), u0.reshape(-1), n, tol=self.tol,
                                      jacobian=partial(self.jacobian, labels, self.prior))
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
            u = levenberg_marquardt(partial(self.residual, labels, weight ** 0.5), u, n, tol=self.tol,
                                    jacobian=partial(self.jacobian, labels, weight ** 0.5))[0]
        f = self.whitening.features(u, self.model.e)
        return f, self.data_residual(f, labels)

    def prior_free(self, start: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """``n`` LM steps without a prior from ``start``: the features and the data residual."""
        return self.continuation(start, labels, ((0.0, n),))
