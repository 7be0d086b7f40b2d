"""CLIP-Adapter: image features read off the first layer's gradient.

``A(f) = ReLU(ReLU(f W1) W2)`` acts on the image feature ``f``; the gradient of ``W1`` (stored
``(hidden, E)``) is ``sum_i delta_i f_i^T``: each row is a combination of the batch's features, and
for one image it is exactly rank one, its right singular vector the feature direction (``A`` is
positively homogeneous, so the direction is all the classifier uses). For a batch, hidden units active
for only one image give rows parallel to that image's feature: clustering the row directions
separates the batch. The sign comes from the ReLU: a unit with a non-zero gradient row was active,
i.e. ``(W1 f)_j > 0``.

Distinct images must give distinct features. A cluster whose direction repeats (or negates) one
already found is not a new image; when fewer than ``B`` clusters are separated, the remaining slots
are filled with the leading directions of what the separated features do not explain, and the
result says how many were separated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..peft import Victim
from ..privacy import clipped_sum
from ..records import Observation
from .labels import predict_labels
from .noise import NOISE_MARGIN
from .solvers import batched_levenberg_marquardt, greedy_pursuit, levenberg_marquardt

ROW_COSINE = 0.999
"""Gradient rows this parallel belong to one image."""
DISTINCT_COSINE = 0.99
"""Two recovered directions closer than this (in absolute cosine) are the same image."""
SMOOTH_BETA = 200.0
"""Softplus sharpness of the smoothed pass of a batch fit (pre-activations are of order 0.1-1)."""


@dataclass
class AdapterFeatures:
    """Recovered normalised features ``(B, E)``; the first ``separated`` are single images' features,
    the rest estimates from the unexplained part of the gradient (mixtures)."""

    features: torch.Tensor
    separated: int


def adapter_features(obs: Observation, victim: Victim, tol: float = ROW_COSINE,
                     distinct: float = DISTINCT_COSINE) -> AdapterFeatures:
    """Normalised image features recovered from a CLIP-Adapter gradient, one per image, never a
    duplicate or negated direction."""
    if victim.cfg.method != "adapter" or "adapter.fc1.weight" not in obs.gradients or victim.adapter is None:
        raise ClipleakError("feature recovery from the gradient needs an 'adapter' observation")
    g = obs.gradients["adapter.fc1.weight"].double()  # (hidden, E)
    w1 = victim.adapter.fc1.weight.detach().double()
    b = obs.batch_size
    norms = g.norm(dim=1)
    live = norms > 1e-8 * norms.max().clamp_min(1e-30)
    if not bool(live.any()):
        raise ClipleakError("the adapter gradient is zero: no feature can be read off it")
    rows = g[live] / norms[live, None]
    live_idx = torch.nonzero(live).flatten()
    if b == 1:
        _, _, vh = torch.linalg.svd(g, full_matrices=False)
        return AdapterFeatures(F.normalize(_orient(vh[0], w1, live_idx)[None].float(), dim=-1), 1)
    feats: list[torch.Tensor] = []
    remaining = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    cos = (rows @ rows.t()).abs()
    while len(feats) < b and bool(remaining.any()):
        adj = (cos > tol) & remaining[None, :] & remaining[:, None]
        j = int(adj.sum(1).argmax())
        members = torch.nonzero(adj[j]).flatten()
        _, _, vh = torch.linalg.svd(rows[members], full_matrices=False)
        v = _orient(vh[0], w1, live_idx[members])
        remaining[members] = False
        if all(abs(float(v @ f)) < distinct for f in feats):
            feats.append(v)
    separated = len(feats)
    if separated < b:
        # what the separated features do not explain: rows projected off their span
        basis = (torch.linalg.qr(torch.stack(feats).t())[0] if feats
                 else torch.zeros(g.shape[1], 0, dtype=g.dtype, device=g.device))
        resid = g - (g @ basis) @ basis.t()
        _, _, vh = torch.linalg.svd(resid, full_matrices=False)
        for v in vh:
            if len(feats) == b:
                break
            v = _orient(v, w1, live_idx)
            if all(abs(float(v @ f)) < distinct for f in feats):
                feats.append(v)
    return AdapterFeatures(F.normalize(torch.stack(feats).float(), dim=-1), separated)


def _orient(v: torch.Tensor, w1: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Pick the sign of ``v`` for which the units with a gradient are active (``W1 v > 0``)."""
    s = (w1[active] @ v).sum()
    return v if s >= 0 else -v


class AdapterGradientModel:
    """The CLIP-Adapter gradient (``fc1`` and ``fc2`` weights) as a function of the batch's image features
    and labels, computed by ``torch.func`` on the adapter alone (the frozen encoders are not involved).

    Each image's contribution is invariant to the scale of its raw feature (the adapter is positively
    homogeneous and the classifier normalises), so unit features stand in for the raw ones.

    ``clip``: the per-example clipping norm C of a DP-SGD observation (:func:`~clipleak.recover.noise.modelled_clip`):
    the model is then the client's ``sum_i min(1, C / |g_i|) g_i / B``, each image's gradient clipped as the
    client clipped it (its norm is scale-invariant too, so unit features still stand in). Without it a fit of
    a clipped update stays far above the noise floor even with no noise at all (benchmarks/clip_fit_isolation.py).
    Clipping rescales each image's term only, so the spans the root search reads are unchanged.
    ``weights``: the adapter state the client trained from (``adapter.fc1.weight``, ``adapter.fc2.weight``), when
    it is not the victim's own (a malicious server's crafted weights).
    """

    def __init__(self, victim: Victim, clip: float | None = None, weights: dict[str, torch.Tensor] | None = None):
        if victim.adapter is None:
            raise ClipleakError("the adapter gradient model needs an 'adapter' victim")
        dev = victim.adapter.fc1.weight.device
        fc1 = weights["adapter.fc1.weight"] if weights is not None else victim.adapter.fc1.weight
        fc2 = weights["adapter.fc2.weight"] if weights is not None else victim.adapter.fc2.weight
        self.w1 = fc1.detach().to(dev).double()
        self.w2 = fc2.detach().to(dev).double()
        self.ratio = float(victim.cfg.adapter_ratio)
        self.text = victim.text_features().detach().double()
        self.scale = float(victim.logit_scale().detach())
        self.k = int(self.text.shape[0])
        self.smooth: float | None = None  # softplus sharpness in place of the ReLUs (None: exact ReLU)
        self.clip = clip

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.smooth is None else F.softplus(x, beta=self.smooth)

    def _loss(self, params: dict[str, torch.Tensor], feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self._act(feats @ params["w1"].t())
        a = self._act(h @ params["w2"].t())
        f = F.normalize(self.ratio * a + (1 - self.ratio) * feats, dim=-1)
        return F.cross_entropy(self.scale * f @ self.text.t(), labels)

    def gradient(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The flat ``(fc1, fc2)`` weight gradient of the mean cross-entropy (each image's term clipped to
        ``clip`` first, when set)."""
        params = {"w1": self.w1, "w2": self.w2}
        labels = labels.to(self.w1.device)
        if self.clip is None:
            g = torch.func.grad(self._loss)(params, feats.double(), labels)
            return torch.cat([g["w1"].reshape(-1), g["w2"].reshape(-1)])

        def one(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            gi = torch.func.grad(self._loss)(params, f[None], y[None])
            return torch.cat([gi["w1"].reshape(-1), gi["w2"].reshape(-1)])

        per = torch.func.vmap(one)(feats.double(), labels)
        return clipped_sum(per, self.clip)[0] / feats.shape[0]  # the client's own clipping rule


def adapter_target(obs: Observation) -> torch.Tensor:
    """The observed flat ``(fc1, fc2)`` weight gradient."""
    return torch.cat([obs.gradients["adapter.fc1.weight"].double().reshape(-1),
                      obs.gradients["adapter.fc2.weight"].double().reshape(-1)])


def adapter_labels(model: AdapterGradientModel, feats: torch.Tensor, target: torch.Tensor,
                   start: torch.Tensor | None = None, max_changes: int = 64) -> tuple[torch.Tensor, float]:
    """Labels that reproduce the observed gradient with the features held fixed (MIP's label prediction).

    Batch 1: every label is tried and the best-fitting one wins (exact when the feature is). A batch starts
    from ``start`` (e.g. the zero-shot classes) and applies the move (one relabelling, or a swap of two
    images' labels) that lowers the relative residual most, until none does.
    """
    tn = target.norm().clamp_min(1e-30)
    b = feats.shape[0]

    def cost(labs: torch.Tensor) -> float:
        return float((model.gradient(feats, labs) - target).norm() / tn)

    labs = start.clone().long() if start is not None else torch.zeros(b, dtype=torch.long)
    current = cost(labs)
    for _ in range(max_changes):
        best: tuple[float, torch.Tensor] | None = None
        for trial in _label_moves(labs, model.k):
            c = cost(trial)
            if c < current and (best is None or c < best[0]):
                best = (c, trial)
        if best is None:
            break
        current, labs = best
    return labs, current


def _label_moves(labels: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Every labelling one move away: one image relabelled, or two images' labels swapped (a swap keeps
    the multiset, which single changes cannot reach without passing through a worse fit)."""
    moves = []
    b = labels.numel()
    for i in range(b):
        for y in range(k):
            if y != int(labels[i]):
                t = labels.clone()
                t[i] = y
                moves.append(t)
        for j in range(i + 1, b):
            if int(labels[i]) != int(labels[j]):
                t = labels.clone()
                t[i], t[j] = labels[j], labels[i]
                moves.append(t)
    return moves


def refine_adapter_batch(model: AdapterGradientModel, obs: Observation, feats: torch.Tensor, labels: torch.Tensor,
                         iterations: int = 40, floor: float = 0.0) -> tuple[torch.Tensor, float]:
    """Jointly refine a batch's features inside the span the ``fc1`` gradient reveals (its top-B right
    singular vectors hold every image's feature), fitting both weight gradients by Levenberg-Marquardt.

    ``floor``: the relative residual the DP noise alone leaves (:mod:`clipleak.recover.noise`); the fit stops
    there, and only a fit stalled above it gets the softplus pass."""

    target = adapter_target(obs)
    tn = target.norm().clamp_min(1e-30)
    b = feats.shape[0]
    g1 = obs.gradients["adapter.fc1.weight"].double()
    _, _, vh = torch.linalg.svd(g1, full_matrices=False)
    basis = vh[:b]  # (B, E)
    c0 = (F.normalize(feats.double(), dim=-1) @ basis.t()).reshape(-1)

    def resid(c: torch.Tensor) -> torch.Tensor:
        f = F.normalize(c.view(b, b) @ basis, dim=-1)
        return (model.gradient(f, labels) - target) / tn

    # the ReLUs make the gradient piecewise smooth: a fit can stall at a kink next to the solution (a unit
    # inactive that should be active gives no signal to cross over). The exact model first; when it stalls,
    # a softplus pass, then the exact model again
    tol = max(1e-8, floor)
    c_exact, cost = levenberg_marquardt(resid, c0, iterations, tol=tol)
    if cost > max(1e-4, NOISE_MARGIN * floor):
        model.smooth = SMOOTH_BETA
        try:
            c1, _ = levenberg_marquardt(resid, c0, iterations, tol=tol)
        finally:
            model.smooth = None
        c1, cost1 = levenberg_marquardt(resid, c1, iterations, tol=tol)
        if cost1 < cost:
            c_exact, cost = c1, cost1
    c0 = c_exact
    return F.normalize(c0.view(b, b) @ basis, dim=-1).float(), cost


def fit_adapter_batch(victim: Victim, obs: Observation, public_feats: torch.Tensor, public_labels: torch.Tensor,
                      start: torch.Tensor, *, labels: torch.Tensor | None = None, candidates: int = 400,
                      iterations: int = 100, rounds: int = 3, floor: float = 0.0, clip: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Features and labels of an adapter batch, fitted to both weight gradients (MIP's inverse gradient
    estimation for a batch).

    Every image's feature lies in the span of the ``fc1`` gradient's top-B right singular vectors. Public
    features projected into that span are the candidates (those that lie closest to it, with their own
    labels). Single images found exactly by :func:`adapter_roots` come first and a greedy pursuit over the
    candidates fills the rest; the clustered directions ``start`` are a second set. Each set is refined
    jointly inside the span (:func:`refine_adapter_batch`), then
    relabelled (:func:`adapter_labels`) and refined again, ``rounds`` times at most; the lower residual wins.
    Known ``labels`` (shared by the client) are kept as they are (only the candidates of those labels).
    ``floor``: the DP noise's relative residual (:func:`refine_adapter_batch`); ``clip``: the per-example
    clipping norm to model (:class:`AdapterGradientModel`).
    Returns ``(features (B, E), labels (B,), relative residual)``.
    """
    model = AdapterGradientModel(victim, clip)
    target = adapter_target(obs)
    b = obs.batch_size
    g1 = obs.gradients["adapter.fc1.weight"].double()
    _, _, vh = torch.linalg.svd(g1, full_matrices=False)
    basis = vh[:b]
    unit = F.normalize(public_feats.double(), dim=-1)
    inside = (unit @ basis.t()).norm(dim=1)
    if labels is not None:
        inside[~torch.isin(public_labels, labels)] = -1.0
    keep = torch.argsort(inside, descending=True)[:candidates]
    proj = F.normalize((unit[keep] @ basis.t()) @ basis, dim=-1)
    labs_c = public_labels[keep].long()
    cand = torch.stack([model.gradient(proj[i:i + 1], labs_c[i:i + 1]) for i in range(proj.shape[0])])
    # exact single images first (root search), the rest from a greedy pursuit over the candidates; the
    # pursuit alone and the clustered directions are the other start sets (on a weakly trained target the
    # root search can return spurious roots)
    roots = adapter_roots(victim, obs, torch.cat([public_feats[keep].float(), start.float()]))
    if labels is not None:
        roots = roots[:0]  # with known labels the pairing of roots to labels is unknown: pursue all
    root_labels = predict_labels(victim, roots.float())

    start_sets: list[tuple[torch.Tensor, torch.Tensor | None]] = [
        _pursue(model, target, cand, proj, labs_c, b, roots, root_labels, labels)]
    if roots.shape[0]:
        start_sets.append(_pursue(model, target, cand, proj, labs_c, b, roots[:0], root_labels[:0], labels))
    start_sets.append((start.double(), labels))
    results = []
    for feats, labs in start_sets:
        if labs is None:
            labs, _ = adapter_labels(model, feats, target, predict_labels(victim, feats.float()))
        f, cost = refine_adapter_batch(model, obs, feats, labs, iterations, floor)
        for _ in range(rounds if labels is None else 0):
            new_labs, _ = adapter_labels(model, f, target, labs)
            if torch.equal(new_labs, labs):
                break
            labs = new_labs
            f, cost = refine_adapter_batch(model, obs, f, labs, iterations, floor)
        results.append((f, labs, cost))
    f, labs, cost = min(results, key=lambda t: t[2])
    return f, labs, cost


def _pursue(model: AdapterGradientModel, target: torch.Tensor, cand: torch.Tensor, proj: torch.Tensor,
            labs_c: torch.Tensor, b: int, fixed: torch.Tensor, fixed_labels: torch.Tensor,
            labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A start set for a batch of ``b``: the ``fixed`` features (labels ``fixed_labels``) and a greedy pursuit
    over the candidates (features ``proj``, labels ``labs_c``, gradients ``cand``) for the other slots; shared
    ``labels`` are a multiset the pursued slots draw from."""
    total = torch.zeros_like(target)
    for i in range(fixed.shape[0]):
        total = total + model.gradient(fixed[i:i + 1].double(), fixed_labels[i:i + 1])
    chosen = greedy_pursuit(target, cand, b - fixed.shape[0], divisor=b, start=total, cand_labels=labs_c,
                            label_counts=None if labels is None else torch.bincount(labels.long(), minlength=model.k))
    return torch.cat([fixed.double(), proj[chosen]]), torch.cat([fixed_labels, labs_c[chosen]])


def adapter_roots(victim: Victim, obs: Observation, starts: torch.Tensor, *, tol: float = 1e-3,
                  iterations: int = 30) -> torch.Tensor:
    """Single images' feature directions found one by one (a root search), without knowing the others.

    ``fc2``'s gradient is ``sum_i u_i h_i^T`` with ``h_i = ReLU(W1 f_i)``: its top-B right singular vectors
    span every image's hidden activation. And every feature lies in the span of ``fc1``'s gradient. So a
    direction ``f`` in the ``fc1`` span whose ``ReLU(W1 f)`` lies in the ``fc2`` span is (generically) one
    image's feature: each image is a root of ``|(I - Q Q^T) ReLU(W1 f)| / |ReLU(W1 f)|``, which needs no
    joint fit. From each start (projected into the span) Levenberg-Marquardt looks for a root; distinct
    roots (``|cos| < DISTINCT_COSINE``) are returned, at most B, best first.
    """

    if victim.adapter is None:
        raise ClipleakError("the adapter root search needs an 'adapter' victim")
    b = obs.batch_size
    w1 = victim.adapter.fc1.weight.detach().double()
    g1 = obs.gradients["adapter.fc1.weight"].double()
    g2 = obs.gradients["adapter.fc2.weight"].double()
    basis = torch.linalg.svd(g1, full_matrices=False)[2][:b]  # (B, E)
    q = torch.linalg.svd(g2, full_matrices=False)[2][:b].t()  # (h, B)
    if q.shape[0] <= b:
        return torch.zeros(0, g1.shape[1], device=g1.device)
    wb = w1 @ basis.t()  # (h, B)

    def resid(c: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(wb @ (c / c.norm()))
        return (hidden - q @ (q.t() @ hidden)) / hidden.norm().clamp_min(1e-12)

    coeffs = F.normalize(starts.double(), dim=-1) @ basis.t()
    coeffs = coeffs / coeffs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    found, costs = batched_levenberg_marquardt(resid, coeffs, iterations)
    roots: list[tuple[float, torch.Tensor]] = []
    for i in torch.argsort(costs).tolist():
        if float(costs[i]) > tol or len(roots) >= b:
            break
        f = F.normalize(found[i] @ basis, dim=0)
        if all(abs(float(f @ g)) < DISTINCT_COSINE for _, g in roots):
            roots.append((float(costs[i]), f))
    roots.sort(key=lambda t: t[0])
    return torch.stack([f for _, f in roots]).float() if roots else torch.zeros(0, g1.shape[1], device=g1.device)
