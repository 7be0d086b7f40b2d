"""The general solvers the read-outs share: Levenberg-Marquardt (one problem, or many at once), a greedy
pursuit over candidate contributions, and the whitened coordinates of the public features.

Nothing here knows about CoOp, adapters or ViTs: each read-out states its residual or its candidates'
contributions and calls these. All work in the dtype of their inputs (the read-outs pass float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipleakError


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


def batched_levenberg_marquardt(resid: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                                iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt from every row of ``x0`` at once (each row its own problem and damping);
    returns the rows reached and their residual norms."""
    x = x0.clone()
    batched = torch.func.vmap(resid)
    jac = torch.func.vmap(torch.func.jacfwd(resid))
    r = batched(x)
    cost = r.norm(dim=1)
    lam = torch.full((x.shape[0],), 1e-2, dtype=x.dtype, device=x.device)
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


def greedy_pursuit(
    target: torch.Tensor, cand: torch.Tensor, picks: int, *, divisor: float = 1.0, start: torch.Tensor | None = None,
    cand_labels: torch.Tensor | None = None, slot_labels: torch.Tensor | None = None,
    label_counts: torch.Tensor | None = None, empty: str | None = None,
    distance: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """Greedy pursuit: ``picks`` distinct candidates whose contributions ``cand`` ``(N, D)``, added to
    ``start`` (default zero) and divided by ``divisor`` (a mean over the batch), best explain ``target``
    ``(D,)``; each pick takes the candidate that lowers the residual norm most. Returns their indices.

    Labels restrict the picks (``cand_labels``: each candidate's label): ``slot_labels`` gives the label of
    each pick in turn, ``label_counts`` ``(K,)`` a multiset of labels that the picks draw from in any order.
    A pick with no allowed candidate raises ``empty`` when given (otherwise it takes the first candidate).
    ``distance`` maps the ``(N, D)`` sums (divided) to ``(N,)`` costs in place of the norm of their difference
    to ``target`` (e.g. the distance of a pruned update's intervals, :mod:`.defended`).
    """
    chosen: list[int] = []
    total = torch.zeros_like(target) if start is None else start
    need = None if label_counts is None else label_counts.clone()
    for i in range(picks):
        ok = torch.ones(cand.shape[0], dtype=torch.bool, device=cand.device)
        if slot_labels is not None and cand_labels is not None:
            ok = (cand_labels == int(slot_labels[i])).to(cand.device)
        if need is not None and cand_labels is not None:
            ok = ok & (need[cand_labels] != 0).to(cand.device)  # labels whose count is used up
        if chosen:
            ok[chosen] = False
        if empty is not None and not bool(ok.any()):
            raise ClipleakError(empty)
        mean = (total[None] + cand) / divisor
        res = distance(mean) if distance is not None else (mean - target).norm(dim=1)
        res[~ok] = float("inf")
        j = int(res.argmin())
        chosen.append(j)
        total = total + cand[j]
        if need is not None and cand_labels is not None:
            need[cand_labels[j]] -= 1
    return chosen


def principal_axes(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, covariance eigenvalues (ascending) and eigenvectors of the normalised features, in float64."""
    unit = F.normalize(feats.double(), dim=-1)
    mu = unit.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov((unit - mu).T))
    return mu, evals, evecs


@dataclass(frozen=True)
class Whitening:
    """Whitened public-feature coordinates ``f = mean + u S`` (``S = Cov^(1/2)``, symmetric) of the normalised
    public features. The fits run in ``u``: the weakly observed directions are the low-variance ones, and in
    ``u`` they are as easy to move as the others."""

    mean: torch.Tensor
    root: torch.Tensor
    inv_root: torch.Tensor

    def coords(self, feats: torch.Tensor) -> torch.Tensor:
        """``u`` ``(B, E)`` of features ``(B, E)`` (normalised here, float64)."""
        return (F.normalize(feats.double(), dim=-1) - self.mean) @ self.inv_root

    def features(self, u: torch.Tensor, e: int) -> torch.Tensor:
        """Features ``(B, E)`` (not normalised) of flat or ``(B, E)`` coordinates ``u``."""
        return self.mean + u.view(-1, e) @ self.root


def whitening(public_feats: torch.Tensor, floor: float = 1e-6) -> Whitening:
    """The whitening of the normalised public features; covariance eigenvalues below ``floor`` times the
    largest are raised to it, so that ``S^-1`` stays bounded."""
    mu, evals, evecs = principal_axes(public_feats)
    evals = evals.clamp_min(floor * float(evals.max()))
    return Whitening(mu, evecs @ torch.diag(evals.sqrt()) @ evecs.T, evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
