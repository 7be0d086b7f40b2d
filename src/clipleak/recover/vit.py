"""What a Vision Transformer's gradient gives away in closed form (``full-visual`` / ``full`` fine-tuning).

Two read-outs, both without any image search:

* **Patches (APRIL, Lu et al., CVPR 2022).** open_clip's ViT embeds patch ``p`` as ``z_p = W x_p + e_p``
  (``conv1`` without bias, then the learnable positional embedding ``e``). At batch 1 the gradient of
  ``e_p`` is ``dL/dz_p`` and the gradient of ``W`` is ``sum_p dL/dz_p x_p^T``: with ``G`` the patch rows
  of the positional-embedding gradient, ``dL/dW = G^T X``, a linear system with ``width`` equations per
  unknown patch pixel. Least squares gives every normalised patch ``x_p``; undoing the input
  normalisation gives the image. At batch > 1 both gradients are sums over images and the system has
  no unique solution: :func:`closed_form_images` refuses it.
* **The image feature from the visual projection.** ``f_i = pooled_i @ proj``, so
  ``dL/dproj = sum_i pooled_i (x) dL/df_i``: rank one per image. For CLIP's loss
  ``dL/df_i = (1/B) (I - f^ f^T) tau T^T (p_i - e_{y_i}) / |f_i|`` with ``f^ = f/|f|``, ``T`` the class text
  features and ``p_i = softmax(tau T f^_i)``. Each image's term depends only on the direction of
  ``pooled_i`` (the ``1/|f|`` cancels its scale) and its label, so :class:`ProjectionModel` predicts the
  whole gradient from (pooled directions, labels). Batch 1: the top left singular vector is
  ``pooled`` up to sign; trying both signs and every label and keeping the pair that reproduces the
  gradient gives the feature *and* the label (iDLG through the text features). Batch B: the B left
  singular vectors span the pooled tokens; a greedy pursuit over the attacker's public images (projected
  into that span) picks starts and labels, and a Levenberg-Marquardt fit of all B directions to the
  gradient refines them. Directions that coincide are flagged, never returned as separate images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..models import ClipModel
from ..peft import Victim
from ..records import Observation
from .solvers import greedy_pursuit, levenberg_marquardt

FULL_METHODS = ("full-visual", "full")
POSITIONAL = "clip.visual.positional_embedding"
PATCH_WEIGHT = "clip.visual.conv1.weight"
PROJECTION = "clip.visual.proj"
DISTINCT_COSINE = 0.99
"""Two recovered features closer than this (cosine) are one image, not two."""
ROOT_TOL = 1e-3
"""Off-space residual below which a refined (direction, label) counts as one image's exact root."""


def _check_full(obs: Observation, victim: Victim, needs: tuple[str, ...]) -> None:
    if victim.cfg.method not in FULL_METHODS:
        raise ClipleakError(f"this read-out needs a 'full-visual' or 'full' observation, not {victim.cfg.method!r}")
    missing = [n for n in needs if n not in obs.gradients]
    if missing:
        raise ClipleakError(f"the observation has no gradient for {', '.join(missing)} (a ViT target is needed)")


@dataclass
class ClosedFormImages:
    """Images recovered in closed form, the relative residual of the linear system and its rank."""

    images: torch.Tensor
    residual: float
    rank: int
    patches: int


def closed_form_images(obs: Observation, victim: Victim) -> ClosedFormImages:
    """The batch-1 image solved from the positional-embedding and patch-embedding gradients (APRIL).

    ``dL/dW = G^T X`` with ``G`` (patches x width) the patch rows of the positional-embedding gradient and
    ``X`` (patches x C*P*P) the normalised patches: least squares in float64, then the patches are laid
    back on the grid and the input normalisation (``(x - mean) / std``) is undone. Pixels are not
    clamped: an exact recovery needs no box.
    """
    _check_full(obs, victim, (POSITIONAL, PATCH_WEIGHT))
    if obs.batch_size != 1:
        raise ClipleakError(f"the closed form is exact at batch 1 only; this batch has {obs.batch_size} images, "
                            "whose gradients are summed (use the projection read-out or gradient matching)")
    gpos = obs.gradients[POSITIONAL].double()
    gw = obs.gradients[PATCH_WEIGHT].double()  # (width, C, P, P)
    width, c, p, _ = gw.shape
    size = victim.clip_info.image_size
    grid = size // p
    n = grid * grid
    if gpos.shape[0] < n or grid * p != size:
        raise ClipleakError(f"unexpected ViT shapes: {tuple(gpos.shape)} positional gradient, patch {p}, image {size}")
    a = gpos[-n:].t()  # (width, n): the patch tokens' rows (class token first)
    b = gw.reshape(width, -1)
    sol = torch.linalg.lstsq(a, b).solution  # (n, C*P*P)
    resid = float((a @ sol - b).norm() / b.norm().clamp_min(1e-30))
    sv = torch.linalg.svdvals(a)
    rank = int((sv > sv[0] * 1e-10).sum())
    img = sol.view(grid, grid, c, p, p).permute(2, 0, 3, 1, 4).reshape(1, c, size, size)
    mean = torch.tensor(victim.clip_info.mean, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    std = torch.tensor(victim.clip_info.std, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return ClosedFormImages((img * std + mean).float(), resid, rank, n)


class ProjectionModel:
    """The gradient of ``visual.proj`` as a function of the batch's pooled-token directions and labels.

    ``grad(P, y) = sum_i P_i (x) g_i`` with ``g_i = (1/B) (I - f^_i f^_i^T) tau T^T (softmax(tau T f^_i) - e_{y_i})
    / |f_i|`` and ``f_i = P_i @ proj``. Exact for the victim's mean cross-entropy (checked against autograd in
    the tests); float64. Each term is invariant to a positive rescaling of ``P_i``.
    """

    def __init__(self, victim: Victim):
        proj = getattr(victim.clip.visual, "proj", None)
        if not isinstance(proj, torch.Tensor):
            raise ClipleakError("this image tower has no visual projection")
        with torch.no_grad():
            self.text = victim.text_features().detach().double()
            self.scale = float(victim.logit_scale().detach())
        self.proj = proj.detach().double()  # (width, E)
        self.k = self.text.shape[0]

    def feature_gradients(self, pooled: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """``dL/df_i`` ``(B, E)`` of pooled tokens ``(B, width)`` with labels ``(B,)`` in a batch of ``batch``."""
        f = pooled @ self.proj
        norm = f.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        fh = f / norm
        p = F.softmax(self.scale * fh @ self.text.t(), dim=-1)
        d = self.scale * (p - F.one_hot(labels.to(p.device), self.k).to(p.dtype)) @ self.text
        return (d - (d * fh).sum(-1, keepdim=True) * fh) / norm / batch

    def gradient(self, pooled: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """The predicted ``dL/dproj`` ``(width, E)``."""
        return pooled.t() @ self.feature_gradients(pooled, labels, batch)

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Normalised image features of pooled tokens."""
        return F.normalize(pooled @ self.proj, dim=-1)


_POOLED: dict[tuple[str, str, str], torch.Tensor] = {}


@torch.no_grad()
def pooled_tokens(clip: ClipModel, images01: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The image tower's pooled token (the input of ``visual.proj``) of images in [0, 1], memoised by the
    target's weights and the images' digest."""
    h = hashlib.sha256(str(tuple(images01.shape)).encode())
    h.update(images01.contiguous().numpy().tobytes())
    key = (clip.weights_sha256, clip.arch, h.hexdigest())
    if key in _POOLED:
        return _POOLED[key]
    visual: Any = clip.model.visual
    if not all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool")):
        raise ClipleakError("pooled tokens need an open_clip VisionTransformer")
    was = visual.training
    visual.eval()
    device = clip.model.logit_scale.device  # the images go where the model is
    try:
        out = []
        for i in range(0, images01.shape[0], batch_size):
            x = visual._embeds(clip.normalize(images01[i:i + batch_size].contiguous().to(device)))
            pooled, _ = visual._pool(visual.transformer(x))
            out.append(pooled.double())
    finally:
        visual.train(was)
    if len(_POOLED) >= 8:
        _POOLED.pop(next(iter(_POOLED)))
    _POOLED[key] = torch.cat(out)
    return _POOLED[key]


@dataclass
class ProjectionFeatures:
    """Normalised features ``(B, E)`` and labels read off the visual-projection gradient.

    ``separated``: how many are distinct single images' features; ``residual``: relative misfit of the
    gradient model (about 1e-7 when exact); ``rank``: the numerical rank of the projection gradient.
    """

    features: torch.Tensor
    labels: torch.Tensor
    separated: int
    residual: float
    rank: int
    notes: list[str] = field(default_factory=list)


def projection_features(
    obs: Observation, victim: Victim, *, labels: torch.Tensor | None = None,
    public_images: torch.Tensor | None = None, public_labels: torch.Tensor | None = None, iterations: int = 100,
    attempts: int = 25,
) -> ProjectionFeatures:
    """Image features and labels from the rank-one-per-image gradient of ``visual.proj``.

    Batch 1: exact (SVD, then the sign and label that reproduce the gradient). Batch B: needs the
    attacker's public images. Their pooled tokens, projected into the span of the gradient's B left
    singular vectors, start a per-image root search (:func:`projection_roots`): a (direction, label) whose
    ``dL/df`` lies in the gradient's right singular space is one image (up to ``attempts * B`` starts, closest
    first). Slots left over are filled by a greedy pursuit over the public starts, then all B directions are
    fitted jointly to the gradient (Levenberg-Marquardt, ``iterations`` steps); if that fit stays off, each
    slot's label is re-chosen (:func:`relabel_slots`). Shared ``labels`` restrict the choice.
    """
    _check_full(obs, victim, (PROJECTION,))
    model = ProjectionModel(victim)
    g = obs.gradients[PROJECTION].double()
    b = obs.batch_size
    if labels is not None and labels.numel() != b:
        raise ClipleakError(f"{labels.numel()} shared labels for a batch of {b}")
    u, s, _ = torch.linalg.svd(g, full_matrices=False)
    rank = int((s > s[0] * 1e-5).sum())
    notes: list[str] = []
    if b == 1:
        return _single_projection(model, g, u, rank, labels)
    if public_images is None or public_labels is None:
        raise ClipleakError("separating a batch's features needs the attacker's public images (starts)")
    if rank < b:
        notes.append(f"the projection gradient has rank {rank} < batch {b}: some images are not separable")
    basis = u[:, :b]  # (width, B): spans the batch's pooled tokens
    target = basis.t() @ g  # (B, E): the gradient in that basis, lossless when the rank is B
    cand = pooled_tokens(victim.clip_info, public_images) @ basis  # (N, B) public starts in the span
    cand = F.normalize(cand, dim=-1)
    pl = public_labels.long()
    span = ProjectionSpan(model, basis, torch.linalg.svd(g, full_matrices=False)[2][:b].t())
    roots = projection_roots(span, cand, labels, attempts * b)
    starts, labs_l = _pursue_slots(span, target, cand, pl, roots, labels)
    if len(roots) < b:
        notes.append(f"{len(roots)} of {b} images found as exact roots; the rest started from public images")
    labs = torch.tensor(labs_l)
    tnorm = target.norm().clamp_min(1e-30)
    a, cost = fit_directions(span, target, tnorm, torch.stack(starts), labs, iterations)
    if labels is None and cost > 1e-4:  # re-choose each slot's label with the fitted directions
        a, cost, labs = relabel_slots(span, target, tnorm, a, cost, labs, iterations)
    feats = model.features(a @ basis.t()).float()
    separated = _count_distinct(feats)
    if separated < b:
        notes.append(f"{b - separated} of the {b} recovered features repeat another one: not separate images")
    if cost > 1e-3:
        notes.append(f"the projection fit left a relative residual of {cost:.2g}: features are approximate")
    return ProjectionFeatures(feats, labs, separated, cost, rank, notes)


def _single_projection(model: ProjectionModel, g: torch.Tensor, u: torch.Tensor, rank: int,
                       labels: torch.Tensor | None) -> ProjectionFeatures:
    """Batch 1: the top left singular vector is the pooled token up to sign; the sign and label (or the shared
    one) that reproduce the gradient best give the feature and the label."""
    gnorm = g.norm().clamp_min(1e-30)
    allowed = range(model.k) if labels is None else [int(labels[0])]
    best: tuple[float, torch.Tensor, int] | None = None
    for sign in (1.0, -1.0):
        pooled = sign * u[:, :1].t()
        for y in allowed:
            r = float((model.gradient(pooled, torch.tensor([y]), 1) - g).norm() / gnorm)
            if best is None or r < best[0]:
                best = (r, pooled, y)
    assert best is not None
    r, pooled, y = best
    return ProjectionFeatures(model.features(pooled).float(), torch.tensor([y]), 1, r, rank, [])


@dataclass
class ProjectionSpan:
    """A batch's pooled tokens in coordinates of the projection gradient's ``B`` left singular vectors
    (``basis``, ``(width, B)``), and its right singular space (``right``, ``(E, B)``), which holds every
    image's ``dL/df``."""

    model: ProjectionModel
    basis: torch.Tensor
    right: torch.Tensor

    def off_span(self, a: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The part of each direction's normalised batch-1 ``dL/df`` outside the right singular space (``a``:
        ``(N, B)`` coordinates, ``ys``: ``(N,)`` labels)."""
        d = F.normalize(self.model.feature_gradients(F.normalize(a, dim=-1) @ self.basis.t(), ys, 1), dim=-1)
        return d - (d @ self.right) @ self.right.t()

    def root_residual(self, label: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:meth:`off_span` of one direction ``v`` ``(B,)`` with ``label`` ``(1,)``, flat."""
        return self.off_span(v[None], label).reshape(-1)

    def batch_residual(self, target: torch.Tensor, tnorm: torch.Tensor, ys: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        """The relative misfit of ``B`` directions (flat ``v``) with labels ``ys`` to the gradient ``target``
        (``(B, E)`` in this basis), flat."""
        b = ys.numel()
        a = v.view(b, b)
        return ((a.t() @ self.model.feature_gradients(a @ self.basis.t(), ys, b) - target) / tnorm).reshape(-1)


def projection_roots(span: ProjectionSpan, cand: torch.Tensor, labels: torch.Tensor | None,
                     attempts: int) -> list[tuple[torch.Tensor, int]]:
    """Per-image roots: the true (direction, label) of every image puts its ``dL/df`` in the right singular
    space of the gradient. The public starts ``cand`` that come closest (each with its best label among
    ``labels``, default all) are refined (Levenberg-Marquardt, up to ``attempts`` of them) until ``B`` distinct
    roots are found."""
    b = span.basis.shape[1]
    ys_all = range(span.model.k) if labels is None else sorted({int(y) for y in labels})
    scores = torch.stack([span.off_span(cand, torch.full((cand.shape[0],), y)).norm(dim=-1) for y in ys_all], 1)
    best_score, best_y = scores.min(1)
    order = best_score.argsort()
    roots: list[tuple[torch.Tensor, int]] = []
    for j in order[:attempts].tolist():
        if len(roots) == b:
            break
        y = ys_all[int(best_y[j])]
        x, c = levenberg_marquardt(partial(span.root_residual, torch.tensor([y])), cand[j], 30)
        x = F.normalize(x, dim=0)
        if c < ROOT_TOL and all(abs(float(x @ r)) < DISTINCT_COSINE for r, _ in roots):
            roots.append((x, y))
    return roots


def _pursue_slots(span: ProjectionSpan, target: torch.Tensor, cand: torch.Tensor, pl: torch.Tensor,
                  roots: list[tuple[torch.Tensor, int]], labels: torch.Tensor | None,
                  ) -> tuple[list[torch.Tensor], list[int]]:
    """The slots the roots did not fill, by a greedy pursuit over the public starts ``cand`` (labels ``pl``;
    shared ``labels`` fix each slot's): the starts and labels of all ``B`` slots, roots first."""
    model, basis, b = span.model, span.basis, span.basis.shape[1]
    contrib = cand[:, :, None] * model.feature_gradients(cand @ basis.t(), pl, b)[:, None, :]
    total = torch.zeros_like(target)
    for a0, y in roots:
        total = total + a0[:, None] * model.feature_gradients((a0 @ basis.t())[None], torch.tensor([y]), b)
    chosen = greedy_pursuit(target.reshape(-1), contrib.flatten(1), b - len(roots), start=total.reshape(-1),
                            cand_labels=pl, slot_labels=None if labels is None else labels[len(roots):],
                            empty="no public image carries the shared label: cannot start the projection fit")
    return [r for r, _ in roots] + [cand[j] for j in chosen], [y for _, y in roots] + [int(pl[j]) for j in chosen]


def fit_directions(span: ProjectionSpan, target: torch.Tensor, tnorm: torch.Tensor, a0: torch.Tensor,
                   ys: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """``n`` Levenberg-Marquardt steps of the ``B`` directions ``a0`` ``(B, B)`` with labels ``ys`` against the
    gradient: the directions and the relative residual."""
    b = ys.numel()
    x, cost = levenberg_marquardt(partial(span.batch_residual, target, tnorm, ys), a0.reshape(-1), n)
    return x.view(b, b), cost


def relabel_slots(span: ProjectionSpan, target: torch.Tensor, tnorm: torch.Tensor, a: torch.Tensor, cost: float,
                  labs: torch.Tensor, iterations: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Each slot's label re-chosen with the fitted directions: a label whose 10-step fit halves the residual
    is fitted fully and kept if it lowers it. Returns the directions, the residual and the labels."""
    for i in range(labs.numel()):
        for y in range(span.model.k):
            if y == int(labs[i]):
                continue
            trial = labs.clone()
            trial[i] = y
            a2, c2 = fit_directions(span, target, tnorm, a, trial, 10)
            if c2 < cost * 0.5:
                a2, c2 = fit_directions(span, target, tnorm, a2, trial, iterations)
                if c2 < cost:
                    a, cost, labs = a2, c2, trial
    return a, cost, labs


def _count_distinct(feats: torch.Tensor) -> int:
    kept: list[torch.Tensor] = []
    for f in feats:
        if all(float(f @ k) < DISTINCT_COSINE for k in kept):
            kept.append(f)
    return len(kept)


def labels_from_features(obs: Observation, victim: Victim, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels read off the projection gradient when the features are known (iDLG through the text features).

    Image ``i``'s term contributes ``dL/df_i`` to the right singular space of ``dL/dproj``; its direction
    ``(I - f^ f^T) T^T (softmax(tau T f^) - e_y)`` depends only on the feature and the label. Each image
    gets the label whose direction lies closest to that B-dimensional space (independently per image).
    Returns the labels and each image's off-space residual (0 for the true label when exact).
    """
    _check_full(obs, victim, (PROJECTION,))
    model = ProjectionModel(victim)
    g = obs.gradients[PROJECTION].double()
    b = obs.batch_size
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    v = vh[:b].t()  # (E, B)
    fh = F.normalize(features.double(), dim=-1)
    out = torch.zeros(b, dtype=torch.long)
    res = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        ys = torch.arange(model.k)
        d = F.normalize(model.feature_gradients((fh[i:i + 1] @ torch.linalg.pinv(model.proj)).expand(model.k, -1),
                                                ys, 1), dim=-1)  # (K, E)
        off = (d - (d @ v) @ v.t()).norm(dim=-1)
        out[i] = int(off.argmin())
        res[i] = off.min()
    return out, res
