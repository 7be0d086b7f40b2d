"""A malicious server's CLIP-Adapter: weights crafted from public data so that one client update gives back
the features of many images of a batch, and the read-out of those features from the update.

The design (an imprint layer, after Robbing the Fed, built inside the unchanged adapter ``ReLU(ReLU(f W1) W2)``,
no biases):

* ``W1``'s rows come in ``groups``; group ``g`` has a secret direction ``a_g`` and ``n`` thresholds
  ``beta_1 < ... < beta_n``, and its unit ``k`` is ``w = a_g - beta_k mu`` (``mu``: the mean public feature).
  CLIP features share a large common component (``mu . f > 0`` for every image), so without a bias the row
  still acts as one: unit ``k`` fires for exactly the images whose ratio ``r_g(f) = a_g . f / mu . f`` exceeds
  ``beta_k``. The thresholds are quantiles of the public ratios, so each bin between neighbouring thresholds
  holds an equal share of the images.
* ``W2 = c 1^T`` (every column the same positive vector ``c``): the adapter's output is ``c sum_k h_k``, so the
  loss's gradient with respect to every hidden unit is one scalar ``s_j`` per image, the same for all units.
  Row ``k`` of the ``W1`` gradient is then ``sum_{j: r_g(f_j) > beta_k} s_j f_j / B`` and the difference of
  neighbouring rows is the sum over the images in one bin: an image alone in its bin comes back exactly, with
  its scale ``s_j``.
* Several groups (independent directions) give each image several chances to be alone; an image recovered in
  one group is subtracted, with its exact scale, from its bin in every other group (peeling), which turns bins
  of two into bins of one. A bin's vector counts as one image when it equals a bin's vector of another group
  (the same ``s_j f_j``); at the end, bins still holding several images give their mixtures' directions.

The read-out needs only the crafted plan and the update; it never touches the client's images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..records import Observation
from .adapter import AdapterGradientModel

MATCH_TOLERANCE = 1e-3
"""Two bin vectors whose difference is this small relative to their norm are one image's ``s_j f_j``."""
EMPTY_TOLERANCE = 1e-6
"""A bin vector this small relative to the largest is empty (float32 rounding of the shared update)."""
SPREAD = 1.0
"""Norm of the output vector ``c`` relative to a feature: the adapter's output stays of a feature's scale."""


@dataclass
class ImprintPlan:
    """The server's secret: the mean public feature ``mu`` (E,), the group directions ``(G, E)`` and each
    group's thresholds ``(G, n)`` (increasing). Unit ``g * n + k`` of ``W1`` is ``directions[g] - beta[g, k] mu``."""

    mu: torch.Tensor
    directions: torch.Tensor
    thresholds: torch.Tensor

    @property
    def groups(self) -> int:
        return int(self.directions.shape[0])

    @property
    def per_group(self) -> int:
        return int(self.thresholds.shape[1])

    def w1(self, hidden: int) -> torch.Tensor:
        """The crafted ``W1`` ``(hidden, E)`` (units beyond ``G * n`` are zero rows)."""
        d, t, mu = self.directions.double(), self.thresholds.double(), self.mu.double()
        w = torch.zeros(hidden, d.shape[1], dtype=torch.float64, device=d.device)
        w[: self.groups * self.per_group] = (d[:, None, :] - t[:, :, None] * mu[None, None, :]).reshape(-1, d.shape[1])
        return w

    def ratios(self, feats: torch.Tensor) -> torch.Tensor:
        """``r_g(f) = a_g . f / mu . f`` for each feature and group ``(N, G)``."""
        f = feats.double()
        return (f @ self.directions.double().t()) / (f @ self.mu.double())[:, None]

    def bins(self, feats: torch.Tensor) -> torch.Tensor:
        """Each feature's bin in each group ``(N, G)``: the number of thresholds below its ratio (0: the
        feature fires no unit of that group)."""
        r = self.ratios(feats)
        return (r[:, :, None] > self.thresholds.double()[None]).sum(-1)


def craft_imprint(public_feats: torch.Tensor, hidden: int, *, groups: int = 1, seed: int = 0
                  ) -> tuple[dict[str, torch.Tensor], ImprintPlan]:
    """The adapter weights a malicious server sends (``adapter.fc1.weight`` (hidden, E), ``adapter.fc2.weight``
    (E, hidden)) and the plan its read-out needs, from public features ``(N, E)`` only.

    ``hidden`` is the adapter's width (``E // reduction``); it is split into ``groups`` equal groups (a
    remainder of units gets a zero row: it never fires). New tensors live on ``public_feats``' device.
    """
    if hidden < 1 or groups < 1 or hidden < groups:
        raise ClipleakError(f"need 1 <= groups <= hidden, got groups={groups}, hidden={hidden}")
    dev = public_feats.device
    f = F.normalize(public_feats.double(), dim=-1)
    if f.shape[0] < 2:
        raise ClipleakError("crafting the imprint weights needs at least two public features")
    e = f.shape[1]
    mu = F.normalize(f.mean(0), dim=0)
    if float((f @ mu).min()) <= 0:
        raise ClipleakError("the public features share no common component (mu . f <= 0 for some): "
                            "the bias-free imprint needs one")
    g = torch.Generator().manual_seed(seed)
    # directions that spread the ratios: random combinations of the public features' principal directions
    # off mu (whitened, so every direction of variation counts, not only the largest)
    centred = f - f.mean(0)
    centred = centred - (centred @ mu)[:, None] * mu[None]
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    keep = sv > 1e-6 * sv[0]
    z = torch.randn(groups, int(keep.sum()), generator=g, dtype=torch.float64).to(dev)
    dirs = F.normalize((z / sv[keep]) @ vh[keep], dim=-1)
    n = hidden // groups
    plan0 = ImprintPlan(mu=mu, directions=dirs, thresholds=torch.zeros(groups, n, dtype=torch.float64, device=dev))
    r = plan0.ratios(f)  # (N, G)
    q = torch.arange(1, n + 1, dtype=torch.float64, device=dev) / (n + 1)
    thresholds = torch.quantile(r, q, dim=0).t().contiguous()  # (G, n), increasing
    plan = ImprintPlan(mu=mu, directions=dirs, thresholds=thresholds)
    w1 = plan.w1(hidden)
    # the output vector c: positive, of a feature's norm once summed over the units that fire
    c = torch.full((e,), SPREAD / (e**0.5 * max(1, n)), dtype=torch.float64, device=dev)
    w2 = c[:, None].expand(e, hidden).clone()
    state = {"adapter.fc1.weight": w1.float(), "adapter.fc2.weight": w2.float()}
    return state, ImprintPlan(mu=mu.float(), directions=dirs.float(), thresholds=thresholds.float())


@dataclass
class ImprintFeatures:
    """Features read off a crafted update ``(B, E)``, normalised: the first ``separated`` are single images'
    (confirmed), the rest directions of bins that still hold several images (mixtures) or of bins no second
    group could confirm."""

    features: torch.Tensor
    separated: int


def imprint_features(obs: Observation, plan: ImprintPlan, *, tol: float = MATCH_TOLERANCE,
                     model: AdapterGradientModel | None = None) -> ImprintFeatures:
    """The batch's features from one update of the crafted adapter (:func:`craft_imprint`).

    Bin vectors are the differences of neighbouring rows of the ``W1`` gradient within a group. With one
    group every non-empty bin is taken (it is one image when the image was alone in its bin; nothing tells
    which). With several, a bin vector that equals the vector of its bin in another group is one image (the
    one matched in the most groups first); it is peeled off its bin in every group, and the peeling repeats
    until nothing new is confirmed. The remaining non-empty bins fill the slots left, the largest first.
    ``tol``: the relative difference under which two bin vectors are equal.

    ``model``: the adapter gradient of the crafted weights as a function of features and labels
    (:class:`~clipleak.recover.adapter.AdapterGradientModel`). A bin that holds one image holds exactly that
    image's own update, scale included, so a bin whose vector the modelled update of its direction reproduces
    (under some label, to :data:`SINGLE_TOLERANCE`) is one image; the others hold several, and the slots of the
    batch's images that no bin shows alone go to them, the largest first, instead of to the largest bins."""
    if "adapter.fc1.weight" not in obs.gradients:
        raise ClipleakError("the imprint read-out needs an 'adapter' observation")
    g1 = obs.gradients["adapter.fc1.weight"].double()
    b = obs.batch_size
    gn, n = plan.groups, plan.per_group
    bins = _bin_vectors(g1, plan)
    scale = float(bins.norm(dim=-1).max())
    if scale == 0.0:
        raise ClipleakError("the update's W1 gradient is zero: no image fired a crafted unit")
    empty = EMPTY_TOLERANCE * scale
    found: list[torch.Tensor] = []  # scaled features s_j f_j
    resid = bins.clone()
    while gn > 1 and len(found) < b:
        # the candidate confirmed by the most other groups first: a pair of images sharing a bin in two groups
        # also matches once, so one-match candidates wait until peeling has taken every better one
        best: tuple[int, float, int, int] | None = None
        norms = resid.norm(dim=-1)
        for ga in range(gn):
            for ka in range(n):
                if float(norms[ga, ka]) <= empty:
                    continue
                m = _matches(resid[ga, ka], resid, ga, plan, tol)
                if m and (best is None or (m, float(norms[ga, ka])) > best[:2]):
                    best = (m, float(norms[ga, ka]), ga, ka)
        if best is None:
            break
        _, _, ga, ka = best
        x = resid[ga, ka].clone()  # a copy: peeling changes resid in place
        resid[ga, ka] = 0.0  # its own bin, whatever rounding says about its ratio
        if any(float(F.cosine_similarity(x, y, dim=0).abs()) > 1 - 1e-6 for y in found):
            continue  # left behind by an earlier peel (its ratio on a threshold): not a new image
        found.append(x)
        _peel(resid, x, plan, ga)
    left = resid.reshape(gn * n, -1)
    feats = [_oriented(x, plan) for x in found]
    norms = left.norm(dim=-1)
    rest: list[tuple[torch.Tensor, bool]] = []  # the other non-empty bins, the largest first: (direction, alone)
    for i in torch.argsort(norms, descending=True).tolist():
        if len(feats) + len(rest) >= b or float(norms[i]) <= empty:
            break
        v = _oriented(left[i], plan)
        if all(abs(float(v @ u)) < 1 - 1e-6 for u in feats + [r for r, _ in rest]):
            alone = model is not None and _alone(model, left[i], v, i // n, i % n, plan, b)
            rest.append((v, alone))
    feats += [v for v, alone in rest if alone]
    separated = len(feats)
    crowded = [v for v, alone in rest if not alone]
    feats += crowded
    # fewer non-empty bins than images: the bins holding several (else the first) again
    spare = crowded if model is not None and crowded else feats[:1]
    feats += [spare[i % len(spare)] for i in range(b - len(feats))]
    return ImprintFeatures(torch.stack(feats).float(), separated)


SINGLE_TOLERANCE = 1e-3
"""A bin is one image when the modelled update of its direction reproduces its vector to this relative
difference (a float32 update leaves about 1e-6; two images' sum misses by far more)."""


def _alone(model: AdapterGradientModel, x: torch.Tensor, v: torch.Tensor, group: int, k: int, plan: ImprintPlan,
           batch: int) -> bool:
    """Whether bin ``k`` of ``group`` (vector ``x``, direction ``v``) is exactly one image's update: the update
    of ``v`` alone, under its best label, divided by the batch size (the client's loss is a batch mean)."""
    xn = float(x.norm())
    w1_size = model.w1.numel()
    for y in range(model.k):
        g1 = model.gradient(v[None].to(model.w1.device), torch.tensor([y]))[:w1_size].view_as(model.w1)
        pred = _bin_vectors(g1.to(x.device) / batch, plan)[group, k]
        if float((pred - x).norm()) <= SINGLE_TOLERANCE * xn:
            return True
    return False


def _bin_vectors(g1: torch.Tensor, plan: ImprintPlan) -> torch.Tensor:
    """The bin vectors ``(G, n, E)`` of a ``W1`` gradient ``(hidden, E)``: differences of neighbouring rows within
    a group, so that ``[g, k]`` sums the images with ``beta_k < r_g <= beta_{k+1}`` (the last bin is unbounded)."""
    rows = g1[: plan.groups * plan.per_group].reshape(plan.groups, plan.per_group, -1)
    return rows - torch.cat([rows[:, 1:], torch.zeros_like(rows[:, :1])], dim=1)


def _oriented(x: torch.Tensor, plan: ImprintPlan) -> torch.Tensor:
    v = F.normalize(x.double(), dim=0)
    return v if float(v @ plan.mu.double()) >= 0 else -v


def _matches(x: torch.Tensor, resid: torch.Tensor, group: int, plan: ImprintPlan, tol: float) -> int:
    """In how many other groups ``x`` (a bin vector of ``group``) equals the vector of the bin its direction
    falls into: one image's ``s_j f_j`` alone in its bin there."""
    where = plan.bins(_oriented(x, plan)[None])[0]
    xn = float(x.norm())
    count = 0
    for g in range(plan.groups):
        k = int(where[g])
        if g == group or k == 0:
            continue
        if float((resid[g, k - 1] - x).norm()) <= tol * xn:
            count += 1
    return count


def _peel(resid: torch.Tensor, x: torch.Tensor, plan: ImprintPlan, own: int) -> None:
    """Subtract one image's ``s_j f_j`` from its bin in every group but its ``own`` (the caller clears that)."""
    where = plan.bins(_oriented(x, plan)[None])[0]
    for g in range(plan.groups):
        k = int(where[g])
        if k > 0 and g != own:
            resid[g, k - 1] -= x


@dataclass
class WeightCheck:
    """What a client can see in the adapter weights it receives, before it trains on them.

    ``row_redundancy``: the mean over ``W1``'s rows of the largest ``|cos|`` with another row (imprint rows of
    one group differ by a multiple of the feature mean, so they are nearly parallel); ``w2_rank_share``:
    ``W2``'s stable rank (``|W2|_F^2 / |W2|_2^2``) over its column count; ``active_share``: the mean share of
    units the client's own images fire. ``flagged``: redundancy or rank beyond its limit."""

    row_redundancy: float
    w2_rank_share: float
    active_share: float
    flagged: bool


REDUNDANCY_LIMIT = 0.6
"""Random rows in E dimensions are nearly orthogonal (the largest ``|cos|`` among H of them is a few times
``1 / sqrt(E)``: about 0.25 at E = 128); imprint rows of one group have ``|cos|`` near 1."""
RANK_SHARE_LIMIT = 0.05
"""A random ``W2`` has a stable rank that is a sizeable share of its columns; a rank-one ``W2`` has ``1 / hidden``."""


def check_weights(state: dict[str, torch.Tensor], own_feats: torch.Tensor) -> WeightCheck:
    """The client-side check on received adapter weights ``state``, with the client's own features ``(N, E)``
    (they never leave the client)."""
    w1 = state["adapter.fc1.weight"].double()
    w2 = state["adapter.fc2.weight"].double()
    unit = F.normalize(w1, dim=-1)
    cos = (unit @ unit.t()).abs()
    cos.fill_diagonal_(0.0)
    redundancy = float(cos.max(dim=1).values.mean()) if w1.shape[0] > 1 else 0.0
    top = float(torch.linalg.matrix_norm(w2, ord=2)) ** 2
    share = float(w2.pow(2).sum()) / max(top, 1e-30) / w2.shape[1]
    active = float((own_feats.double().to(w1.device) @ w1.t() > 0).double().mean())
    return WeightCheck(redundancy, share, active, redundancy > REDUNDANCY_LIMIT or share < RANK_SHARE_LIMIT)
