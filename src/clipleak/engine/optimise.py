"""The one optimisation engine every reconstruction attack runs on.

An attack is a set of weighted objective *terms* over candidate images (and soft labels when the
labels are unknown) plus an image *parametrisation*:

* :class:`PixelImages` -- free pixels, boxed to [0, 1] (grayscale data: one channel, repeated).
* generator latents (a learned prior) plug in through the same :class:`Parametrization` protocol.

The engine runs several seeded restarts of Adam (optionally on signed gradients, as in Inverting
Gradients) or L-BFGS (one L-BFGS iteration, one objective evaluation, per engine step; DLG), with step or
cosine learning-rate decay and per-term weight schedules, and keeps the
restart whose *selection* term (by default the gradient-matching term) ends lowest. Completed
restarts can be checkpointed and resumed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import ClipleakError
from ..models import math_attention
from ..records import ProgressEvent, ProgressFn, load_checkpoint, write_checkpoint


class Parametrization(Protocol):
    """How candidate images are represented while they are optimised."""

    def init(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Fresh leaf tensors (requires_grad) for one restart."""
        ...

    def render(self) -> torch.Tensor:
        """Current images ``(B, 3, H, W)`` in [0, 1] (differentiable in the leaf tensors)."""
        ...

    def project(self) -> None:
        """Apply constraints in place after each step (e.g. the [0, 1] box)."""
        ...

    def describe(self) -> dict[str, Any]:
        ...


class PixelImages:
    """Free pixels in [0, 1]; one channel repeated three times when the data are grayscale."""

    def __init__(self, size: int, grayscale: bool = False, init: str = "randn", start: torch.Tensor | None = None,
                 start_noise: float = 0.0, device: str | torch.device | None = None):
        if init not in ("randn", "rand", "gray"):
            raise ClipleakError(f"unknown pixel init {init!r} (randn, rand, gray)")
        if start_noise < 0:
            raise ClipleakError(f"start_noise must be >= 0, got {start_noise}")
        self.size = size
        self.start_noise = start_noise  # restarts after the first start from start + N(0, start_noise^2)
        self.channels = 1 if grayscale else 3
        self.init_kind = init if start is None else "given images"
        self.start = None if start is None else start.detach().float().cpu().clone()
        # where the pixels live (the victim's device); seeded draws happen on the CPU first, so a restart
        # starts from the same images on every device
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.x: torch.Tensor | None = None

    def init(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        shape = (batch, self.channels, self.size, self.size)
        if self.start is not None:
            x = self.start[:, :1] if self.channels == 1 else self.start
            x = x.clone()
            # restart r's generator is seeded seed * 1000 + r (optimise): restart 0 starts exactly at
            # ``start``, later ones (also when resumed from a checkpoint) at a seeded perturbation of it
            if generator.initial_seed() % 1000 > 0 and self.start_noise > 0:
                x = x + self.start_noise * torch.randn(x.shape, generator=generator)
            x = x.clamp(0, 1)
        elif self.init_kind == "randn":
            x = (0.5 + 0.25 * torch.randn(shape, generator=generator)).clamp(0, 1)
        elif self.init_kind == "rand":
            x = torch.rand(shape, generator=generator)
        else:
            x = torch.full(shape, 0.5)
        self.x = x.to(self.device).requires_grad_(True)
        return [self.x]

    def render(self) -> torch.Tensor:
        assert self.x is not None
        return self.x.expand(-1, 3, -1, -1) if self.channels == 1 else self.x

    def project(self) -> None:
        assert self.x is not None
        with torch.no_grad():
            self.x.clamp_(0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "pixels", "size": self.size, "channels": self.channels, "init": self.init_kind}
        if self.start is not None and self.start_noise > 0:
            d["start_noise"] = self.start_noise
        return d


@dataclass
class State:
    """What objective terms see at each step."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    labels: torch.Tensor  # (B,) class indices, or (B, K) soft labels when inferred
    iteration: int
    iterations: int


TermFn = Callable[[State], torch.Tensor]
Schedule = Callable[[int, int], float]


def constant(_: int, __: int) -> float:
    return 1.0


def switch_at(fraction: float, before: float, after: float) -> Schedule:
    """A weight multiplier that switches from ``before`` to ``after`` at ``fraction`` of the run."""

    def schedule(it: int, total: int) -> float:
        return before if it < fraction * total else after

    return schedule


@dataclass
class Term:
    name: str
    fn: TermFn
    weight: float = 1.0
    schedule: Schedule = constant


@dataclass
class EngineConfig:
    iterations: int = 300
    restarts: int = 2
    lr: float = 0.1
    signed: bool = True
    decay: str = "step"  # step | cosine | none
    seed: int = 0
    labels: str = "known"  # known | infer (soft labels optimised jointly, DLG style)
    log_every: int = 1
    optimizer: str = "adam"  # adam | lbfgs (history 100, no line search: one evaluation per step)
    combine: str = "best"  # best: the restart with the lowest selection term | mean: the restarts' mean image

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ClipleakError("iterations and restarts must be at least 1")
        if self.decay not in ("step", "cosine", "none"):
            raise ClipleakError(f"unknown decay {self.decay!r}")
        if self.labels not in ("known", "infer"):
            raise ClipleakError(f"labels must be 'known' or 'infer', not {self.labels!r}")
        if self.optimizer not in ("adam", "lbfgs"):
            raise ClipleakError(f"unknown optimizer {self.optimizer!r} (adam, lbfgs)")
        if self.optimizer == "lbfgs" and self.signed:
            raise ClipleakError("L-BFGS needs the true gradient: signed=False")
        if self.combine not in ("best", "mean"):
            raise ClipleakError(f"combine must be best or mean, not {self.combine!r}")


@dataclass
class RunResult:
    images: torch.Tensor
    labels: torch.Tensor
    history: dict[str, list[float]]
    restart_losses: list[float]
    best_restart: int
    seconds: float
    seconds_per_iteration: float
    extra: dict[str, Any] = field(default_factory=dict)


def _lr_factor(decay: str, it: int, total: int) -> float:
    if decay == "step":  # Inverting Gradients: x0.1 at 3/8, 5/8, 7/8 of the run
        return 0.1 ** sum(it >= m * total for m in (3 / 8, 5 / 8, 7 / 8))
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * it / total))
    return 1.0


def optimise(
    param: Parametrization,
    terms: list[Term],
    cfg: EngineConfig,
    *,
    batch: int,
    num_classes: int,
    known_labels: torch.Tensor | None = None,
    selection: str | None = None,
    progress: ProgressFn | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_tag: str = "",
    task: str = "attack",
    device: str | torch.device | None = None,
) -> RunResult:
    """Minimise ``sum_t weight_t * schedule_t(it) * term_t(state)`` over the parametrisation.

    Args:
        known_labels: the labels when ``cfg.labels == "known"``.
        selection: name of the term that picks the best restart (default: the first term).
        task: the name progress events carry.
        checkpoint: a checkpoint folder at this path stores finished restarts; an interrupted run with
            the same path resumes after the last finished restart. ``checkpoint_tag`` identifies the run
            (attack settings, observation): a checkpoint with another tag or engine config is ignored and
            overwritten, never mixed in.
        device: where the restarts' tensors live (the victim's; default the CPU); checkpoints hold CPU
            tensors and are loaded back onto it.
    """
    selection = _check_run(terms, cfg, selection, known_labels)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    done = _load_checkpoint(checkpoint, cfg, checkpoint_tag, dev)[: cfg.restarts] if checkpoint else []
    results: list[dict[str, Any]] = list(done)
    run = _Restarts(param, terms, cfg, selection, known_labels, num_classes, batch, progress, task)
    t0 = time.perf_counter()
    for r in range(len(done), cfg.restarts):
        results.append(run.restart(r))
        if checkpoint:
            _save_checkpoint(checkpoint, results, cfg, checkpoint_tag)
    return _best_of(results, cfg, param, selection, time.perf_counter() - t0, run.n_iters)


def _check_run(terms: list[Term], cfg: EngineConfig, selection: str | None,
               known_labels: torch.Tensor | None) -> str:
    """The selection term's name, once the terms and labels are known to fit the config."""
    if not terms:
        raise ClipleakError("an attack needs at least one objective term")
    names = [t.name for t in terms]
    selection = selection or names[0]
    if selection not in names:
        raise ClipleakError(f"selection term {selection!r} is not among {names}")
    if cfg.labels == "known" and known_labels is None:
        raise ClipleakError("labels are unknown: use label inference (labels='infer')")
    return selection


@dataclass
class _Restarts:
    """One seeded restart after another: restart ``r`` starts from the generator seeded ``seed * 1000 + r``,
    so a resumed run repeats exactly the restarts it had not finished."""

    param: Parametrization
    terms: list[Term]
    cfg: EngineConfig
    selection: str
    known_labels: torch.Tensor | None
    num_classes: int
    batch: int
    progress: ProgressFn | None
    task: str
    n_iters: int = 0

    def restart(self, r: int) -> dict[str, Any]:
        """Run restart ``r``: its images, hard labels, loss history and final selection loss."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1000 + r)
        leaves = self.param.init(self.batch, g)
        label_logits = None
        if cfg.labels == "infer":
            label_logits = (0.01 * torch.randn(self.batch, self.num_classes, generator=g)).to(leaves[0].device)
            label_logits.requires_grad_(True)
            leaves = [*leaves, label_logits]
        opt: torch.optim.Optimizer = (torch.optim.LBFGS(leaves, lr=cfg.lr, max_iter=1, history_size=100)
                                      if cfg.optimizer == "lbfgs" else torch.optim.Adam(leaves, lr=cfg.lr))
        hist: dict[str, list[float]] = {n: [] for n in [*(t.name for t in self.terms), "total"]}
        for it in range(cfg.iterations):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg.decay, it, cfg.iterations)
            values: dict[str, float] = {}

            def closure(it: int = it, values: dict[str, float] = values, leaves: list[torch.Tensor] = leaves,
                        label_logits: torch.Tensor | None = label_logits) -> torch.Tensor:
                return self.objective(it, values, leaves, label_logits)

            if isinstance(opt, torch.optim.LBFGS):
                total = opt.step(closure)
            else:
                opt.zero_grad(set_to_none=True)
                total = closure()
                opt.step()
            self.param.project()
            values["total"] = float(total.detach())
            if it % cfg.log_every == 0 or it == cfg.iterations - 1:
                for k, val in values.items():
                    hist[k].append(val)
            if self.progress is not None:
                self.progress(ProgressEvent(self.task, r * cfg.iterations + it + 1, cfg.restarts * cfg.iterations,
                                            values={**values, "restart": float(r + 1)}))
            self.n_iters += 1
        return {**self.finish(label_logits), "history": hist}

    def objective(self, it: int, values: dict[str, float], leaves: list[torch.Tensor],
                  label_logits: torch.Tensor | None) -> torch.Tensor:
        """One evaluation of the weighted objective at iteration ``it``; records each term's value in
        ``values`` and sets the leaves' gradients (signed when ``cfg.signed``)."""
        cfg = self.cfg
        images = self.param.render()
        labels = self.known_labels if label_logits is None else F.softmax(label_logits, dim=-1)
        assert labels is not None
        state = State(images=images, labels=labels, iteration=it, iterations=cfg.iterations)
        total = images.new_zeros(())
        with math_attention():
            for term in self.terms:
                w = term.weight * term.schedule(it, cfg.iterations)
                if w == 0.0 and term.name != self.selection:
                    continue
                v = term.fn(state)
                values[term.name] = float(v.detach())
                total = total + w * v
            # only the candidate's leaves get gradients (not the victim's parameters)
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        for leaf, grad in zip(leaves, grads, strict=True):
            if grad is not None and cfg.optimizer == "lbfgs":
                # L-BFGS flattens with .view(-1); a conv backward can hand back channels-last
                # image gradients (RGB, batch > 1)
                grad = grad.contiguous()
            leaf.grad = None if grad is None else (grad.sign() if cfg.signed else grad)
        return total.detach()

    def finish(self, label_logits: torch.Tensor | None) -> dict[str, Any]:
        """The restart's final images and hard labels, and its selection term on them (soft labels)."""
        cfg = self.cfg
        with torch.no_grad(), math_attention():
            images = self.param.render().detach().clone()
            hard = self.known_labels if label_logits is None else label_logits.argmax(-1)
            soft = self.known_labels if label_logits is None else F.softmax(label_logits, -1)
            assert hard is not None and soft is not None  # known_labels is checked for labels="known"
            final_state = State(images=images, labels=soft, iteration=cfg.iterations, iterations=cfg.iterations)
        sel_term = next(t for t in self.terms if t.name == self.selection)
        with math_attention():
            final_sel = float(sel_term.fn(final_state).detach())
        return {"images": images, "labels": hard.clone(), "selection_loss": final_sel}


def _best_of(results: list[dict[str, Any]], cfg: EngineConfig, param: Parametrization, selection: str,
             seconds: float, n_iters: int) -> RunResult:
    """The restart with the lowest selection loss (NaN last); with ``combine="mean"`` its images are the
    restarts' pixel-wise mean (GradViT-style consistency), its labels and history the best restart's."""
    losses = [float(r["selection_loss"]) for r in results]
    best = int(min(range(len(losses)), key=lambda i: (math.isnan(losses[i]), losses[i])))
    res = results[best]
    images = res["images"]
    if cfg.combine == "mean":
        images = torch.stack([r["images"] for r in results]).mean(0)
    return RunResult(
        images=images,
        labels=res["labels"],
        history=res["history"],
        restart_losses=losses,
        best_restart=best,
        seconds=seconds,
        seconds_per_iteration=seconds / max(1, n_iters),
        extra={"engine": asdict(cfg), "parametrization": param.describe(), "selection": selection},
    )


RESTARTS = "restarts.safetensors"


def _ckpt_key(cfg: EngineConfig, tag: str) -> dict[str, Any]:
    return {"config": {k: v for k, v in asdict(cfg).items() if k != "restarts"}, "tag": tag}


def _save_checkpoint(path: str | Path, results: list[dict[str, Any]], cfg: EngineConfig, tag: str) -> None:
    """The finished restarts as a checkpoint folder ``path/step-NNNNNNN/`` (NNNNNNN: how many are done)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        tensors[f"{i}/images"] = r["images"].cpu().contiguous()
        tensors[f"{i}/labels"] = r["labels"].cpu().contiguous()
        meta.append({"history": r["history"], "selection_loss": r["selection_loss"]})

    write_checkpoint(path, len(results), {**_ckpt_key(cfg, tag), "restarts": meta},
                     lambda d: save_file(tensors, str(d / RESTARTS)))


def _load_checkpoint(path: str | Path, cfg: EngineConfig, tag: str,
                     device: torch.device | None = None) -> list[dict[str, Any]]:
    """The finished restarts of a run with this config and tag; none for another run's checkpoint."""
    found = load_checkpoint(path, lambda d: load_file(str(d / RESTARTS)),
                            hint="delete it or rerun with --no-resume to start over")
    if found is None:
        return []
    saved, t = found
    key = _ckpt_key(cfg, tag)
    if saved.get("config") != key["config"] or saved.get("tag") != key["tag"]:
        return []
    try:
        return [{"images": t[f"{i}/images"].to(device or "cpu"), "labels": t[f"{i}/labels"].to(device or "cpu"),
                 "history": dict(m["history"]),
                 "selection_loss": float(m["selection_loss"])} for i, m in enumerate(saved["restarts"])]
    except (KeyError, TypeError, ValueError) as e:  # valid JSON and tensors, but not this writer's layout
        raise ClipleakError(f"checkpoint {path} is damaged (no {e} in it); delete it or rerun with --no-resume to "
                            "start over") from e
