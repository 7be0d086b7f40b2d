"""Fits that model an update defense: what a pruned or quantised entry still says about the true one.

A defense without noise (:mod:`clipleak.privacy.defenses`) is a known, deterministic function of the
client's update, and the observation records which one was applied. So every observed entry bounds the
true entry to an interval, and the true update lies inside all of them at once:

* ``prune:F`` (top-k over the whole update): a kept entry is exact; a pruned one is at most the smallest
  kept magnitude ``tau`` (it lost the contest): ``[-tau, tau]``.
* ``quantize:K``: a code ``q`` of a tensor with scale ``m`` (its largest observed magnitude, which the
  largest entry keeps exactly) and step ``2 m / (2^K - 1)`` came from ``[q - step/2, q + step/2]``
  within ``[-m, m]``.
* ``quantize:sign``: ``sign(g) * mean|g|``: a positive entry from ``[0, inf)``, a negative one from
  ``(-inf, 0]``, a zero from exactly 0; and each tensor's mean magnitude is known (one more number).

A feature fit then minimises the distance of the modelled update to its intervals (zero inside) instead
of its distance to the observed numbers, with a Gaussian public-feature prior in whitened coordinates:
many updates are consistent with a heavily pruned one, and the prior picks the typical one among them.
``clip:C`` is modelled elsewhere (a clipped update is a rescaled one: the fits that read directions are
unaffected, and the adapter fit models per-example clipping).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..privacy import Defense
from ..records import Observation
from .solvers import Whitening, greedy_pursuit, levenberg_marquardt

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""The modelled flat update (float64) of features ``(B, E)`` and labels ``(B,)``."""

MODELLED_KINDS = ("prune", "quantize")
DEFENSE_PRIOR = 1e-5
"""Weight of the whitened public-feature prior in a defense-modelled fit (chosen on validation digits)."""
POLISH_PRIOR = 1e-8
"""The same prior's weight in the last pass, from the best start's fit (lets the data finish the fit)."""
PUBLIC_STARTS = 4
"""Public features (with their own labels) whose modelled updates lie closest to the intervals, tried as
starts beside the undefended read-out's estimate."""


@dataclass(frozen=True)
class Intervals:
    """Bounds ``lo <= g <= hi`` on the true flat update (tensors in ``names`` order, float64) that the
    defended observation allows, and for signSGD each tensor's known mean magnitude (``mean_abs``, with
    the tensor's slice of the flat vector). ``norm``: the observed update's norm, the residual's scale."""

    defense: Defense
    lo: torch.Tensor
    hi: torch.Tensor
    norm: float
    mean_abs: tuple[tuple[slice, float], ...] = ()

    def residual(self, g: torch.Tensor) -> torch.Tensor:
        """How far the flat update ``g`` (or each row of ``(N, D)`` updates) lies outside its intervals (0
        inside), relative to the observed norm; for signSGD also each tensor's relative mean-magnitude misfit."""
        out = (torch.clamp(g - self.hi, min=0) - torch.clamp(self.lo - g, min=0)) / self.norm
        if not self.mean_abs:
            return out
        scale = [(g[..., s].abs().mean(-1) - m) / m for s, m in self.mean_abs]
        return torch.cat([out, torch.stack(scale, dim=-1)], dim=-1)

    def describe(self) -> str:
        if self.defense.kind == "prune":
            return "kept entries exact, pruned ones bounded by the smallest kept magnitude"
        if self.defense.parameter == "sign":
            return "each entry's sign and each tensor's mean magnitude"
        return "each entry within half a quantisation step of its code"


def modelled_defense(obs: Observation) -> Defense | None:
    """The observation's defense when a fit can model it (pruning or quantisation, not the identity)."""
    d = Defense.from_record(obs.meta.get("defense"))
    if d is None or d.is_identity or d.kind not in MODELLED_KINDS:
        return None
    return d


def defense_intervals(obs: Observation, names: list[str]) -> Intervals | None:
    """The intervals the observation's defense leaves on the true update over ``names`` (in that order), or
    ``None`` when it records no defense a fit can model."""
    d = modelled_defense(obs)
    if d is None:
        return None
    grads = [obs.gradients[n].detach().double().reshape(-1) for n in names]
    flat = torch.cat(grads)
    norm = float(flat.norm().clamp_min(1e-30))
    if d.kind == "prune":
        kept = flat != 0
        tau = float(flat[kept].abs().min()) if bool(kept.any()) else 0.0
        return Intervals(d, torch.where(kept, flat, -tau), torch.where(kept, flat, tau), norm)
    los, his, means = [], [], []
    start = 0
    for g in grads:
        if d.parameter == "sign":
            inf = torch.full_like(g, float("inf"))
            zero = torch.zeros_like(g)
            los.append(torch.where(g < 0, -inf, zero))
            his.append(torch.where(g > 0, inf, zero))
            m = float(g.abs().max())
            if m > 0:
                means.append((slice(start, start + g.numel()), m))
        else:
            m = float(g.abs().max())
            half = m / (2 ** int(d.parameter) - 1)  # half a step of 2m / (2^K - 1)
            los.append((g - half).clamp(min=-m))
            his.append((g + half).clamp(max=m))
        start += g.numel()
    return Intervals(d, torch.cat(los), torch.cat(his), norm, tuple(means))


def interval_fit(predict: Callable[[torch.Tensor], torch.Tensor], intervals: Intervals, whiten: Whitening,
                 start: torch.Tensor, *, prior: float = DEFENSE_PRIOR, iterations: int = 40
                 ) -> tuple[torch.Tensor, float, float]:
    """Features ``(B, E)`` whose modelled update (``predict(features)``, flat, float64) lies in the
    intervals, from ``start``, by Levenberg-Marquardt in whitened public-feature coordinates with a
    Gaussian prior of weight ``prior``. Returns the features, the cost minimised (data and prior) and the
    data residual alone."""
    e = start.shape[-1]
    u0 = whiten.coords(start).reshape(-1)
    w = prior ** 0.5 / u0.numel() ** 0.5

    def data(u: torch.Tensor) -> torch.Tensor:
        return intervals.residual(predict(whiten.features(u, e)))

    def resid(u: torch.Tensor) -> torch.Tensor:
        return torch.cat([data(u), w * u])

    u, cost = levenberg_marquardt(resid, u0, iterations, tol=1e-10)
    return whiten.features(u, e), cost, float(data(u).norm())


@dataclass
class DefendedFit:
    """Features ``(B, E)`` (normalised), labels and the data residual of a defense-modelled fit, and which
    start won (``"read-out"``: the undefended read-out's estimate; ``"public"``: public features)."""

    features: torch.Tensor
    labels: torch.Tensor
    residual: float
    start: str


def fit_defended(predict: Predict, intervals: Intervals, whiten: Whitening, start: torch.Tensor,
                 start_labels: torch.Tensor, public_feats: torch.Tensor, public_labels: torch.Tensor, *,
                 smooth: Callable[[bool], None] | None = None, public_starts: int = PUBLIC_STARTS,
                 iterations: int = 40) -> DefendedFit:
    """Features and labels of a defended update, fitted to its intervals (:func:`interval_fit`).

    Starts: the undefended read-out's features and labels (``start``; a read-out of a pruned or quantised
    update is biased, not useless), and for batch 1 the ``public_starts`` public features whose own-label
    modelled updates lie closest to the intervals; for a batch, a greedy pursuit of public features whose
    summed updates do. Each start is fitted with the prior (:data:`DEFENSE_PRIOR`) for half the
    ``iterations``; the lowest cost goes on for ``iterations``, then as many with :data:`POLISH_PRIOR`.
    ``smooth(True)`` / ``smooth(False)`` switch a piecewise-linear model
    (the adapter's ReLUs) to a smooth one and back: each start is then fitted smooth first (a ReLU fit
    stalls where a unit should cross over), then exact."""
    b = start.shape[0]
    pf, pl = public_feats.double(), public_labels.long()
    starts: list[tuple[str, torch.Tensor, torch.Tensor]] = [("read-out", start.double(), start_labels.long())]
    if public_starts > 0:
        one = torch.func.vmap(lambda f, y: predict(f[None], y[None]))
        cand = torch.cat([one(pf[i:i + 256], pl[i:i + 256]) for i in range(0, pf.shape[0], 256)])
        if b == 1:
            cost = intervals.residual(cand).norm(dim=-1)
            for i in torch.argsort(cost)[:public_starts].tolist():
                starts.append(("public", pf[i:i + 1], pl[i:i + 1]))
        else:
            chosen = greedy_pursuit(torch.zeros_like(cand[0]), cand, b, divisor=b,
                                    distance=lambda g: intervals.residual(g).norm(dim=-1))
            starts.append(("public", pf[chosen], pl[chosen]))

    def fit(feats: torch.Tensor, labels: torch.Tensor, prior: float, n: int) -> tuple[torch.Tensor, float, float]:
        def model(x: torch.Tensor) -> torch.Tensor:
            return predict(x, labels)
        if smooth is not None:
            smooth(True)
            try:
                feats = interval_fit(model, intervals, whiten, feats, prior=prior, iterations=n)[0]
            finally:
                smooth(False)
        return interval_fit(model, intervals, whiten, feats, prior=prior, iterations=n)

    best: tuple[float, str, torch.Tensor, torch.Tensor] | None = None
    for name, feats, labels in starts:  # every start screened with half the steps, the best one finished
        f, cost, _ = fit(feats, labels, DEFENSE_PRIOR, max(1, iterations // 2))
        if best is None or cost < best[0]:
            best = (cost, name, f, labels)
    assert best is not None
    _, name, f, labels = best
    f = fit(f, labels, DEFENSE_PRIOR, iterations)[0]
    f, _, data = fit(f, labels, POLISH_PRIOR, iterations)
    return DefendedFit(torch.nn.functional.normalize(f.float(), dim=-1), labels, data, name)

