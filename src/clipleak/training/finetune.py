"""Fine-tuning a client's PEFT module (CoOp or CLIP-Adapter) on its images, with or without DP-SGD, and
Dp-CLIP per-batch contrastive fine-tuning of a target: both on the one training loop.

The client's images arrive as an :class:`~clipleak.data.ImageSet` (the API loads them through
``clipleak.client``; this floor never reaches the private split itself). Held-out accuracy is measured
on the images the caller passes (the validation split).

**PEFT fine-tuning** (:func:`finetune`). The image encoder is frozen, so every image is encoded once;
a step runs only the PEFT head. Each step:

* **sampling** -- ``poisson`` (default): every image joins the batch independently with probability
  ``q = batch_size / N`` (the realised batch size varies, and may be 0); this is the sampling the RDP
  accountant's subsampled-Gaussian bound assumes, so the epsilon is a guarantee. ``fixed``: a uniformly
  drawn batch of exactly ``batch_size`` images per step, *accounted as if* Poisson with the same q (the
  common approximation, not a guarantee; the result says so).
* **gradient** -- the sum over the batch of the per-example cross-entropy gradients, divided by the
  *expected* batch size ``q N`` (Opacus's normalisation; for ``fixed`` it is the batch size). With a
  per-example ``dp`` setting each per-example gradient is first clipped to C (flat L2 over the PEFT tensors)
  and N(0, (sigma C)^2) is added to the sum: DP-SGD, sensitivity C, accountant noise multiplier sigma.
  sigma is given or calibrated from a target epsilon for this schedule (q, steps, delta).
  Its site ``text-features`` (CoOp only) clips and noises each example's gradient w.r.t. the K x E class
  text features instead (closed form, no text backward per example) and maps the noisy sum to the
  prompt with one backward pass of the text encoder: the same Gaussian mechanism and accounting, the
  map is post-processing (:func:`clipleak.privacy.coop_text_feature_dp`), at the plain step's cost
  instead of B text backward passes. C then bounds the text-feature gradient.
* **defense** -- ``defense`` (e.g. ``"prune:0.1"``, ``"quantize:8"``, ``"quantize:sign"``, ``"clip:1"``;
  :mod:`clipleak.privacy.defenses`) is applied to each step's gradient as the client would apply it to
  the update it shares: after the DP mechanism when both are set (post-processing, the epsilon is kept),
  before the optimiser.
* **optimiser** -- Adam (default) or SGD with momentum 0.9, cosine learning-rate decay to 0;
  post-processing, so it costs no privacy.

Every random choice of step ``s`` (batch, noise, canaries) is a pure function of ``(seed, s)``, so a
resumed run continues bitwise. Epsilon spent is recorded at every evaluation point and at the end
(:func:`clipleak.privacy.epsilon` on the steps done).

**Canaries** (``canaries=m``, DP only): a simplified white-box one-run audit (Steinke, Nasr, Jagielski
2023). m random unit directions u_j in the PEFT-gradient space; each is *included* with probability 1/2
(seeded). An included canary behaves like one more training example whose clipped gradient is C u_j:
it is Poisson-sampled with the same q every step and its C u_j added to the clipped sum before the
noise. The auditor sees every step's privatised sum (white-box) and scores canary j by the sum over
steps of <update_t, u_j>; :mod:`clipleak.audit.canary` turns scores into an epsilon lower bound. At the
``text-features`` site the privatised sum, and so the canaries, live in the K x E text-feature space.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import __version__
from ..data import ImageSet
from ..errors import ClipleakError
from ..models import build_model
from ..peft import FLAT_PEFT_KEYS, PeftConfig, Victim, build_victim
from ..privacy import (
    PER_EXAMPLE_METHODS,
    SITES,
    Defense,
    DpSetting,
    apply_defense,
    clipped_sum,
    composed_from_dict,
    composed_to_dict,
    epsilon,
    gaussian_noise,
    parse_defense,
    per_example_factors,
    per_example_gradients_from_raw,
    text_feature_gradients_from_raw,
)
from ..records import ProgressEvent, ProgressFn, load_checkpoint, write_checkpoint, write_json_atomic
from ..seeding import derive_seed
from .loop import Budget, LoopState, train_loop
from .pretrain import PretrainConfig, pretrain

SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
DP_MODES: tuple[str, ...] = ("none", "per-example")
CKPT_FORMAT = 1
SAMPLING_NOTES = {
    "poisson": "Poisson sampling: each image joins a step's batch independently with probability q "
               "(the accountant's assumption: the epsilon is a guarantee)",
    "fixed": "fixed-size batches drawn uniformly each step, accounted as Poisson sampling with the same q "
             "(the usual approximation, not a guarantee)",
}


FLAT_DP_KEYS: tuple[str, ...] = ("dp", "dp_site", "clip", "noise_multiplier", "epsilon", "delta", "accountant")
"""The DP fields it spelled flat before it held a :class:`~clipleak.privacy.DpSetting`."""
FLAT_DEFAULTS: dict[str, Any] = {"method": "adapter", "n_ctx": 4, "class_specific": False, "peft_seed": 0,
                                 "dp": "none", "dp_site": "parameters", "clip": 0.1, "noise_multiplier": None,
                                 "epsilon": None, "delta": 1e-5, "accountant": "rdp"}
"""The flat fields' defaults (a flat config without DP still named a C, a delta and an accountant)."""
_NO_DP_KEYS = ("clip", "noise_multiplier", "epsilon", "delta", "accountant")


def finetune_dp(dp: str = "none", *, clip: float = 0.1, noise_multiplier: float | None = None,
                epsilon: float | None = None, delta: float | None = 1e-5, accountant: str = "rdp",
                site: str = "parameters") -> DpSetting | None:
    """The DP setting of PEFT fine-tuning from its options (``dp``: ``none`` or ``per-example``; the CLI's
    ``--dp``, ``--clip``, ...): ``None`` without DP, else a per-example setting awaiting its schedule."""
    if dp not in DP_MODES:
        raise ClipleakError(f"PEFT fine-tuning takes dp 'none' or 'per-example', got {dp!r} "
                            "(per-batch: contrastive fine-tuning)")
    if site not in SITES:
        raise ClipleakError(f"unknown DP site {site!r}; choose one of {', '.join(SITES)}")
    if dp == "none":
        if site != "parameters":
            raise ClipleakError(f"the {site!r} DP site is for CoOp with dp='per-example'")
        if noise_multiplier is not None or epsilon is not None:
            raise ClipleakError("a noise multiplier, an epsilon or canaries need dp='per-example'")
        return None
    if noise_multiplier is None and epsilon is None:
        raise ClipleakError("DP fine-tuning needs a noise multiplier or a target epsilon")
    return DpSetting("per-example", clip=float(clip), noise_multiplier=noise_multiplier, epsilon=epsilon,
                     delta=delta, accountant=accountant, site=site, awaiting_schedule=True)


@dataclass
class FinetuneConfig:
    """How a client fine-tunes its PEFT module: ``peft`` (coop or adapter), ``dp`` (a per-example
    :class:`~clipleak.privacy.DpSetting` with a noise multiplier or a target epsilon, calibrated for this
    schedule; ``None`` without DP; :func:`finetune_dp` builds one from the CLI's options) and the schedule.
    ``batch_size`` is the expected batch size (Poisson) or the batch size (fixed)."""

    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="adapter"))
    dp: DpSetting | None = None
    steps: int = 200
    batch_size: int = 25
    sampling: str = "poisson"
    optimizer: str = "adam"
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 50
    eval_points: int = 5
    canaries: int = 0
    defense: str | None = None

    def __post_init__(self) -> None:
        method = self.peft.method
        if method not in PER_EXAMPLE_METHODS:
            raise ClipleakError(f"fine-tuning trains {' or '.join(PER_EXAMPLE_METHODS)}, not {method!r} "
                                "(contrastive fine-tuning of the whole target: --contrastive)")
        if self.sampling not in SAMPLINGS:
            raise ClipleakError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ClipleakError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.dp is not None:
            if self.dp.mechanism not in DP_MODES:
                raise ClipleakError(f"PEFT fine-tuning takes dp 'none' or 'per-example', got {self.dp.mechanism!r} "
                                    "(per-batch: contrastive fine-tuning)")
            self.dp = self.dp.unscheduled()
        if isinstance(self.steps, bool) or int(self.steps) < 1 or int(self.batch_size) < 1:
            raise ClipleakError("steps and batch size must be positive integers")
        if not float(self.lr) > 0:
            raise ClipleakError(f"learning rate must be positive, got {self.lr!r}")
        site = "parameters" if self.dp is None else self.dp.site
        if site != "parameters" and method != "coop":
            raise ClipleakError(f"the {site!r} DP site is for CoOp with dp='per-example'")
        if self.dp is None and self.canaries:
            raise ClipleakError("a noise multiplier, an epsilon or canaries need dp='per-example'")
        if int(self.canaries) < 0 or int(self.eval_points) < 1 or int(self.checkpoint_every) < 1:
            raise ClipleakError("canaries must be >= 0, eval points and checkpoint interval >= 1")
        self.update_defense()  # an unknown or bad defense is refused here

    def update_defense(self) -> Defense | None:
        """The :class:`~clipleak.privacy.Defense` applied to each step's gradient (``None``: none)."""
        return parse_defense(self.defense)

    def dp_setting(self, n_images: int) -> DpSetting | None:
        """The per-example :class:`~clipleak.privacy.DpSetting` of this schedule over ``n_images`` images,
        resolved (sigma calibrated from epsilon if needed); ``None`` without DP."""
        if self.dp is None:
            return None
        return self.dp.scheduled(sample_rate(self, n_images), int(self.steps)).resolve()

    def to_dict(self) -> dict[str, Any]:
        return composed_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """From :meth:`to_dict`'s form, or the flat form written before the config held a PeftConfig and a
        DpSetting (``method``, ``n_ctx``, ..., ``dp: "none" | "per-example"``, ``clip``, ...)."""
        if _is_flat(d):
            d = _from_flat(d)
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ClipleakError(f"unknown fine-tuning config keys: {', '.join(sorted(unknown))}")
        return cls(**composed_from_dict(d))

    def flat(self) -> dict[str, Any]:
        """The config in the flat form written before it held a PeftConfig and a DpSetting (what
        :meth:`training_key` is built from). Without DP the flat DP fields take their defaults; PEFT and DP
        settings the flat form had no field for are added as ``peft_<name>`` / ``dp_<name>`` where they are
        not the defaults."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("peft", "dp")}
        p = self.peft
        d.update(method=p.method, n_ctx=p.n_ctx, class_specific=p.class_specific, peft_seed=p.init_seed)
        if self.dp is None:
            d.update({k: FLAT_DEFAULTS[k] for k in FLAT_DP_KEYS})
        else:
            s = self.dp
            d.update(dp=s.mechanism, dp_site=s.site, clip=s.clip, noise_multiplier=s.noise_multiplier,
                     epsilon=s.epsilon, delta=s.delta, accountant=s.accountant)
            if s.clipping != "flat":
                d["dp_clipping"] = s.clipping
        default = PeftConfig(method=p.method)
        for f in fields(PeftConfig):
            if f.name not in ("method", "n_ctx", "class_specific", "init_seed") \
                    and getattr(p, f.name) != getattr(default, f.name):
                d[f"peft_{f.name}"] = getattr(p, f.name)
        return d

    def training_key(self) -> dict[str, Any]:
        """What a checkpoint must have been started with to be resumed: the flat form (:meth:`flat`), so a
        checkpoint written before the config was composed resumes."""
        d = self.flat()
        for k in ("checkpoint_every", "eval_points"):
            d.pop(k)
        if d["dp_site"] == "parameters":  # checkpoints written before the site existed stay resumable
            d.pop("dp_site")
        if d["defense"] is None:  # likewise before the defense existed
            d.pop("defense")
        return d


def _is_flat(d: dict[str, Any]) -> bool:
    return "peft" not in d or isinstance(d.get("dp"), str) or any(k in d for k in FLAT_PEFT_KEYS)


def _from_flat(d: dict[str, Any]) -> dict[str, Any]:
    """A flat fine-tuning config (``method``, ``n_ctx``, ``class_specific``, ``peft_seed``, ``dp``,
    ``dp_site``, ``clip``, ``noise_multiplier``, ``epsilon``, ``delta``, ``accountant``) as the composed
    form's dict: ``peft`` a PeftConfig, ``dp`` a DpSetting or None; the other keys pass through."""
    flat = {**FLAT_DEFAULTS, **{k: d[k] for k in (*FLAT_PEFT_KEYS, *FLAT_DP_KEYS) if k in d}}
    rest = {k: v for k, v in d.items() if k not in FLAT_PEFT_KEYS and k not in FLAT_DP_KEYS}
    peft = PeftConfig.from_flat(flat)
    dp = finetune_dp(flat["dp"], clip=flat["clip"], noise_multiplier=flat["noise_multiplier"],
                     epsilon=flat["epsilon"], delta=flat["delta"], accountant=flat["accountant"],
                     site=flat["dp_site"])
    return {"peft": peft, "dp": dp, **rest}


def same_training_key(saved: Any, key: dict[str, Any]) -> bool:
    """Whether a checkpoint's stored key is ``key``: without DP on both sides, the DP fields the flat form
    carried without effect (C, delta, accountant) are not compared."""
    if saved == key:
        return True
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        return False
    a, b = dict(saved["config"]), dict(key["config"])
    if a.get("dp", "none") != "none" or b.get("dp", "none") != "none":
        return False
    for c in (a, b):
        for k in _NO_DP_KEYS:
            c.pop(k, None)
    return {**saved, "config": a} == {**key, "config": b}


def sample_rate(cfg: FinetuneConfig, n_images: int) -> float:
    if cfg.batch_size > n_images:
        raise ClipleakError(f"batch size {cfg.batch_size} is larger than the {n_images} training images")
    return cfg.batch_size / n_images


def encode(victim: Victim, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The frozen image encoder's output for ``images`` (what the PEFT head acts on)."""
    with torch.no_grad():
        return torch.cat([victim.raw_image_features(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def accuracy_from_raw(victim: Victim, raw: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((victim.logits_from_raw(raw).argmax(-1) == labels).float().mean())


class FinetuneRun:
    """The victim, the encoded images, the optimiser and one (DP) step: :func:`finetune`'s state, and what
    a benchmark times step by step (``FinetuneRun(cfg, victim, raw, labels, cfg.dp_setting(n)).step(s, None)``).
    """

    def __init__(self, cfg: FinetuneConfig, victim: Victim, raw: torch.Tensor, labels: torch.Tensor,
                 setting: DpSetting | None):
        self.cfg, self.victim, self.raw, self.setting = cfg, victim, raw, setting
        self.device = raw.device  # the victim's: every tensor of a step lives there
        self.labels = labels.to(self.device)
        self.defense = cfg.update_defense()
        self.n = int(raw.shape[0])
        self.q = sample_rate(cfg, self.n)
        self.expected = self.q * self.n
        self.params = victim.trainable()
        plist = list(self.params.values())
        if cfg.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(plist, lr=cfg.lr)
        else:
            self.opt = torch.optim.SGD(plist, lr=cfg.lr, momentum=0.9)
        self.shapes = {k: p.shape for k, p in self.params.items()}
        self.dim = sum(p.numel() for p in plist)
        self.text_site = setting is not None and setting.site == "text-features"
        if self.text_site:  # the privatised sum lives in text-feature space (K x E); so do the canaries
            with torch.no_grad():
                self.text_shape = victim.text_features().shape
            self.dim = int(self.text_shape.numel())
        self.canary_dirs: torch.Tensor | None = None
        self.canary_in: torch.Tensor | None = None
        self.canary_scores: torch.Tensor | None = None
        if cfg.canaries:
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "canaries"))
            self.canary_in = torch.rand(cfg.canaries, generator=g) < 0.5
            # seeded on the CPU (the same canaries on every device), used where the gradients are
            self.canary_dirs = F.normalize(torch.randn(cfg.canaries, self.dim, generator=g), dim=1).to(self.device)
            self.canary_scores = torch.zeros(cfg.canaries, dtype=torch.float64)

    def lr_at(self, s: int, total: int | None) -> float:
        t = total or self.cfg.steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, t)))) * self.cfg.lr

    def batch(self, s: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "batch", s))
        if self.cfg.sampling == "poisson":
            return torch.nonzero(torch.rand(self.n, generator=g) < self.q).flatten()
        return torch.randperm(self.n, generator=g)[: self.cfg.batch_size]

    def gradient(self, s: int, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """The step's gradient (sum over the batch / expected batch size) and the batch's mean loss."""
        raw, y = self.raw[idx], self.labels[idx]
        if self.setting is None:
            if idx.numel() == 0:
                return {k: torch.zeros(sh, device=self.device) for k, sh in self.shapes.items()}, float("nan")
            loss = F.cross_entropy(self.victim.logits_from_raw(raw), y, reduction="sum")
            grads = torch.autograd.grad(loss, list(self.params.values()))
            return ({k: g.detach() / self.expected for k, g in zip(self.params, grads, strict=True)},
                    float(loss.detach()) / idx.numel())
        s_ = self.setting
        assert s_.noise_multiplier is not None
        text: torch.Tensor | None = None
        if self.text_site:
            text = self.victim.text_features()  # the one text forward, kept for the one backward
            if idx.numel():
                summed = {"text": clipped_sum(text_feature_gradients_from_raw(self.victim, raw, y, text=text),
                                              s_.clip)[0]}
                with torch.no_grad():
                    logits = self.victim.logit_scale() * self.victim.features_from_raw(raw) @ text.detach().t()
                    loss_v = float(F.cross_entropy(logits, y))
            else:
                summed = {"text": torch.zeros(self.text_shape, device=self.device)}
                loss_v = float("nan")
        elif idx.numel():
            per = per_example_gradients_from_raw(self.victim, raw, y)
            f = per_example_factors(per, s_.clip, s_.clipping)
            summed = {k: torch.tensordot(f[k], g, dims=1) for k, g in per.items()}
            with torch.no_grad():
                loss_v = float(F.cross_entropy(self.victim.logits_from_raw(raw), y))
        else:
            summed = {k: torch.zeros(sh, device=self.device) for k, sh in self.shapes.items()}
            loss_v = float("nan")
        if self.canary_dirs is not None:
            assert self.canary_in is not None
            gc = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "canary-sample", s))
            drawn = self.canary_in & (torch.rand(len(self.canary_in), generator=gc) < self.q)
            if bool(drawn.any()):
                add = s_.clip * self.canary_dirs[drawn.to(self.device)].sum(0)
                summed = {k: v + a.view(v.shape) for (k, v), a in
                          zip(summed.items(), torch.split(add, [v.numel() for v in summed.values()]), strict=True)}
        std = s_.noise_multiplier * s_.clip
        if std > 0:
            gn = torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.seed, "noise", s))
            noise = gaussian_noise(summed, std, gn)
            summed = {k: noise[k].add_(v) for k, v in summed.items()}
        if self.canary_dirs is not None:
            assert self.canary_scores is not None
            flat = torch.cat([v.reshape(-1) for v in summed.values()])
            self.canary_scores += (self.canary_dirs @ flat).cpu().double()  # float64 on the CPU (MPS has none)
        if text is not None:  # post-processing: one vector-Jacobian product of the text encoder to the prompt
            grads = torch.autograd.grad(text, list(self.params.values()), grad_outputs=summed["text"] / self.expected)
            return {k: g.detach() for k, g in zip(self.params, grads, strict=True)}, loss_v
        return {k: v / self.expected for k, v in summed.items()}, loss_v

    def step(self, s: int, total: int | None) -> float:
        grads, loss = self.gradient(s, self.batch(s))
        if self.defense is not None:  # what the client would share of this step, after any DP
            grads = apply_defense(grads, self.defense)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(s, total)
        for k, p in self.params.items():
            p.grad = grads[k].clone()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def _save(root: Path, run: FinetuneRun, state: dict[str, Any]) -> None:
    def write(d: Path) -> None:
        save_file({k: p.detach().cpu().contiguous() for k, p in run.params.items()}, str(d / "peft.safetensors"))
        torch.save(run.opt.state_dict(), d / "optimizer.pt")
        if run.canary_scores is not None:
            save_file({"scores": run.canary_scores}, str(d / "canaries.safetensors"))

    write_checkpoint(root, int(state["step"]), state, write)


def _load(root: Path, run: FinetuneRun, key: dict[str, Any]) -> dict[str, Any] | None:
    def read(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor | None]:
        scores = load_file(str(d / "canaries.safetensors"))["scores"] if run.canary_scores is not None else None
        return (load_file(str(d / "peft.safetensors")),
                torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True), scores)

    saved = load_checkpoint(root, read, hint=f"delete {root} or run without --resume to start over")
    if saved is None:
        return None
    state, (peft, opt, scores) = saved
    if state.get("format") != CKPT_FORMAT or not same_training_key(state.get("key"), key):
        raise ClipleakError(f"cannot resume from {root}: it was started with different settings or images; "
                            "use the same ones or start over without --resume")
    run.victim.load_peft_state(peft)
    run.opt.load_state_dict(opt)  # the optimiser casts its state to its parameters' device
    if scores is not None:
        assert run.canary_scores is not None
        run.canary_scores.copy_(scores)
    return state


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def finetune(
    cfg: FinetuneConfig,
    train: ImageSet,
    held_out: ImageSet,
    out_dir: str | Path,
    *,
    weights: str | Path | None = None,
    arch: str = "tiny-32",
    train_description: dict[str, Any] | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
    threads: int | None = None,
    task: str = "finetune",
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Fine-tune ``cfg.peft`` of the target on ``train``; accuracy on ``held_out``; returns the result.

    Writes ``out_dir/peft.safetensors`` (the trained PEFT state) and ``out_dir/finetune.json`` (config,
    schedule, sigma, epsilon spent along the way and at the end, accuracy before / during / after,
    seconds; canary scores and memberships if any). Checkpoints go to ``out_dir/ckpt`` every
    ``cfg.checkpoint_every`` steps; ``resume`` continues from there (same settings and images), and a
    finished run removes them. ``stop_after``: abandon the run after that many steps (tests). ``device``:
    where the model and the steps run (files hold CPU tensors). On the CPU the run is the same as ever; on a
    GPU the DP noise comes from a generator seeded the same way on that device (other numbers).
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        return _finetune(cfg, train, held_out, Path(out_dir), weights, arch, train_description, resume, progress,
                         stop_after, task, torch.device(device))
    finally:
        torch.set_num_threads(old)


def _finetune(cfg: FinetuneConfig, train: ImageSet, held_out: ImageSet, out: Path, weights: str | Path | None,
              arch: str, train_description: dict[str, Any] | None, resume: bool, progress: ProgressFn | None,
              stop_after: int | None, task: str, device: torch.device) -> dict[str, Any]:
    t_start = time.perf_counter()
    if list(train.classnames) != list(held_out.classnames):
        raise ClipleakError("the training and held-out images must have the same classes")
    setting = cfg.dp_setting(len(train))  # calibrate (and refuse bad settings) before any work
    if progress is not None:
        progress(ProgressEvent(task, 0, cfg.steps, phase="load", note="encoding images"))
    clip = build_model(arch, weights, device=device)
    victim = build_victim(clip, list(train.classnames), cfg.peft)
    raw_train, raw_val = encode(victim, train.images), encode(victim, held_out.images)
    run = FinetuneRun(cfg, victim, raw_train, train.labels, setting)
    val_labels = held_out.labels.to(raw_val.device)
    acc0 = accuracy_from_raw(victim, raw_val, val_labels)
    key = {"config": cfg.training_key(), "weights": str(weights), "arch": arch,
           "train": _digest(train.images), "labels": _digest(train.labels)}
    root = out / "ckpt"
    loop_state: LoopState | None = None
    curve: list[dict[str, Any]] = []
    if resume:
        saved = _load(root, run, key)
        if saved is not None:
            loop_state = LoopState.from_dict(saved)
            curve = list(saved.get("eval_curve", []))
    elif root.exists():
        shutil.rmtree(root)
    resumed_from = None if loop_state is None else int(loop_state.step)
    every = max(1, cfg.steps // cfg.eval_points)
    eval_steps = {min(cfg.steps, every * i) for i in range(1, cfg.eval_points + 1)} | {cfg.steps}

    def spent(steps: int) -> float | None:
        if setting is None or not setting.noise_multiplier or setting.delta is None or steps < 1:
            return None
        return epsilon(setting.noise_multiplier, run.q, steps, setting.delta, setting.accountant)

    def step(s: int, total: int | None) -> float:
        loss = run.step(s, total)
        if s + 1 in eval_steps:
            acc, eps = accuracy_from_raw(victim, raw_val, val_labels), spent(s + 1)
            curve.append({"step": s + 1, "accuracy": acc, "epsilon": eps})
            if progress is not None:
                values = {"accuracy": acc, **({"epsilon": eps} if eps is not None else {})}
                progress(ProgressEvent(task, s + 1, cfg.steps, phase="eval", values=values))
        return loss

    def save_ckpt(st: LoopState) -> None:
        _save(root, run, {"format": CKPT_FORMAT, "key": key, "eval_curve": curve, **st.to_dict()})

    st = train_loop(step, Budget(cfg.steps), task=task, state=loop_state, progress=progress, checkpoint=save_ckpt,
                    checkpoint_every=cfg.checkpoint_every, stop_after=stop_after, lr_of=run.lr_at)
    if not st.completed:
        return {"completed": False, "stopped_after": st.step}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: p.detach().cpu().contiguous() for k, p in run.params.items()}, str(out / "peft.safetensors"))
    acc = accuracy_from_raw(victim, raw_val, val_labels)
    losses = [x for x in st.losses if math.isfinite(x)]
    result: dict[str, Any] = {
        "kind": "clipleak PEFT fine-tuning",
        "clipleak_version": __version__,
        "completed": True,
        "config": cfg.to_dict(),
        "arch": arch,
        "weights": str(weights),
        "train": {"n_images": len(train), "source": train.source, **(train_description or {})},
        "held_out": {"n_images": len(held_out), "source": held_out.source, "split": "validation"},
        "schedule": {"steps": cfg.steps, "sample_rate": run.q, "expected_batch_size": run.expected,
                     "sampling": cfg.sampling, "sampling_note": SAMPLING_NOTES[cfg.sampling],
                     "normalisation": "sum of (clipped) per-example gradients (+ noise) / expected batch size"},
        "privacy": None if setting is None else {**setting.record(), "epsilon_spent": spent(st.step),
                                                 "accountant": setting.accountant},
        "defense": None if run.defense is None else run.defense.record(),
        "accuracy_before": acc0,
        "accuracy": acc,
        "eval_curve": curve,
        "steps_done": st.step,
        "resumed_from_step": resumed_from,
        "train_seconds": round(st.train_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "torch_threads": torch.get_num_threads(),
    }
    if run.canary_scores is not None:
        assert run.canary_in is not None
        result["canaries"] = {"m": cfg.canaries, "scores": [float(x) for x in run.canary_scores],
                              "included": [bool(x) for x in run.canary_in],
                              "kind": "gradient-space canaries (norm C, Poisson-sampled at q when included), "
                                      "scored by the sum over steps of <privatised sum, direction>",
                              "space": "text features (K x E)" if run.text_site else "PEFT parameters"}
    write_json_atomic(out / "finetune.json", result)
    shutil.rmtree(root, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------- contrastive (Dp-CLIP)


def contrastive_dp(dp: str = "per-batch", *, clip: float = 1.0, noise_multiplier: float | None = None,
                   epsilon: float | None = None, delta: float | None = 1e-5,
                   accountant: str = "rdp") -> DpSetting | None:
    """The DP setting of contrastive fine-tuning from its options (``dp``: ``per-batch`` or ``none``):
    ``None`` without DP, else a per-batch (Dp-CLIP) setting awaiting its schedule."""
    if dp not in ("per-batch", "none"):
        raise ClipleakError(f"contrastive fine-tuning takes dp 'per-batch' or 'none', got {dp!r} "
                            "(the contrastive loss does not split into per-example terms)")
    if dp == "none":
        return None
    if noise_multiplier is None and epsilon is None:
        raise ClipleakError("Dp-CLIP fine-tuning needs a noise multiplier or a target epsilon")
    return DpSetting("per-batch", clip=float(clip), noise_multiplier=noise_multiplier, epsilon=epsilon, delta=delta,
                     accountant=accountant, awaiting_schedule=True)


@dataclass
class ContrastiveConfig:
    """Dp-CLIP fine-tuning of the whole target on a client's images: ``dp`` a per-batch
    :class:`~clipleak.privacy.DpSetting` (per-batch clipping and noise; :func:`contrastive_dp` builds one
    from the CLI's options), ``None`` without DP."""

    dp: DpSetting | None = None
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-5
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.dp is not None:
            if self.dp.mechanism != "per-batch":
                raise ClipleakError(f"contrastive fine-tuning takes dp 'per-batch' or 'none', got "
                                    f"{self.dp.mechanism!r} (the contrastive loss does not split into per-example "
                                    "terms)")
            self.dp = self.dp.unscheduled()

    def dp_setting(self, n_images: int) -> DpSetting | None:
        """The per-batch :class:`~clipleak.privacy.DpSetting` of this schedule over ``n_images`` images
        (fixed-size batches accounted as Poisson with q = B / N), resolved; ``None`` without DP."""
        if self.dp is None:
            return None
        q = self.batch_size / n_images
        if q > 1:
            raise ClipleakError(f"batch size {self.batch_size} is larger than the {n_images} training images")
        return self.dp.scheduled(q, int(self.steps)).resolve()


def contrastive_finetune(cfg: ContrastiveConfig, train: ImageSet, out_path: str | Path, *,
                         weights: str | Path | None, arch: str = "tiny-32", data: str = "mnist", split_seed: int = 0,
                         train_description: dict[str, Any] | None = None, resume: bool = False,
                         progress: ProgressFn | None = None, threads: int | None = None,
                         stop_after: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Contrastive fine-tuning of the target ``weights`` on ``train`` with :func:`pretrain`'s trainer
    (templates, AdamW, warmup + cosine, checkpoints), Dp-CLIP per-batch clipped and noised. Zero-shot
    accuracy on the validation split of ``data`` goes in the card; ``card["privacy"]`` records C,
    sigma, the sensitivity 2C and epsilon (fixed-size batches accounted as Poisson with q = B / N)."""
    setting = cfg.dp_setting(len(train))
    pcfg = PretrainConfig(arch=arch, data=data, split_seed=split_seed, steps=cfg.steps, batch_size=cfg.batch_size,
                          lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed, augment=False,
                          checkpoint_every=cfg.checkpoint_every)
    return pretrain(pcfg, out_path, resume=resume, progress=progress, threads=threads, task="contrastive",
                    init_weights=weights, train_set=train, train_description=train_description, dp=setting,
                    dp_seed=derive_seed(cfg.seed, "dp-clip"), stop_after=stop_after, device=device)
