"""Pretrain a target CLIP offline on the PUBLIC split of real images.

A random-init CLIP maps every image to nearly the same feature (pairwise cosine 0.995), so a PEFT
gradient computed on it says nothing about the image and every attack on it measures nothing. clipleak
therefore trains its own small targets: open_clip's contrastive loss (:class:`open_clip.loss.ClipLoss`)
on image-caption pairs, where the images are the *public* part of a data set's seeded split
(:func:`clipleak.data.load_public`) and each caption is a random template filled with the image's class
name ("a handwritten seven.", "a blurry photo of a seven.", ...). The *validation* split is used only
once training is over, to measure zero-shot accuracy for the model card.

Training data sources (``PretrainConfig.data``):

* any :class:`~clipleak.data.DataSpec` text (``mnist``, ``digits``, ``folder:PATH``, ...): public split,
  captions from ``templates``;
* ``csv:PATH`` (or a path ending in ``.csv``): open_clip's own trainer format, a header row with a
  ``filepath`` column and a ``caption`` (or ``title``) column, comma- or tab-separated; image paths may be
  relative to the CSV's folder. The whole CSV is training data (it must hold no private image); zero-shot
  accuracy is measured only if ``eval_data`` names a labelled data set.

Recipe details (all recorded in the model card):

* AdamW (betas 0.9/0.98, eps 1e-6), linear warmup then cosine decay to 0 (open_clip's ``cosine_lr``);
  the warmup is capped at 10% of the schedule (a time budget can fit a short schedule).
  Weight decay follows open_clip's trainer: none on gains, biases, 1-d parameters and the logit scale;
  none on the token embedding either (see below).
* Learnable logit scale as in CLIP, clamped to ``ln(100)`` after every step.
* Only the rows of the token embedding that occur in the training captions are trained (a
  ``(used tokens, width)`` copy that is written back); the other ~49k rows keep their initial values.
  Mathematically this is the full model trained without weight decay on the token embedding (Adam moves a
  row only if it ever had a gradient), but the optimiser touches 0.1% of the 6.3M embedding numbers.
* Each step encodes only the distinct captions in the batch, with the text sequence cut to the longest
  of them (exact under the causal mask: :meth:`clipleak.peft.TextTower.encode_embeddings`).
* Captions: with ``caption_sampling="per-class"`` (default) each step draws one template per class, so
  all images of a class in the batch share one caption. With ``"per-sample"`` two digits of the same
  class can get different templates, and the contrastive loss then pushes each image away from the
  other's caption, i.e. away from its own class: the per-class default keeps that contradiction out of
  the objective.
* Augmentation: a random affine map per image (shift, rotation, scale) with ``grid_sample``; zero
  padding for grayscale data (black background), border padding for colour.
* Patch dropout (FLIP, ``patch_dropout``): a random part of the image patches is left out in training
  steps only (open_clip's ``PatchDropout``, seeded per step); the saved model and every evaluation use
  all patches. At 0.5 a step costs about half as much.

Determinism and resuming: every random choice of step ``s`` (which images, which templates, which
augmentation, which patches are dropped) is a pure function of ``(seed, s)``: the images come from
per-epoch permutations seeded by ``(seed, epoch)``, templates and augmentation from a generator seeded by
``(seed, s)``, and patch dropout draws from the global RNG inside ``torch.random.fork_rng`` seeded by
``(seed, s)``. A checkpoint (``<out stem>.ckpt/step-NNNNNNN/``: model weights and RNG state as
safetensors, the AdamW state via ``torch.save`` re-read with ``weights_only=True``, a JSON file with the
step and schedule) is written every ``checkpoint_every`` steps; ``resume=True`` continues from the newest
one and, on the same machine and thread count, ends with bitwise the same weights as an uninterrupted
run (tested). Different thread counts give different rounding (about 1e-7 after a few steps).
"""

from __future__ import annotations

import csv
import hashlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..data import (
    AffineRange,
    DataSpec,
    ImageSet,
    load_public,
    load_validation,
    random_affine,
    read_image,
    square_image,
)
from ..errors import ClipleakError
from ..models import (
    ClipModel,
    TextTower,
    accuracy,
    arch_config,
    build_model,
    card_path,
    class_text_features,
    image_features,
    save_weights,
    zero_shot_accuracy,
)
from ..privacy import DpSetting, dp_clip
from ..records import ProgressEvent, ProgressFn, load_checkpoint, write_checkpoint, write_json_atomic
from ..seeding import derive_seed
from .loop import Budget, LoopState, train_loop

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the number {}.",
    "a handwritten {}.",
    "a blurry photo of a {}.",
    "a drawing of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a picture of a {}.",
    "an image of the digit {}.",
    "a sketch of a {}.",
    "a scan of a handwritten {}.",
)
EVAL_PROMPT = "a photo of a {}."
CSV_PREFIX = "csv:"
LOGIT_SCALE_MAX = math.log(100.0)
CKPT_FORMAT = 1
_UNPLANNED = 10**9  # schedule length used while the time-budget calibration runs

@dataclass
class PretrainConfig:
    """How to pretrain a target CLIP. Everything that changes the trained weights lives here.

    ``steps`` is the length of the learning-rate schedule. With ``steps=None`` and a ``time_budget_s``,
    the schedule length is fitted to the budget from the speed of the first steps (then fixed and saved
    in the checkpoint); with both set, the budget is a hard stop. ``time_budget_s`` counts training
    time only (not data loading or evaluation).
    """

    arch: str = "tiny-32"
    data: str = "mnist"
    split_seed: int = 0
    steps: int | None = 1500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    seed: int = 0
    augment: bool = True
    max_shift: float = 2.0 / 28.0  # fraction of the image side (2 px of a 28 px MNIST digit)
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    caption_sampling: str = "per-class"  # "per-class": one template per class per step; "per-sample"
    patch_dropout: float = 0.0  # FLIP-style: drop this fraction of image patches in training steps only
    checkpoint_every: int = 400
    time_budget_s: float | None = None
    eval_data: str | None = None  # data set whose PRIVATE split measures zero-shot accuracy (default: data)

    def __post_init__(self) -> None:
        self.templates = list(self.templates)
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))
        Budget(self.steps, self.time_budget_s)  # the training loop's own checks of a schedule and a budget
        if int(self.batch_size) < 2:
            raise ClipleakError("batch size must be at least 2 (a contrastive loss needs negatives)")
        if not float(self.lr) > 0:
            raise ClipleakError(f"learning rate must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ClipleakError("weight decay and warmup steps must be >= 0")
        if int(self.checkpoint_every) < 1:
            raise ClipleakError("checkpoint_every must be at least 1")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ClipleakError("templates must be a non-empty list of strings that contain '{}'")
        if self.caption_sampling not in ("per-class", "per-sample"):
            raise ClipleakError(f"caption_sampling must be 'per-class' or 'per-sample', "
                                f"got {self.caption_sampling!r}")
        if not 0.0 <= float(self.patch_dropout) < 1.0:
            raise ClipleakError(f"patch_dropout must be in [0, 1), got {self.patch_dropout!r}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ClipleakError(f"scale range must satisfy 0 < low <= high, got {self.scale_range}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inverse of :meth:`from_dict`)."""
        d = asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ClipleakError(f"unknown pretrain config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "scale_range" in d:
            d["scale_range"] = tuple(d["scale_range"])
        return cls(**d)

    def training_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint (all but the stopping rules)."""
        d = self.to_dict()
        for k in ("steps", "time_budget_s", "checkpoint_every", "eval_data"):
            d.pop(k)
        return d


# ---------------------------------------------------------------------------------------------- data


@dataclass
class _TrainData:
    """Training images plus the caption table: caption id -> tokens."""

    images: torch.Tensor  # (N, 3, S, S) in [0, 1]
    labels: torch.Tensor | None  # (N,) for template captions; None for CSV captions
    captions: list[str]  # template mode: T*K strings, id = t*K + k; CSV mode: one per image
    grayscale: bool
    description: dict[str, Any]
    n_templates: int = 0
    classnames: list[str] = field(default_factory=list)

    def caption_ids(self, idx: torch.Tensor, g: torch.Generator, per_class: bool) -> torch.Tensor:
        """Caption id of each sample ``idx``: its CSV row, or template * K + class, where the template is
        drawn per sample or (``per_class``) once per class for the whole batch."""
        if self.labels is None:
            return idx
        k = len(self.classnames)
        labels = self.labels[idx]
        if per_class:
            t = torch.randint(self.n_templates, (k,), generator=g)[labels]
        else:
            t = torch.randint(self.n_templates, (idx.numel(),), generator=g)
        return t * k + labels


def _is_csv(data: str) -> bool:
    return data.startswith(CSV_PREFIX) or data.lower().endswith((".csv", ".tsv"))


def _data_spec(text: str, split_seed: int) -> DataSpec:
    return DataSpec.parse(text, split_seed=split_seed)


def load_caption_csv(path: str | Path, image_size: int) -> tuple[torch.Tensor, list[str], bool]:
    """Read an open_clip-style CSV (``filepath`` and ``caption``/``title`` columns).

    Returns images ``(N, 3, S, S)`` in [0, 1] (centre-cropped square, resized), captions, and whether
    every image was single-channel. Paths may be absolute or relative to the CSV's folder. Any bad row
    is a :class:`ClipleakError` naming the row (1 = first data row after the header).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ClipleakError(f"caption CSV not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ClipleakError(f"cannot read caption CSV {p}: {e}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ClipleakError(f"caption CSV {p} is empty (expected a header row 'filepath,caption')")
    header = lines[0]
    delimiter = "\t" if "\t" in header and "," not in header else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    cap_col = "caption" if "caption" in cols else "title" if "title" in cols else None
    if "filepath" not in cols or cap_col is None:
        raise ClipleakError(
            f"caption CSV {p} needs a header row with 'filepath' and 'caption' (or 'title') columns; "
            f"found: {', '.join(cols) or 'nothing'}"
        )
    images: list[torch.Tensor] = []
    captions: list[str] = []
    all_single = True
    for row_no, row in enumerate(reader, start=1):
        fp = (row.get("filepath") or "").strip()
        cap = (row.get(cap_col) or "").strip()
        if not fp and not cap:
            continue  # blank line
        if not fp:
            raise ClipleakError(f"caption CSV {p}, row {row_no}: empty filepath")
        if not cap:
            raise ClipleakError(f"caption CSV {p}, row {row_no}: empty caption for {fp}")
        img_path = Path(fp).expanduser()
        if not img_path.is_absolute():
            img_path = p.parent / img_path
        if not img_path.is_file():
            raise ClipleakError(f"caption CSV {p}, row {row_no}: image file not found: {img_path}")
        try:
            arr, single = read_image(img_path)
        except ClipleakError as e:
            raise ClipleakError(f"caption CSV {p}, row {row_no}: {e}") from None
        all_single &= single
        images.append(square_image(arr, image_size))
        captions.append(cap)
    if len(images) < 2:
        raise ClipleakError(
            f"caption CSV {p} has {len(images)} usable row(s); contrastive training needs at least 2"
        )
    return torch.stack(images), captions, all_single


def _load_train_data(cfg: PretrainConfig, image_size: int) -> _TrainData:
    if _is_csv(cfg.data):
        path = cfg.data[len(CSV_PREFIX):] if cfg.data.startswith(CSV_PREFIX) else cfg.data
        images, captions, gray = load_caption_csv(path, image_size)
        desc = {"kind": "csv", "path": str(Path(path).expanduser().resolve()), "n_images": len(captions),
                "split": "whole CSV (treated as public training data)"}
        return _TrainData(images, None, captions, gray, desc)
    spec = _data_spec(cfg.data, cfg.split_seed)
    pub: ImageSet = load_public(spec, image_size)
    if pub.n_classes < 2:
        raise ClipleakError(f"{spec.name}: pretraining needs at least 2 classes, found {pub.n_classes}")
    captions = [t.format(name) for t in cfg.templates for name in pub.classnames]
    desc = {"kind": "dataspec", "spec": spec.to_dict(), "split": "public", "n_images": len(pub),
            "source": pub.source, "classnames": list(pub.classnames)}
    return _TrainData(pub.images.contiguous(), pub.labels, captions, pub.grayscale, desc,
                      n_templates=len(cfg.templates), classnames=list(pub.classnames))


# ---------------------------------------------------------------------------------------- randomness


class _Order:
    """Sample order: epoch ``e`` is a permutation seeded by ``(seed, e)``; step ``s`` takes positions
    ``s*B .. s*B+B-1`` of the endless concatenation of epochs. A pure function of ``(seed, s)``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.b, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.b, (step + 1) * self.b)
        out = torch.empty(self.b, dtype=torch.long)
        for e in torch.unique(pos // self.n).tolist():
            sel = (pos // self.n) == e
            out[sel] = self._perm(int(e))[pos[sel] % self.n]
        return out


def _affine(cfg: PretrainConfig) -> AffineRange:
    return AffineRange(cfg.max_shift, cfg.max_rotation_deg, cfg.scale_range)


def lr_at(step: int, cfg: PretrainConfig, total_steps: int) -> float:
    """Learning rate of step ``step`` (0-based): open_clip's linear warmup + cosine decay to 0, with the
    warmup capped at 10% of ``total_steps``."""
    warm = min(cfg.warmup_steps, max(1, total_steps // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, total_steps - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span))) * cfg.lr


# ---------------------------------------------------------------------------------------- evaluation


def _eval_set(cfg: PretrainConfig, image_size: int) -> ImageSet | None:
    text = cfg.eval_data if cfg.eval_data is not None else (None if _is_csv(cfg.data) else cfg.data)
    if text is None:
        return None
    return load_validation(_data_spec(text, cfg.split_seed), image_size)


def _zero_shot_report(clip: ClipModel, ev: ImageSet, templates: list[str]) -> dict[str, float]:
    was_training = clip.model.training
    clip.model.eval()
    try:
        single = class_text_features(clip, ev.classnames, [EVAL_PROMPT])
        ensemble = class_text_features(clip, ev.classnames, templates)
    finally:
        clip.model.train(was_training)
    feats = image_features(clip, ev.images)  # one pass over the images for both numbers (back on their device)
    return {"accuracy": accuracy(feats, single.to(feats.device), ev.labels),
            "ensemble_accuracy": accuracy(feats, ensemble.to(feats.device), ev.labels)}


# ------------------------------------------------------------------------------------------ training


class _Trainer:
    """The model, the trainable token-embedding rows, the optimiser and one training step.

    With a ``dp`` setting (per-batch mechanism, resolved) every step's gradient of all trained tensors
    together is Dp-CLIP's: the batch gradient clipped to C plus N(0, (sigma C)^2), the noise seeded by
    ``(dp_seed, step)``."""

    def __init__(self, clip: ClipModel, data: _TrainData, cfg: PretrainConfig, dp: DpSetting | None = None,
                 dp_seed: int = 0):
        self.clip, self.data, self.cfg = clip, data, cfg
        self.dp, self.dp_seed = dp, dp_seed
        self.model = clip.model
        self.model.train().requires_grad_(True)
        self.tower = TextTower(self.model)
        emb = self.tower.t.token_embedding
        emb.weight.requires_grad_(False)
        self.device = emb.weight.device  # the model's; batches are drawn on the CPU and moved there
        tokens = clip.tokenizer(data.captions).to(self.device)
        self.pool_idx = self.tower.pool_index(tokens)
        self.used = torch.unique(tokens)
        self.local_tokens = torch.searchsorted(self.used, tokens)
        self.rows = nn.Parameter(emb.weight.detach()[self.used].clone())
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
            (no_decay if skip else decay).append(p)
        no_decay.append(self.rows)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
        )
        from open_clip.loss import ClipLoss

        self.loss_fn = ClipLoss()
        self.order = _Order(len(data.images), cfg.batch_size, cfg.seed)
        visual = self.model.visual
        self._pd_original = getattr(visual, "patch_dropout", None)
        if cfg.patch_dropout > 0:
            if self._pd_original is None:
                raise ClipleakError(f"patch dropout needs a ViT image tower; {clip.arch} has none")
            from open_clip.transformer import PatchDropout

            visual.patch_dropout = PatchDropout(cfg.patch_dropout)

    def finish(self) -> None:
        """Write the embedding rows back and remove the training-only patch dropout."""
        self.write_back()
        if self._pd_original is not None:
            self.model.visual.patch_dropout = self._pd_original

    def write_back(self) -> None:
        """Copy the trained embedding rows into the model's full token embedding."""
        with torch.no_grad():
            self.tower.t.token_embedding.weight[self.used] = self.rows.detach()

    def reload_rows(self) -> None:
        with torch.no_grad():
            self.rows.copy_(self.tower.t.token_embedding.weight[self.used])

    def step(self, s: int, lr: float) -> float:
        idx = self.order.batch(s)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "step", s))
        cap = self.data.caption_ids(idx, g, self.cfg.caption_sampling == "per-class")
        x = self.data.images[idx]
        if self.cfg.augment:
            x = random_affine(x, _affine(self.cfg), g, self.data.grayscale)
        x, cap = x.to(self.device), cap.to(self.device)
        uniq, inverse = torch.unique(cap, return_inverse=True)
        with torch.random.fork_rng(devices=[]):  # patch dropout draws from the global RNG
            torch.manual_seed(derive_seed(self.cfg.seed, "patches", s))
            img = F.normalize(self.model.encode_image(self.clip.normalize(x)), dim=-1)
        txt = self.tower.encode_embeddings(self.rows[self.local_tokens[uniq]], self.pool_idx[uniq])
        txt = F.normalize(txt, dim=-1)[inverse]
        loss = self.loss_fn(img, txt, self.model.logit_scale.exp())
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dp is not None:
            self._privatise(s)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        return float(loss.detach())


    def _privatise(self, s: int) -> None:
        assert self.dp is not None and self.dp.noise_multiplier is not None
        params = [p for group in self.opt.param_groups for p in group["params"]]
        grads = {str(i): (p.grad if p.grad is not None else torch.zeros_like(p)) for i, p in enumerate(params)}
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.dp_seed, "dp-noise", s))
        noisy = dp_clip(grads, self.dp.clip, self.dp.noise_multiplier, gen, self.dp.clipping)
        for i, p in enumerate(params):
            p.grad = noisy[str(i)]


def checkpoint_dir(out_path: str | Path) -> Path:
    """Where :func:`pretrain` (and ``clipleak prior train``, :class:`~clipleak.training.PriorCheckpoints`) keeps
    its checkpoints for ``out_path``: ``<stem>.ckpt/`` beside it."""
    p = Path(out_path)
    return p.with_name(p.stem + ".ckpt")


def _save_checkpoint(root: Path, tr: _Trainer, state: dict[str, Any]) -> None:
    tr.write_back()

    def write(d: Path) -> None:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tr.model.state_dict().items()},
                  str(d / "model.safetensors"))
        torch.save(tr.opt.state_dict(), d / "optimizer.pt")
        save_file({"torch_cpu": torch.get_rng_state()}, str(d / "rng.safetensors"))

    write_checkpoint(root, int(state["step"]), state, write)


def _read_checkpoint(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    return (load_file(str(d / "model.safetensors")),
            torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True),
            load_file(str(d / "rng.safetensors"))["torch_cpu"])


def _load_checkpoint(root: Path, tr: _Trainer, cfg: PretrainConfig,
                     extra_key: dict[str, Any] | None = None) -> dict[str, Any] | None:
    saved = load_checkpoint(root, _read_checkpoint, hint=f"delete {root} or run without --resume to start over")
    if saved is None:
        return None
    state, (sd, opt_sd, rng) = saved
    if state.get("format") != CKPT_FORMAT:
        raise ClipleakError(f"the checkpoint in {root} has an unknown format; delete {root} to start over")
    saved_key = state["config"]
    now_key = {**cfg.training_key(), **(extra_key or {})}
    diff = sorted(k for k in set(saved_key) | set(now_key) if saved_key.get(k) != now_key.get(k))
    if diff:
        raise ClipleakError(f"cannot resume from {root}: the run was started with different settings "
                            f"({', '.join(diff)}); use the same settings or start over without --resume")
    if cfg.steps is not None and int(cfg.steps) != int(state["total_steps"]):
        raise ClipleakError(f"cannot resume from {root}: it was planned for {state['total_steps']} steps, "
                            f"now {cfg.steps} were asked (the learning-rate schedule depends on it)")
    tr.model.load_state_dict(sd, strict=True)
    tr.reload_rows()
    tr.opt.load_state_dict(opt_sd)
    torch.set_rng_state(rng)
    return state


def pretrain(
    cfg: PretrainConfig,
    out_path: str | Path,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    eval_every_s: float | None = None,
    stop_after: int | None = None,
    keep_checkpoints: bool = False,
    evaluate: bool = True,
    threads: int | None = None,
    task: str = "pretrain",
    init_weights: str | Path | None = None,
    train_set: ImageSet | None = None,
    train_description: dict[str, Any] | None = None,
    dp: DpSetting | None = None,
    dp_seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train ``cfg.arch`` contrastively on the public split of ``cfg.data``; write weights and a card.

    Writes ``out_path`` (safetensors, loadable with :func:`clipleak.models.build_model`) and
    ``<stem>.card.json`` beside it, and returns the card. Checkpoints go to ``<stem>.ckpt/`` and are
    removed after success unless ``keep_checkpoints``.

    Args:
        resume: continue from the newest checkpoint (same data order, same schedule) instead of
            starting over; without a checkpoint the run starts from step 0.
        progress: called after every step (see :data:`ProgressFn`).
        eval_every_s: also measure zero-shot accuracy on the validation split every that many seconds of
            training (not counted as training time); the card's ``curve`` lists the points.
        stop_after: for tests of resuming: abandon the run after this many steps as if the process had
            been killed (no checkpoint at that step, no output files); returns ``{"completed": False}``.
        keep_checkpoints: keep ``<stem>.ckpt/`` after a successful run.
        evaluate: measure zero-shot accuracy (trained and random init) for the card; ``False`` skips it.
        threads: torch CPU threads during the run (restored afterwards); ``None`` keeps the current
            setting. Results are bitwise reproducible for a fixed thread count only. On a machine shared
            with other busy processes, 1 thread can be several times faster than 2.
        init_weights: start from these weights instead of a random init (contrastive fine-tuning).
        train_set: train on these labelled images (captions from ``cfg.templates``) instead of the public
            split of ``cfg.data`` (a client's images, loaded by the caller: training never reaches the
            private split itself); ``train_description`` says in the card what they are.
        dp: a per-batch :class:`~clipleak.privacy.DpSetting` (Dp-CLIP): each step's gradient is clipped
            to C as a whole and noised; ``dp_seed`` seeds the noise. Recorded in the card (``privacy``).
        device: where the model trains (batches are drawn and augmented on the CPU, as ever, then moved
            there; the weights file holds CPU tensors). The same numbers as before on the CPU only.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        if int(threads) < 1:
            raise ClipleakError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        extra = _Extra(init_weights, train_set, train_description, dp.resolve() if dp is not None else None,
                       int(dp_seed), torch.device(device))
        return _pretrain(cfg, Path(out_path), resume, progress, eval_every_s, stop_after, keep_checkpoints,
                         evaluate, task, extra)
    finally:
        torch.set_num_threads(old_threads)


@dataclass
class _Extra:
    """What contrastive fine-tuning adds to pretraining (none of it is part of a target's recipe)."""

    init_weights: str | Path | None = None
    train_set: ImageSet | None = None
    train_description: dict[str, Any] | None = None
    dp: DpSetting | None = None
    dp_seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def key(self) -> dict[str, Any]:
        """Entries a resumed run must share with its checkpoint (none for plain pretraining)."""
        k: dict[str, Any] = {}
        if self.init_weights is not None:
            k["init_weights"] = str(self.init_weights)
        if self.train_set is not None:
            k["train_set"] = hashlib.sha256(self.train_set.images.numpy().tobytes()).hexdigest()
        if self.dp is not None:
            k["dp"] = self.dp.record()
            k["dp_seed"] = self.dp_seed
        return k


def _set_data(cfg: PretrainConfig, ims: ImageSet, description: dict[str, Any] | None) -> _TrainData:
    if ims.n_classes < 2:
        raise ClipleakError("contrastive training needs images of at least 2 classes")
    captions = [t.format(name) for t in cfg.templates for name in ims.classnames]
    desc = {"kind": "image set", "source": ims.source, "n_images": len(ims), "classnames": list(ims.classnames),
            **(description or {})}
    return _TrainData(ims.images.contiguous(), ims.labels, captions, ims.grayscale, desc,
                      n_templates=len(cfg.templates), classnames=list(ims.classnames))


def _pretrain(cfg: PretrainConfig, out: Path, resume: bool, progress: ProgressFn | None,
              eval_every_s: float | None, stop_after: int | None, keep_checkpoints: bool,
              evaluate: bool, task: str, ext: _Extra | None = None) -> dict[str, Any]:
    ext = ext or _Extra()
    if out.suffix != ".safetensors":
        raise ClipleakError(f"output must be a .safetensors file, got {out}")
    t_start = time.perf_counter()
    if progress is not None:
        progress(ProgressEvent(task, 0, cfg.steps, phase="load", note="loading data"))

    clip = build_model(cfg.arch, ext.init_weights, init_seed=cfg.seed, device=ext.device)
    data = _load_train_data(cfg, clip.image_size) if ext.train_set is None else \
        _set_data(cfg, ext.train_set, ext.train_description)
    ev = _eval_set(cfg, clip.image_size) if evaluate else None
    if ev is not None and ev.n_classes < 2:
        raise ClipleakError("the evaluation data set needs at least 2 classes")
    baseline = _zero_shot_report(clip, ev, cfg.templates) if ev is not None else None

    tr = _Trainer(clip, data, cfg, ext.dp, ext.dp_seed)
    root = checkpoint_dir(out)
    extra: dict[str, Any] = {"resumed_from": []}
    loop_state: LoopState | None = None
    if resume:
        saved = _load_checkpoint(root, tr, cfg, ext.key())
        if saved is not None:
            loop_state = LoopState.from_dict(saved)
            extra["resumed_from"] = [*saved.get("resumed_from", []), loop_state.step]
    elif root.exists():
        shutil.rmtree(root)

    def save_ckpt(st: LoopState) -> None:
        _save_checkpoint(root, tr, {"format": CKPT_FORMAT, "config": {**cfg.training_key(), **ext.key()},
                                    "resumed_from": extra["resumed_from"], **st.to_dict()})

    def evaluate_now(st: LoopState) -> dict[str, float]:
        tr.write_back()
        assert ev is not None
        return {"accuracy": zero_shot_accuracy(tr.clip, ev.images, ev.labels, ev.classnames, EVAL_PROMPT)}

    def lr_of(s: int, total: int | None) -> float:
        return lr_at(s, cfg, total if total is not None else _UNPLANNED)

    st = train_loop(lambda s, total: tr.step(s, lr_of(s, total)), Budget(cfg.steps, cfg.time_budget_s),
                    task=task, state=loop_state, progress=progress, checkpoint=save_ckpt,
                    checkpoint_every=cfg.checkpoint_every, evaluate=evaluate_now if ev is not None else None,
                    eval_every_s=eval_every_s, stop_after=stop_after, lr_of=lr_of)
    if not st.completed:
        return {"completed": False, "stopped_after": st.step}
    step, total, stopped, train_s, losses, curve = st.step, st.total, st.stopped, st.train_seconds, st.losses, st.curve
    state = extra
    tr.finish()
    clip.model.eval().requires_grad_(False)
    if progress is not None:
        progress(ProgressEvent(task, step, total, phase="eval", note="zero-shot accuracy on the validation split"))
    zs = _zero_shot_report(clip, ev, cfg.templates) if ev is not None else None
    sha = save_weights(clip.model, out)
    card = _model_card(cfg, data, out, sha, step, total, stopped, state, train_s, losses, zs, baseline, ev,
                       curve, time.perf_counter() - t_start)
    if ext.init_weights is not None:
        card["init_weights"] = str(ext.init_weights)
    if ext.dp is not None:
        card["privacy"] = {**ext.dp.record(), "sampling": "fixed-size batches (seeded per-epoch permutations), "
                           "accounted as Poisson sampling with q = batch size / images (an approximation)",
                           "epsilon_at_steps_done": _spent(ext.dp, step)}
    write_json_atomic(card_path(out), card, indent=2)
    if stopped is None and not keep_checkpoints:
        shutil.rmtree(root, ignore_errors=True)
    return card


def _spent(dp: DpSetting, steps: int) -> float | None:
    """Epsilon of the steps actually run (the setting's epsilon is for its planned schedule)."""
    from ..privacy import epsilon

    if dp.sample_rate is None or dp.delta is None or not dp.noise_multiplier or steps < 1:
        return None
    return epsilon(dp.noise_multiplier / dp.sensitivity_factor, dp.sample_rate, steps, dp.delta, dp.accountant)


def _model_card(cfg: PretrainConfig, data: _TrainData, out: Path, sha: str, step: int, total: int | None,
                stopped: str | None, state: dict[str, Any], train_s: float, losses: list[float],
                zs: dict[str, float] | None, baseline: dict[str, float] | None, ev: ImageSet | None,
                curve: list[dict[str, float]], total_s: float) -> dict[str, Any]:
    tail = losses[-20:]
    zero_shot: dict[str, Any] | None = None
    if zs is not None and ev is not None and baseline is not None:
        zero_shot = {
            "split": "validation",
            "source": ev.source,
            "n_images": len(ev),
            "chance": 1.0 / ev.n_classes,
            "prompt": EVAL_PROMPT,
            "accuracy": zs["accuracy"],
            "ensemble_accuracy": zs["ensemble_accuracy"],
            "ensemble_note": f"mean text feature over the {len(cfg.templates)} training templates",
            "random_init_accuracy": baseline["accuracy"],
            "random_init_ensemble_accuracy": baseline["ensemble_accuracy"],
        }
    every = max(1, len(losses) // 50)
    return {
        "kind": "clipleak pretrained target CLIP",
        "clipleak_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "arch": cfg.arch,
        "arch_config": arch_config(cfg.arch),
        "weights_file": out.name,
        "weights_sha256": sha,
        "config": cfg.to_dict(),
        "data": data.description,
        "data_spec": data.description.get("spec"),
        "seed": cfg.seed,
        "steps_done": step,
        "steps_planned": total,
        "stopped_early": stopped,
        "resumed_from_steps": list(state.get("resumed_from", [])),
        "train_seconds": round(train_s, 2),
        "seconds_per_step": round(train_s / max(1, step), 4),
        "total_seconds": round(total_s, 2),
        "torch_threads": torch.get_num_threads(),
        "final_loss": float(np.mean(tail)) if tail else float("nan"),
        "final_loss_note": "mean contrastive loss over the last 20 steps",
        "loss_curve": [[i + 1, float(np.mean(losses[max(0, i + 1 - every): i + 1]))]
                       for i in range(every - 1, len(losses), every)],
        "zero_shot": zero_shot,
        "curve": curve,
        "recipe_notes": [
            "open_clip ClipLoss on (image, caption) pairs of the public split only",
            "AdamW betas (0.9, 0.98) eps 1e-6; linear warmup + cosine decay to 0",
            "no weight decay on gains, biases, 1-d parameters, logit scale, token embedding",
            "only token-embedding rows that occur in the captions are trained; the others keep their init",
            "logit scale learnable, clamped to <= 100",
        ],
    }
