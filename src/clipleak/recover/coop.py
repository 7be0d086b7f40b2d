"""CoOp: image features and labels fitted to a context gradient (the inverse gradient estimate).

The context gradient of a batch is exactly ``J^T dL/dT`` (:class:`~.coop_model.CoopGradientModel`): the
unknowns are ``B`` features and labels, and no step of the fit passes through either encoder.
:func:`coop_features` sets up the fit (:class:`~.coop_model.ReducedFit`) and picks the search: batch 1 here,
batches in :mod:`clipleak.recover.coop_batch`. A multi-step update is fitted in :mod:`clipleak.recover.coop_update`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..peft import Victim
from ..records import Observation
from .coop_batch import BatchSearch, Fit, batch_candidates, low_rank_dl_dt, shared_batch_fit
from .coop_model import CoopGradientModel, ReducedFit
from .noise import NOISE_MARGIN, relative_noise_floor
from .solvers import whitening

CONVERGED = 1e-4
"""Relative residual below which a fit counts as converged (true features reach about 1e-6)."""

UNDERDETERMINED_PRIOR = 1e-3
"""Weight of the Gaussian public-feature prior when the gradient determines fewer numbers than there are
unknown feature numbers (shared context, ``B > 1``): it keeps the unobserved directions at typical values."""

DETERMINED_PRIOR = 1e-8
"""The same prior's weight for a determined batch fit (class-specific context, ``B > 1``). The client's
float32 gradient leaves the truth a relative residual of about 1e-6, and inside that tolerance two
images of one label with similar ``p - e_y`` can trade feature directions: without a prior the fit can
stop at a residual as low as the truth's with a feature that is off. A weight of 1e-8 gives a prior term
of about 1e-4: above that tolerance, so it picks the truth among the fits inside it, and far below a wrong
label's residual, so it does not change which labels fit."""


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
    runs in the ``rank(J)`` reduced coordinates, in whitened public-feature coordinates
    (:class:`~.coop_model.ReducedFit`).

    Batch 1 (:func:`single_fit`): the label comes first, read off the gradient
    (:meth:`CoopGradientModel.bilinear`). Batch B (:func:`batch_fit`): ``dL/dT`` is fitted as a rank-``B``
    matrix with rows summing to zero (:func:`~.coop_batch.low_rank_dl_dt`); a greedy pursuit picks ``B``
    public candidates that together explain the gradient, then all features are refined jointly. When the
    gradient determines fewer numbers than there are unknowns (shared context, ``B > 1``), a Gaussian prior
    fitted to the public features (``prior_weight``; default :data:`UNDERDETERMINED_PRIOR` then) keeps the
    unobserved directions at typical values; a determined batch fit gets a much weaker one
    (:data:`DETERMINED_PRIOR`), batch 1 none.
    Shared context whose gradient has as many numbers as unknown feature directions (batch 2 and 4 with 4
    context vectors), undefended: the label multisets come first, each fitted with the prior and then
    without it (:func:`~.coop_batch.shared_batch_fit`; ``swaps`` rounds of one-label changes when none fits).
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
    floor = relative_noise_floor(obs, model.rank, float(z.norm().clamp_min(1e-30))) if obs_noise else 0.0
    converged = max(CONVERGED, NOISE_MARGIN * floor)
    pf, pl = public_feats.double(), public_labels.long()
    determined = model.rank / float(b * e)
    if prior_weight is None:
        prior_weight = UNDERDETERMINED_PRIOR if determined < 1.0 else (DETERMINED_PRIOR if b > 1 else 0.0)
    fit = ReducedFit(model, z, whitening(pf), float(prior_weight) ** 0.5, max(1e-8, floor))

    if not model.class_specific and b > 1 and model.rank >= b * (e - 1) and floor == 0.0:
        # shared context with as many gradient numbers as unknown feature directions
        fitted = shared_batch_fit(fit, b, pf, pl, labels, swaps)
        if fitted is not None:
            return CoopFit(F.normalize(fitted[0].float(), dim=-1), fitted[1], fitted[2], None, determined, floor)
    if b == 1:
        f, labs, data, w = single_fit(fit, pf, pl, labels, iterations, screen_iterations, converged)
        return CoopFit(F.normalize(f.float(), dim=-1), labs, data, w.float(), determined, floor)
    f, labs, data = batch_fit(fit, b, pf, pl, labels, iterations, converged, determined, swaps)
    return CoopFit(F.normalize(f.float(), dim=-1), labs, data, None, determined, floor)


def single_fit(fit: ReducedFit, pf: torch.Tensor, pl: torch.Tensor, labels: torch.Tensor | None, iterations: int,
               screen_iterations: int, converged: float) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Batch 1: the two most negative label coefficients of :meth:`CoopGradientModel.bilinear` (or the shared
    label) are the candidate labels; each is refined by Levenberg-Marquardt (``screen_iterations`` steps) from
    the bilinear feature and from the best-fitting public feature (``pf``, labels ``pl``) of that label, and
    the lowest residual goes on for ``iterations`` steps (the next ones only if it stays above
    ``converged``). Returns the feature, the label, the residual and the label coefficients."""
    model, z = fit.model, fit.z
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
            screened.append((*fit.refine(st, yt, screen_iterations)[:2], yt))
    screened.sort(key=lambda t: t[1])
    best: tuple[torch.Tensor, float, torch.Tensor] | None = None
    for f, _, yt in screened:  # the best screened fit first; the next ones only if it stalls
        f, cost = fit.refine(f, yt, iterations)[:2]
        if best is None or cost < best[1]:
            best = (f, cost, yt)
        if cost < converged:
            break
    assert best is not None
    return best[0], best[2], best[1], w


def batch_fit(fit: ReducedFit, b: int, pf: torch.Tensor, pl: torch.Tensor, labels: torch.Tensor | None,
              iterations: int, converged: float, determined: float, swaps: int) -> Fit:
    """Batch B from public candidates (:class:`~.coop_batch.BatchSearch`): features, labels, data residual.

    Class-specific context where the label roots are not isolated (``K < 2 B``, e.g. batch 8 of 10 classes),
    labels not shared: the labels come first, from the signs of ``A``'s rows (:meth:`BatchSearch.signed`).
    Otherwise a pursuit and joint fit; one that stalls above ``converged`` while the fit is determined and
    the label roots are isolated (``2 B <= K``) tries ``swaps`` rounds of one-label changes."""
    model = fit.model
    a = low_rank_dl_dt(model, fit.z, b)
    search = BatchSearch(fit, pf, pl, b, batch_candidates(model, a, b, pf, pl), iterations, converged, determined)
    if labels is None and model.class_specific and model.k < 2 * b <= 2 * model.k:
        return search.signed(a, swaps)
    f, labs, _, data = search.pursue(labels)
    if labels is None and swaps > 0 and determined >= 1.0 and 2 * b <= model.k and data >= converged:
        f, labs, data = search.change_labels((f, labs, data), swaps)
    return f, labs, data
