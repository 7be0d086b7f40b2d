"""The privacy audit: epsilon x PEFT method x batch size, attacked and scored, beside the task accuracy
that DP fine-tuning keeps at the same epsilon.

For every epsilon the noise multiplier is calibrated for one stated schedule: a client holding the N
private digits trains with Poisson sampling at expected batch size ``finetune.batch_size`` (q = B / N)
for ``finetune.steps`` steps, clipping norm C = ``finetune.clip``, delta ``delta`` (RDP accountant).
Then, per cell:

* ``obs``: ``images`` defended observations (each a batch of B private digits drawn with seed
  ``draw_seed + i``, i = 0..images-1; the shared update is one DP-SGD step of that schedule: clipped
  per-example gradients + N(0, (sigma C)^2), of the victim at its PEFT initialisation), attacked
  (``featmatch`` + decoder by default: the strongest cheap attack) and scored: PSNR and one-to-one
  re-identification among K = ``reid_k`` same-class private digits (chance 1/K), beside the class
  prototype of the attacker's label and of the true label. A cell keeps its draw seed, the private
  indices it drew and the per-image PSNR (the summary's intervals are over images).
* ``acc``: DP fine-tuning (:func:`clipleak.training.finetune`) on the same schedule and epsilon;
  accuracy on the validation split. epsilon = inf: no clipping, no noise.
* ``canary``: the same DP run with canaries (:mod:`.canary`): an empirical epsilon lower bound.

CoOp options ride in ``finetune`` (so they reach the DP fine-tuning and the shared observations alike):
``class_specific`` (one context per class) and ``dp_site`` (``text-features``: clip and noise at the text
features, docs/privacy.md); the adapter ignores both. The attack is ``featmatch`` (with the decoder), ``mip``
(the same feature recovery under MIP's name, decoded; ``iterations`` = its gradient refinement steps) or any
other registered attack (``iterations`` steps).

Every finished cell goes into ``cells.json`` at once; a rerun skips what is there. :mod:`.summary` turns
the cells into the table and verdicts, :mod:`.chart` writes the chart and the page.

A defense audit (``AuditConfig.defense``, e.g. ``prune:1,0.1,0.01,0.001``) sweeps an update defense without
noise (:mod:`clipleak.privacy.defenses`) instead of epsilon: each point's observations are the plain gradient
with the defense applied (recorded in the observation, so the attack knows it; the cell says which attack
ran against which defense), its ``acc`` cell fine-tunes with the defense on every step's gradient, and there
are no canaries (no DP).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import artifacts
from ..attacks import make_config, run_attack
from ..client import load_private, sample_batch, share
from ..data import DataSpec, ImageSet, check_same_split, load_all, load_public, load_validation
from ..errors import ClipleakError
from ..evaluation import evaluate
from ..models import build_model, read_card
from ..peft import PeftConfig, build_victim, rebuild_victim
from ..privacy import DpSetting
from ..records import ProgressEvent, ProgressFn, Truth, write_json_atomic
from ..training import derive_seed, finetune
from .canary import canary_audit
from .cells import AuditConfig, Key, cell_keys, eps_text, key_text, saved_config
from .chart import write_outputs
from .decoder import choose_decoder
from .summary import summarise

RANDOM_INIT = ("none", "random")
"""Weights names that mean a random init (as in :mod:`clipleak.api`)."""
DECODER_ATTACKS = ("featmatch", "mip")
"""The attacks that decode a recovered feature (and so take the decoder)."""


class _Store:
    """``cells.json``: the audit's config and its finished cells by key, written atomically after each one.
    A folder holds one audit: a rerun with other settings (another draw seed included) is refused."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.cells: dict[str, Any] = {}
        self.split: dict[str, Any] | None = None
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                if not isinstance(saved, dict) or not isinstance(saved.get("cells", {}), dict):
                    raise ValueError("not an audit's cells file")
            except ValueError as e:
                raise ClipleakError(f"{path} is damaged ({e}); rerun with --restart to start this audit over "
                                    "(its finished cells are lost), or use another --out") from None
            old = saved_config(saved.get("config") or {})
            if old.get("draw_seed") != config.get("draw_seed"):
                raise ClipleakError(f"{path} holds an audit of draw seed {old.get('draw_seed')}, not "
                                    f"{config.get('draw_seed')}; use another --out for other images")
            if (old.get("data"), old.get("split_seed")) != (config.get("data"), config.get("split_seed")):
                raise ClipleakError(f"{path} holds an audit of data {old.get('data')} split seed "
                                    f"{old.get('split_seed')}, not {config.get('data')} split seed "
                                    f"{config.get('split_seed')}; use another --out for other images")
            if old != config:
                raise ClipleakError(f"{path} belongs to an audit with other settings; use another --out or "
                                    "delete it")
            self.cells = saved.get("cells", {})
            self.split = saved.get("split")
        self.config = config

    def check_split(self, split: dict[str, Any]) -> None:
        """Record the split the cells are computed on; refuse one that differs from the recorded one (a folder
        whose images changed since the finished cells were computed)."""
        if self.split is not None and self.split != split:
            raise ClipleakError(f"{self.path} was computed on another split of {split.get('name')} (recorded "
                                f"{_split_text(self.split)}, now {_split_text(split)}): its images changed; use "
                                "another --out")
        self.split = split  # a folder written before splits were recorded takes the current one

    def put(self, key: str, value: Any) -> None:
        self.cells[key] = value
        record: dict[str, Any] = {"config": self.config, "cells": self.cells}
        if self.split is not None:
            record["split"] = self.split
        write_json_atomic(self.path, record)


def _split_text(split: dict[str, Any]) -> str:
    return (f"{split.get('public')} public / {split.get('validation')} validation / {split.get('private')} "
            f"private images, {len(split.get('classnames') or [])} classes")


class AuditContext:
    """What every cell needs, built once: model, data, prototypes, calibrated settings, the decoder.

    Everything is checked before any work (the weights load, the data is readable with at least 2 classes
    and fits the target's split, the decoder fits the architecture, the weights and the split), so a bad
    input costs seconds, not a decoder's training or a cell; only then is an automatic decoder trained
    (:func:`.decoder.auto_decoder`). ``device``: where the model, the victims and the attacks compute
    (None: the CPU). ``check_split`` is called with the split's record (spec, part sizes, class names)
    before that training: the sweep refuses there a folder whose images changed since its cells."""

    def __init__(self, cfg: AuditConfig, progress: ProgressFn | None, device: Any = None, *,
                 check_split: Callable[[dict[str, Any]], None] | None = None):
        self.cfg = cfg
        self.device = device
        weights = None if str(cfg.weights).strip().lower() in RANDOM_INIT else cfg.weights
        self.path = artifacts.resolve_path(weights, progress)
        card = read_card(self.path) if self.path is not None else None
        self.arch = cfg.arch or str((card or {}).get("arch", "tiny-32"))
        self.clip = build_model(self.arch, self.path, device=device or "cpu")
        self.spec = DataSpec.parse(cfg.data, split_seed=cfg.split_seed)
        full = load_all(self.spec, self.clip.image_size)
        if full.n_classes < 2 or len(set(full.labels.tolist())) < 2:
            raise ClipleakError(f"{self.spec.name} has {full.n_classes} class(es); an audit needs at least 2")
        if cfg.classnames is not None and len(cfg.classnames) != full.n_classes:
            raise ClipleakError(f"{len(cfg.classnames)} class names given but {self.spec.name} has {full.n_classes} "
                                f"classes ({', '.join(full.classnames)})")
        self.same_as = same_data(self.spec, card, full)
        if self.path is not None:
            check_same_split(self.same_as, card, f"the target {Path(self.path).name}")
        self.private = load_private(self.spec, self.clip.image_size)
        self.validation = load_validation(self.spec, self.clip.image_size)
        public = load_public(self.spec, self.clip.image_size)
        if cfg.classnames is not None:
            for part in (self.private, self.validation, public):
                part.classnames = [str(c).strip() for c in cfg.classnames]
        self.prototypes = public.prototypes()
        self.split = {**self.spec.to_dict(), "public": len(public), "validation": len(self.validation),
                      "private": len(self.private), "classnames": list(self.private.classnames)}
        if self.same_as != self.spec:
            self.split["same_images_as"] = self.same_as.name
        self.victims = {m: build_victim(self.clip, list(self.private.classnames),
                                        PeftConfig(method=m, class_specific=cfg.ft(m, math.inf).peft.class_specific,
                                                   template=cfg.prompt_template), device=device)
                        for m in cfg.methods}
        # what the observations record as their data: the data set the folder is identical to, if it is one
        # (so the target's and decoder's split checks see the split they were trained on)
        self.data_meta = {**self.same_as.to_dict(), "grayscale": self.private.grayscale}
        if check_split is not None:
            check_split(self.split)
        self.decoder = self._decoder(public, progress)

    def _decoder(self, public: Any, progress: ProgressFn | None) -> str | None:
        """The decoder file the attack takes (None: the attack takes none), checked against the target."""
        cfg = self.cfg
        if cfg.attack not in DECODER_ATTACKS or not cfg.decoder:
            if cfg.attack == "mip":
                raise ClipleakError("MIP's image stage needs a feature-to-image decoder (--decoder auto trains one "
                                    "on the public split)")
            return None
        return choose_decoder(cfg.decoder, clip=self.clip, weights=cfg.weights, path=self.path, spec=self.spec,
                              same_as=self.same_as, public=public, seconds=cfg.decoder_seconds, progress=progress)

    def setting(self, method: str, eps: float) -> DpSetting | None:
        return self.cfg.ft(method, eps).dp_setting(len(self.private))


def same_data(spec: DataSpec, card: dict[str, Any] | None, full: ImageSet) -> DataSpec:
    """``spec``, or the built-in data set a target's card records when ``spec`` is a folder that holds exactly
    its images (the same pixels at this resolution, the same labels, in the same order): then the seeded
    split is the same one too, image for image, and the target's split check is the card's own."""
    recorded = (card or {}).get("data_spec")
    if spec.folder is None or not isinstance(recorded, dict):
        return spec
    other = DataSpec.from_dict(recorded)
    if other.folder is not None:
        return spec
    same = DataSpec(other.name, spec.split_seed, spec.private_fraction, spec.validation_fraction)
    ref = load_all(same, int(full.images.shape[-1]))
    if ref.labels.shape == full.labels.shape and torch.equal(ref.labels, full.labels) \
            and torch.equal(ref.images, full.images):
        return same
    return spec


def _obs_cell(ctx: AuditContext, method: str, b: int, eps: float, i: int) -> dict[str, Any]:
    cfg = ctx.cfg
    t0 = time.perf_counter()
    setting = ctx.setting(method, eps) if cfg.defense is None else None
    defense = cfg.point_defense(eps)
    draw = cfg.draw_seeds()[i]
    images, labels, idx = sample_batch(ctx.private, b, seed=draw)
    obs = share(ctx.victims[method], images, labels, data=ctx.data_meta, dp=setting,
                dp_seed=derive_seed(cfg.seed, "observation", method, b, eps_text(eps), i), defense=defense)
    truth = Truth(images=images, labels=labels, meta={"private_indices": idx.tolist(), "seed": draw})
    victim = rebuild_victim(obs, ctx.path, device=ctx.device)
    settings: dict[str, Any] = {"iterations": cfg.iterations, "labels": "auto"}
    if cfg.attack == "featmatch":
        settings["decoder"] = ctx.decoder
        if ctx.decoder and cfg.iterations == 0:
            settings["prior"] = "none"
    elif cfg.attack == "mip":
        settings = {"labels": "auto", "decoder": ctx.decoder, "refine": cfg.iterations}
    rec = run_attack(cfg.attack, obs, victim, make_config(cfg.attack, **settings))
    t_attack = time.perf_counter() - t0
    ev = evaluate(rec, truth, ctx.prototypes, with_lpips=False, reid_pool=ctx.private, reid_k=cfg.reid_k,
                  extra_baselines={"prototype-true": ctx.prototypes[labels]})
    reid = ev["reidentification"] or {}
    m = ev["methods"]
    return {"draw_seed": draw, "private_indices": idx.tolist(), "images": int(labels.numel()),
            "psnr": m["attack"]["psnr_mean"], "ssim": m["attack"]["ssim_mean"],
            "psnr_images": m["attack"]["psnr"],
            "prototype_psnr": m["prototype"]["psnr_mean"], "prototype_true_psnr": m["prototype-true"]["psnr_mean"],
            "reid": reid.get("attack"), "prototype_reid": reid.get("prototype"),
            "prototype_true_reid": reid.get("prototype-true"), "chance": reid.get("chance"),
            "label_accuracy": ev["label_accuracy"],
            "noise_multiplier": None if setting is None else setting.noise_multiplier,
            "epsilon": None if setting is None else setting.epsilon,
            **({} if cfg.defense is None else {"defense": None if defense is None else defense.spec,
                                               "attack": cfg.attack}),
            "attack_seconds": round(t_attack, 3), "seconds": round(time.perf_counter() - t0, 3)}


def _acc_cell(ctx: AuditContext, method: str, eps: float, out: Path, canaries: int = 0) -> dict[str, Any]:
    ft = ctx.cfg.ft(method, eps, canaries)
    res = finetune(ft, ctx.private, ctx.validation, out, weights=ctx.path, arch=ctx.arch,
                   train_description={"data": ctx.spec.to_dict(), "part": "private"}, device=ctx.device or "cpu")
    cell = {"accuracy": res["accuracy"], "accuracy_before": res["accuracy_before"],
            "epsilon": None if res["privacy"] is None else res["privacy"]["epsilon_spent"],
            "noise_multiplier": None if res["privacy"] is None else res["privacy"]["noise_multiplier"],
            "train_seconds": res["train_seconds"]}
    if canaries:
        c = res["canaries"]
        cell = {**canary_audit(c["scores"], c["included"]), "accuracy_with_canaries": res["accuracy"],
                "theoretical_epsilon": cell["epsilon"], "noise_multiplier": cell["noise_multiplier"],
                "train_seconds": res["train_seconds"]}
    return cell


def _cell(out: Path, ctx: AuditContext, k: Key) -> dict[str, Any]:
    """Compute one cell (a pure function of the config and the key: any order, any worker)."""
    kind, method, b, eps, i = k
    cfg = ctx.cfg
    if kind == "obs":
        return _obs_cell(ctx, method, b, eps, i)
    return _acc_cell(ctx, method, eps, out / "runs" / f"{kind}-{method}-{cfg.axis}{eps_text(eps)}",
                     cfg.canaries if kind == "canary" else 0)


def _worker_context(cfg: AuditConfig, device: Any) -> AuditContext:
    """A Ray worker's context (its decoder is the driver's, found in the cache)."""
    return AuditContext(cfg, None, device)


def run_audit(cfg: AuditConfig, out_dir: str | Path, *, progress: ProgressFn | None = None,
              threads: int | None = None, device: Any = None, workers: int = 1,
              ray_address: str | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep into ``out_dir``; write the table, chart and page; return the summary
    (``computed``: cells computed in this call). ``device``: where the model, victims and attacks compute
    (a ``torch.device``; None: the CPU); the table does not depend on it beyond floating-point rounding.
    ``workers`` > 1 computes the cells on that many Ray workers (:mod:`.parallel`; a local Ray, or the
    cluster at ``ray_address``), ``threads`` torch threads each; the table is the serial run's."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        store = _Store(out / "cells.json", cfg.to_dict())
        keys = cell_keys(cfg)
        todo = [k for k in keys if key_text(*k, axis=cfg.axis) not in store.cells]
        ctx = AuditContext(cfg, progress, device, check_split=store.check_split) if todo else None
        t0 = time.perf_counter()
        if todo and workers > 1:
            from .parallel import run_parallel

            results: Iterator[tuple[Key, dict[str, Any]]] = run_parallel(
                partial(_worker_context, cfg), partial(_cell, out), todo, workers=workers, address=ray_address,
                device=str(device or "cpu"), threads=int(threads or 1))
        else:
            results = ((k, _cell(out, ctx, k)) for k in todo if ctx is not None)
        if progress is not None and todo:
            progress(ProgressEvent("audit", len(keys) - len(todo), len(keys), note=key_text(*todo[0], axis=cfg.axis)))
        for n, (k, value) in enumerate(results, start=1):
            store.put(key_text(*k, axis=cfg.axis), value)
            if progress is not None and n < len(todo):
                progress(ProgressEvent("audit", len(keys) - len(todo) + n, len(keys),
                                       note=f"{key_text(*k, axis=cfg.axis)} done"))
        if progress is not None:
            progress(ProgressEvent("audit", len(keys), len(keys), phase="done"))
        summary = summarise(cfg, store.cells)
        summary["computed"] = len(todo)
        summary["seconds_this_run"] = round(time.perf_counter() - t0, 2)
        summary["files"] = write_outputs(out, summary)
        return summary
    finally:
        torch.set_num_threads(old)
