"""CoOp: image features and labels fitted to a client's multi-step update (E local SGD steps), by replaying
the client's trajectory exactly from candidate features (:class:`CoopTrajectoryModel`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from ..models import math_attention
from ..peft import Victim
from ..records import Observation
from .coop import CoopFit
from .solvers import whitening

POLISH = 150
"""L-BFGS steps of the float64 finish of a single-image update fit."""
UPDATE_CONVERGED = 0.05
"""Relative residual below which a fit of an E-step update counts as converged: the float32 simulation of a
chaotic trajectory leaves a right-label fit a few percent, a wrong label more."""


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


@dataclass
class _UpdateFit:
    """The fit of a multi-step update: the observed update ``target`` (its norm ``tn``), the whitened
    public-feature coordinates ``f = mean + u S`` it runs in (float32; cast to a model's dtype) and L-BFGS
    steps per fit."""

    target: torch.Tensor
    tn: torch.Tensor
    mean: torch.Tensor
    root: torch.Tensor
    inv_root: torch.Tensor
    iterations: int

    def residual(self, m: CoopTrajectoryModel, feats: torch.Tensor, labs: torch.Tensor) -> torch.Tensor:
        """Relative residuals ``(N,)`` of ``N`` candidates (:meth:`CoopTrajectoryModel.simulate`)."""
        with math_attention():
            return (m.simulate(feats, labs).to(self.target.dtype) - self.target[None]).norm(dim=1) / self.tn

    def fit(self, m: CoopTrajectoryModel, f0: torch.Tensor, labs: torch.Tensor,
            its: int | None = None) -> tuple[torch.Tensor, float]:
        """L-BFGS through ``m``'s replayed trajectory from features ``f0`` ``(d, E)`` with labels ``(d,)``
        (``its`` steps, default :attr:`iterations`), in ``m``'s dtype: the features and the residual."""
        dt = m.ctx0.dtype
        mu_, sq_, inv_, tgt = self.mean.to(dt), self.root.to(dt), self.inv_root.to(dt), self.target.to(dt)
        tn = self.tn
        u = ((F.normalize(f0.to(dt), dim=-1) - mu_) @ inv_).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([u], lr=1, max_iter=self.iterations if its is None else its, tolerance_grad=1e-12,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            with math_attention():
                loss = ((m.simulate((mu_ + u @ sq_)[None], labs[None], graph=True)[0] - tgt).norm() / tn) ** 2
            loss.backward()
            return loss

        opt.step(closure)
        f = F.normalize((mu_ + u.detach() @ sq_), dim=-1)
        return f.float(), float(self.residual(m, f[None], labs[None])[0])


def _screen_labels(fit: _UpdateFit, model: CoopTrajectoryModel, pf: torch.Tensor, pl: torch.Tensor,
                   allowed: list[int], per_class: int, starts: int, seed: int) -> list[tuple[float, int, torch.Tensor]]:
    """Each allowed label screened with ``per_class`` seeded public features of that label (replayed in one
    batch, forward only): ``(best residual, label, its `starts` best public features)``, best first."""
    g = torch.Generator().manual_seed(int(seed))
    screened: list[tuple[float, int, torch.Tensor]] = []
    for y in allowed:
        idx = torch.nonzero(pl == y).flatten()
        if not idx.numel():
            continue
        idx = idx[torch.randperm(idx.numel(), generator=g)[:per_class]]
        res = fit.residual(model, pf[idx][:, None], torch.full((idx.numel(), 1), y))
        top = torch.argsort(res)[:starts]
        screened.append((float(res[top[0]]), y, pf[idx[top]]))
    if not screened:
        raise ClipleakError("no public image carries the allowed labels: cannot start the CoOp update fit")
    screened.sort(key=lambda t: t[0])
    return screened


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
    ``starts`` best public starts (one start per label can leave a right-label fit stalled), until a fit
    converges (:data:`UPDATE_CONVERGED`); the lowest residual wins, and goes on for ``polish`` steps in
    float64 (default :data:`POLISH`).
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
    model = CoopTrajectoryModel(victim, steps, bsz, n, lr)
    d = model.distinct
    w = whitening(public_feats)
    fit = _UpdateFit(target, target.norm().clamp_min(1e-30), w.mean.float(), w.root.float(), w.inv_root.float(),
                     iterations)
    pf, pl = F.normalize(public_feats.float(), dim=-1), public_labels.long()
    determined = target.numel() / float(d * pf.shape[1])
    if d > 1:
        if start is None or start.features.shape[0] != d:
            raise ClipleakError(f"the exact fit of an update over {d} images needs a start of {d} features")
        f0, labs0 = start.features, start.labels.long()
        r0 = float(fit.residual(model, f0[None], labs0[None])[0])
        f, r = fit.fit(model, f0, labs0)
        best = (f, r) if r < r0 else (F.normalize(f0.float(), dim=-1), r0)
        return CoopFit(best[0], labs0, best[1], None, determined)
    allowed = [int(labels[0])] if labels is not None else sorted({int(v) for v in pl.tolist()})
    screened = _screen_labels(fit, model, pf, pl, allowed, per_class, starts, seed)
    best_fit: tuple[torch.Tensor, float, int] | None = None
    for _, y, f0s in screened[:max_labels]:
        for f0 in f0s:
            f, r = fit.fit(model, f0[None], torch.tensor([y]))
            if best_fit is None or r < best_fit[1]:
                best_fit = (f, r, y)
            if r < UPDATE_CONVERGED:
                break
        if best_fit is not None and best_fit[1] < UPDATE_CONVERGED:
            break
    assert best_fit is not None
    polish = POLISH if polish is None else polish
    if polish > 0:  # the chosen fit goes on in float64: float32 L-BFGS stalls short of the precision the
        # decoder needs (a feature slightly off decodes to another digit of the class)
        m64 = CoopTrajectoryModel(copy.deepcopy(victim).double(), steps, bsz, n, lr)
        f, r = fit.fit(m64, best_fit[0], torch.tensor([best_fit[2]]), polish)
        if r < best_fit[1]:
            best_fit = (f, r, best_fit[2])
    return CoopFit(best_fit[0], torch.tensor([best_fit[2]]), best_fit[1], None, determined)
