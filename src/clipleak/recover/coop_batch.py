"""CoOp batch fits (``B > 1``): ``dL/dT`` as a rank-``B`` matrix, its per-image roots, the label searches
and the prior-free finish of a shared-context fit.

Every fit here solves a :class:`~.coop_model.ReducedFit`; what differs is where its starts and labels come
from: a greedy pursuit among public candidates (:class:`BatchSearch`), the signs of ``dL/dT``'s rows
(class-specific context, :func:`signed_labels`), candidate label multisets read off the gradient in the
public principal subspaces (shared context, :func:`shared_label_sets`, :func:`shared_batch_fit`), and
one-label changes of a fit that stalled (:func:`one_label_changes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from .coop_model import CoopGradientModel, ReducedFit
from .solvers import batched_levenberg_marquardt, greedy_pursuit, levenberg_marquardt, principal_axes

Fit = tuple[torch.Tensor, torch.Tensor, float]
"""A batch fit: features ``(B, E)``, labels ``(B,)`` and the relative data residual."""

SHARED_CONTINUATION = ((1e-2, 40), (1e-3, 40), (1e-4, 40), (1e-5, 40), (1e-6, 40), (0.0, 100))
"""(prior weight, LM steps) of a shared-context batch fit with as many gradient numbers as unknown feature
directions (batch 4 with 4 context vectors: 508 and 4 x 127): the prior's fit first, then the prior is let
go a decade at a time. With the right labels the system is square and LM without a prior returns to the
truth from features near it; the prior's fit alone stops short of it, and letting the prior go separates the
right label multiset (a lower data residual) from wrong ones. Dropping the weight in larger steps can move
a fit off the truth."""

SHARED_SWAP = ((1e-3, 20), (1e-6, 20), (0.0, 40))
"""The shorter continuation of a label multiset one label away from the best, started from the best fit."""

SHARED_POLISH = (4, 500, 1000)
"""(finalists, screen, finish) of a shared-context batch fit's finish (:func:`finish_shared`): the label
multisets with the lowest data residuals (at most ``finalists``) each go on for ``screen`` prior-free LM steps,
and the best for ``finish`` more. The short fits of the label search cannot rank the multisets; the finished
ones can. It costs up to ``finalists * screen + finish`` LM steps."""

SHARED_CONVERGED = 1e-4
"""Data residual below which a shared-context label multiset is accepted without trying the next."""

SHARED_SUBSPACES = (32, 16, 8)
"""Public principal subspaces (dimension besides the mean) in which :func:`shared_label_sets` fits ``dL/dT``."""


def _factor_residual(m: torch.Tensor, rhs: torch.Tensor, k: int, b: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """The equations ``m vec(L W) = rhs`` of the factors ``x = (vec L, vec W)`` of ``A = L W``."""
    return m @ (x[:k * b].view(k, b) @ x[k * b:].view(b, e)).reshape(-1) - rhs


def _factor_jacobian(mk: torch.Tensor, k: int, b: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian of :func:`_factor_residual` w.r.t. the factors (``mk``: the equations as ``(n, K, E)``)."""
    left, right = x[:k * b].view(k, b), x[k * b:].view(b, e)
    return torch.cat([torch.einsum("nke,je->nkj", mk, right).reshape(mk.shape[0], -1),
                      torch.einsum("nke,kj->nje", mk, left).reshape(mk.shape[0], -1)], dim=1)


def low_rank_dl_dt(model: CoopGradientModel, z: torch.Tensor, b: int, iterations: int = 60,
                   basis: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-``B`` matrix ``A = dL/dT`` ``(K, E)`` that best explains the reduced gradient ``z``.

    Two facts pin ``A`` down beyond what the context Jacobian observes: it has rank ``B`` (one
    ``(p_i - e_{y_i}) f_i^T`` per image) and its rows sum to zero (``sum_k p_ik - y_ik = 0`` for
    cross-entropy), which fixes most of the directions that the Jacobian cannot see (along each class's
    text feature, and what the final LayerNorm removes). The fit is Levenberg-Marquardt on the factors
    ``A = L W`` (``K x B`` and ``B x E``) against both sets of equations, started from the minimum-norm
    solution's top ``B`` singular triplets. With class-specific context the true features lie (nearly)
    inside the fitted row space. With shared context the full feature space is not determined this way;
    ``basis`` (``(d, E)``, orthonormal rows) restricts ``A``'s rows to a subspace, such as the principal
    subspace of the public features (:func:`shared_label_sets`), where it is."""
    k = model.k
    e = model.e if basis is None else basis.shape[0]
    zn = z.norm().clamp_min(1e-30)
    zero_sum = torch.eye(e, dtype=torch.float64, device=z.device).repeat(1, k)  # (E, K*E): sum over classes of A's rows
    r = model.R if basis is None else (model.R.view(-1, k, model.e) @ basis.t()).reshape(model.rank, -1)
    m = torch.cat([r / zn, zero_sum])
    rhs = torch.cat([z / zn, torch.zeros(e, dtype=torch.float64, device=z.device)])
    gram = m.t() @ m  # the minimum-norm start, with a ridge in place of a pseudo-inverse's cut-off
    ridge = 1e-12 * float(gram.diagonal().max())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    a0 = torch.linalg.solve(gram + ridge * eye, m.t() @ rhs).view(k, e)
    b = min(b, k - 1, e)  # its rows sum to zero: a batch larger than the classes gives A of rank K - 1 at most
    u, sv, vh = torch.linalg.svd(a0, full_matrices=False)
    x0 = torch.cat([(u[:, :b] * sv[:b]).reshape(-1), vh[:b].reshape(-1)])
    x, _ = levenberg_marquardt(partial(_factor_residual, m, rhs, k, b, e), x0, iterations, tol=0.0,
                               jacobian=partial(_factor_jacobian, m.view(-1, k, e), k, b, e))
    a = x[:k * b].view(k, b) @ x[k * b:].view(b, e)
    return a if basis is None else a @ basis


def _root_residual(model: CoopGradientModel, rows: torch.Tensor, outside: torch.Tensor, label: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
    """The part of ``p(f) - e_y`` outside ``A``'s column space (``outside``: the projector off it) for the unit
    feature of row-space coordinates ``v`` (``rows``: ``A``'s row space) and the label ``(1,)``."""
    return model.weights(F.normalize(v @ rows, dim=-1)[None], label)[0] @ outside.t()


def label_roots(model: CoopGradientModel, a: torch.Tensor, b: int, pf: torch.Tensor, pl: torch.Tensor,
                per_label: int = 20, iterations: int = 30, keep: float = 1e-2, least: int | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image roots of a rank-``B`` ``A = dL/dT``: unit features ``f`` in its row space and labels ``y``
    with ``p(f) - e_y`` in its column space (``K - 1 - B`` equations for ``B - 1`` unknowns, so isolated
    roots while ``B <= K / 2``). Each label's search starts from its public features projected into the
    row space (batched Gauss-Newton); roots whose relative residual is below ``keep``, and at least the
    ``least`` (default ``2 B``) best, are returned, best first, without duplicates (a weakly trained target's
    true roots can sit just above ``keep``). The ``B`` best roots are normally the batch's images; roots that
    are only close are finished by the joint fit."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    cols, rows = u[:, :b], vh[:b]
    outside = torch.eye(model.k, dtype=torch.float64, device=a.device) - cols @ cols.t()
    coords = F.normalize(pf.double(), dim=-1) @ rows.t()
    feats, labs, rels = [], [], []
    for y in range(model.k):
        idx = torch.nonzero(pl == y).flatten()
        if not idx.numel():
            continue
        x = F.normalize(coords[idx[torch.argsort(coords[idx].norm(dim=1), descending=True)[:per_label]]], dim=-1)
        yt = torch.tensor([y])
        x, cost = batched_levenberg_marquardt(partial(_root_residual, model, rows, outside, yt), x, iterations)
        f = F.normalize(x @ rows, dim=-1)
        w = model.weights(f, yt.expand(f.shape[0]))
        feats.append(f)
        labs.append(torch.full((f.shape[0],), y, dtype=torch.long, device=f.device))
        rels.append(cost / w.norm(dim=1).clamp_min(1e-30))
    if not feats:
        return (torch.zeros(0, model.e, dtype=torch.float64, device=a.device),
                torch.zeros(0, dtype=torch.long, device=a.device))
    f_all, y_all, r_all = torch.cat(feats), torch.cat(labs), torch.cat(rels)
    chosen: list[int] = []
    for j in torch.argsort(r_all).tolist():
        if float(r_all[j]) >= keep and len(chosen) >= (2 * b if least is None else least):
            break
        if not any(int(y_all[j]) == int(y_all[k]) and float(f_all[j] @ f_all[k]) > 0.999 for k in chosen):
            chosen.append(j)
    return f_all[chosen], y_all[chosen]


def batch_candidates(model: CoopGradientModel, a: torch.Tensor, b: int, pf: torch.Tensor,
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


def signed_labels(model: CoopGradientModel, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-specific context: the classes ``A = dL/dT`` marks present, read off its rows' signs (as iDLG reads a
    last layer), and every class's score. Row ``k`` is ``tau/B sum_i (p_ik - y_ik) f_i``: an image of class
    ``k`` enters it with a negative weight, the others with positive ones, and every digit's feature points
    towards its own class's text feature, so ``score_k = a_k . t_k`` is negative when class ``k``'s own
    images dominate the row. Returns ``(present, score)``: the classes with a negative score, sorted, and
    the ``(K,)`` scores. A positive score does not mean absent: a confidently classified image's own weight
    ``p_y - 1`` is small, no larger than the other images' ``p_ik``."""
    score = (a * model.text).sum(1)
    return torch.nonzero(score < 0).flatten(), score


def one_label_changes(
    model: CoopGradientModel, z: torch.Tensor, pf: torch.Tensor, pl: torch.Tensor, cand: torch.Tensor,
    best: Fit, fit: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]],
    order: list[int], tried: set[tuple[int, ...]], rounds: int, converged: float, slots: list[int] | None = None,
) -> Fit:
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


@dataclass
class BatchSearch:
    """A CoOp batch fit from public candidates: the fit problem, the public features ``pf`` (labels ``pl``), the
    batch size ``b``, the candidate sets (:func:`batch_candidates`), LM steps per fit, the residual below
    which a fit counts as converged, and ``determined`` (the gradient's rank over the unknown feature numbers:
    a determined fit counts as converged on its data residual; an under-determined one, whose data residual
    any number of wrong features reach, only on data and prior together)."""

    fit: ReducedFit
    pf: torch.Tensor
    pl: torch.Tensor
    b: int
    candidates: list[tuple[torch.Tensor, torch.Tensor]]
    iterations: int
    converged: float
    determined: float

    def refine(self, start: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The joint refinement of a start with fixed labels: the features and the data residual."""
        return self.fit.refine_data(start, labels, self.iterations)

    def pursue(self, given: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """A greedy pursuit picks ``B`` candidates (feature, its label) that together explain the gradient, then
        all features are refined jointly; the candidate sets in turn until one converges. ``given``: the labels
        of the slots (the candidates of those labels only). Returns features, labels, LM cost, data residual."""
        found: tuple[torch.Tensor, torch.Tensor, float, float] | None = None
        model = self.fit.model
        for feats_c, labs_c in self.candidates:
            if given is not None and any(int((labs_c == y).sum()) < int((given == y).sum()) for y in given.unique()):
                continue  # this candidate set cannot start a fit with these labels
            chosen = greedy_pursuit(self.fit.z, model.per_candidate(feats_c, labs_c), self.b, divisor=self.b,
                                    cand_labels=labs_c, slot_labels=given)
            labs = labs_c[chosen] if given is None else given.long()
            f, cost, data = self.fit.refine(feats_c[chosen], labs, self.iterations)
            if found is None or cost < found[2]:
                found = (f, labs, cost, data)
            if (data if self.determined >= 1.0 else cost) < self.converged:
                break
        if found is None:
            raise ClipleakError("too few public images carry the shared labels: cannot start the CoOp fit")
        return found

    def change_labels(self, found: Fit, swaps: int) -> Fit:
        """A determined fit with isolated label roots that stalled (a label is likely wrong): ``swaps`` rounds of
        :func:`one_label_changes` over every class."""
        model = self.fit.model
        return one_label_changes(model, self.fit.z, self.pf, self.pl, model.per_candidate(self.pf, self.pl), found,
                                 self.refine, list(range(model.k)), {tuple(sorted(found[1].tolist()))}, swaps,
                                 self.converged)

    def signed(self, a: torch.Tensor, swaps: int) -> Fit:
        """A class-specific batch whose label roots are not isolated (``K < 2 B``): labels from the signs first.

        The ``B`` classes with the lowest :func:`signed_labels` score (all the classes marked present, then the
        least positive) are fitted (:meth:`pursue` with those labels); if that stalls, up to ``swaps`` rounds of
        :func:`one_label_changes` change the slots whose class is not marked present, to a class not marked
        present; then the free fit (:meth:`pursue` without labels) runs, and it is taken only if it fits better
        and keeps every class marked present (the residual of two stalled fits does not rank them reliably)."""
        model = self.fit.model
        present, score = signed_labels(model, a)
        marked = set(present.tolist())
        order = torch.argsort(score).tolist()
        first = torch.tensor(sorted(order[:self.b]))
        f, labs, _, data = self.pursue(first)
        if data >= self.converged and swaps > 0:
            slots = [i for i, y in enumerate(labs.tolist()) if y not in marked]
            f, labs, data = one_label_changes(
                model, self.fit.z, self.pf, self.pl, model.per_candidate(self.pf, self.pl), (f, labs, data),
                self.refine, [y for y in order if y not in marked], {tuple(first.tolist())}, swaps, self.converged,
                slots=slots)
        if data >= self.converged:
            free_f, free_labs, _, free_data = self.pursue(None)
            if free_data < data and marked <= set(free_labs.tolist()):
                f, labs, data = free_f, free_labs, free_data
        return f, labs, data


def shared_label_sets(model: CoopGradientModel, z: torch.Tensor, b: int, pf: torch.Tensor, pl: torch.Tensor,
                      dims: tuple[int, ...] = SHARED_SUBSPACES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Candidate label multisets of a shared-context batch, read off the gradient before any feature fit.

    With one context for all classes the gradient does not determine a rank-``B`` ``A = dL/dT`` in the full
    feature space, but the images' features lie close to the principal subspace of the public features, and
    there it does (:func:`low_rank_dl_dt` with ``basis``). The labels of the ``B`` best :func:`label_roots` of
    that ``A`` are one candidate per subspace dimension (``dims``), without repeats, returned with the roots
    themselves (``(B,)`` labels and ``(B, E)`` features, sorted by label)."""
    mu, evals, evecs = principal_axes(pf)
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


@dataclass
class MultisetFits:
    """Continuation fits of a shared-context batch (:meth:`ReducedFit.continuation`) that remember the best fit
    of every label multiset (for :func:`finish_shared`)."""

    fit: ReducedFit
    best: dict[tuple[int, ...], Fit] = field(default_factory=dict)

    def run(self, start: torch.Tensor, labels: torch.Tensor,
            schedule: tuple[tuple[float, int], ...]) -> tuple[torch.Tensor, float]:
        """Fit ``labels`` from ``start`` through ``schedule``: the features and the data residual."""
        f, data = self.fit.continuation(start, labels, schedule)
        key = tuple(sorted(labels.tolist()))
        if key not in self.best or data < self.best[key][2]:
            self.best[key] = (f, labels, data)
        return f, data


def _search_multisets(fits: MultisetFits, sets: list[tuple[torch.Tensor, torch.Tensor | None]], unit: torch.Tensor,
                      cand: torch.Tensor, pl: torch.Tensor, b: int) -> Fit | None:
    """Each label multiset from its roots (when it has them), then from a pursuit among the public features
    (``unit``, their batch-1 gradients ``cand``, labels ``pl``), until one fits below :data:`SHARED_CONVERGED`:
    the lowest data residual."""
    z = fits.fit.z
    best: Fit | None = None
    for labs, roots in sets:
        pursued = unit[greedy_pursuit(z, cand, b, divisor=b, cand_labels=pl, slot_labels=labs)]
        for start in [*([roots] if roots is not None else []), pursued]:
            f, data = fits.run(start, labs, SHARED_CONTINUATION)
            if best is None or data < best[2]:
                best = (f, labs, data)
            if data < SHARED_CONVERGED:
                break
        if best is not None and best[2] < SHARED_CONVERGED:
            break
    return best


def shared_batch_fit(fit: ReducedFit, b: int, pf: torch.Tensor, pl: torch.Tensor, labels: torch.Tensor | None,
                     swaps: int) -> Fit | None:
    """A shared-context batch whose gradient has as many numbers as unknown feature directions (features,
    labels, data residual; ``None`` without a candidate label multiset).

    Each candidate label multiset (the shared labels, or :func:`shared_label_sets`) is fitted from its label
    roots, then from a pursuit among the public features (``pf``, labels ``pl``), each time with the prior
    first and then without it (:data:`SHARED_CONTINUATION`); the first below :data:`SHARED_CONVERGED` is
    taken. Otherwise up to ``swaps`` rounds change one label at a time, warm-started from the best fit
    (:data:`SHARED_SWAP`), and the lowest data residual wins. Last, the lowest-residual multisets go on without
    the prior (:func:`finish_shared`)."""
    model, z = fit.model, fit.z
    unit = F.normalize(pf.double(), dim=-1)
    sets: list[tuple[torch.Tensor, torch.Tensor | None]] = (
        [(labels.long(), None)] if labels is not None else list(shared_label_sets(model, z, b, pf, pl)))
    cand = model.per_candidate(pf, pl)
    fits = MultisetFits(fit)
    best = _search_multisets(fits, sets, unit, cand, pl, b)
    if best is not None and labels is None and swaps > 0 and best[2] >= SHARED_CONVERGED:
        named = torch.cat([labs for labs, _ in sets])
        changed = one_label_changes(
            model, z, pf, pl, cand, best, partial(fits.run, schedule=SHARED_SWAP),
            sorted(range(model.k), key=lambda y: -int((named == y).sum())),
            {tuple(sorted(labs.tolist())) for labs, _ in sets}, swaps, SHARED_CONVERGED)
        if changed[1] is not best[1]:  # a short fit won: finish it
            f, data = fits.run(changed[0], changed[1], SHARED_CONTINUATION)
            best = (f, changed[1], data) if data < changed[2] else changed
    if best is None:
        return None
    return finish_shared(list(fits.best.values()), best, fit.prior_free)


def finish_shared(
    fits: list[Fit], best: Fit, go_on: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, float]],
    polish: tuple[int, int, int] = SHARED_POLISH,
) -> Fit:
    """The finish of a shared-context batch fit (:data:`SHARED_POLISH`): the ``finalists`` fits ``(features,
    labels, data residual)`` with the lowest residuals each go on for ``screen`` prior-free LM steps
    (``go_on(features, labels, steps)``), and the lowest after that for ``finish`` more; ``best`` (the search's
    pick) is kept unless the finished fit explains the gradient better.

    With the right labels the data residual keeps falling without the prior, slowly, since the confidently
    classified digits (``|p - e_y|`` about 0.01) barely enter the gradient, while a wrong multiset's barely
    moves: the short fits of the label search cannot rank them; the finished ones can."""
    finalists, screen, finish = polish
    if screen + finish <= 0 or not fits:
        return best
    ranked = sorted(fits, key=lambda t: t[2])[:max(1, finalists)]
    screened = [(*go_on(f, labs, screen), labs) if screen > 0 else (f, data, labs) for f, labs, data in ranked]
    f, data, labs = min(screened, key=lambda t: t[1])
    if finish > 0:
        f, data = go_on(f, labs, finish)
    return (f, labs, data) if data < best[2] else best
