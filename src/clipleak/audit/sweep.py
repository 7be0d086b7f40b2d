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
from pathlib import Path
from typing import Any

import torch

from .. import artifacts
from ..attacks import make_config, run_attack
from ..client import load_private, sample_batch, share
from ..data import DataSpec, check_same_split, load_public, load_validation
from ..errors import ClipleakError
from ..evaluation import evaluate
from ..models import build_model, read_card
from ..peft import PeftConfig, build_victim, rebuild_victim
from ..privacy import DpSetting
from ..records import ProgressEvent, ProgressFn, Truth, write_json_atomic
from ..training import derive_seed, finetune
from .canary import canary_audit
from .cells import AuditConfig, cell_keys, eps_text, key_text, saved_config
from .chart import write_outputs
from .summary import summarise


class _Store:
    """``cells.json``: the audit's config and its finished cells by key, written atomically after each one.
    A folder holds one audit: a rerun with other settings (another draw seed included) is refused."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.cells: dict[str, Any] = {}
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
                                    f"{config.get('draw_seed')}; use another --out for other digits")
            if old != config:
                raise ClipleakError(f"{path} belongs to an audit with other settings; use another --out or "
                                    "delete it")
            self.cells = saved.get("cells", {})
        self.config = config

    def put(self, key: str, value: Any) -> None:
        self.cells[key] = value
        write_json_atomic(self.path, {"config": self.config, "cells": self.cells})


class AuditContext:
    """What every cell needs, built once: model, data, prototypes, calibrated settings."""

    def __init__(self, cfg: AuditConfig, progress: ProgressFn | None):
        self.cfg = cfg
        self.path = artifacts.resolve_path(cfg.weights, progress)
        self.decoder = artifacts.resolve_path(cfg.decoder, progress) if cfg.decoder else None
        self.clip = build_model("tiny-32" if self.path is None else _arch(self.path), self.path)
        self.spec = DataSpec.parse(cfg.data, split_seed=cfg.split_seed)
        if self.path is not None:
            check_same_split(self.spec, read_card(self.path), f"the target {Path(self.path).name}")
        self.private = load_private(self.spec, self.clip.image_size)
        self.validation = load_validation(self.spec, self.clip.image_size)
        self.prototypes = load_public(self.spec, self.clip.image_size).prototypes()
        self.victims = {m: build_victim(self.clip, list(self.private.classnames),
                                        PeftConfig(method=m, class_specific=bool(cfg.ft(m, math.inf).class_specific)))
                        for m in cfg.methods}
        self.data_meta = {**self.spec.to_dict(), "grayscale": self.private.grayscale}

    def setting(self, method: str, eps: float) -> DpSetting | None:
        return self.cfg.ft(method, eps).dp_setting(len(self.private))


def _arch(path: str) -> str:
    card = read_card(path) or {}
    return str(card.get("arch", "tiny-32"))


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
    victim = rebuild_victim(obs, ctx.path)
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
    res = finetune(ft, ctx.private, ctx.validation, out, weights=ctx.path,
                   train_description={"data": ctx.spec.to_dict(), "part": "private"})
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


def run_audit(cfg: AuditConfig, out_dir: str | Path, *, progress: ProgressFn | None = None,
              threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep into ``out_dir``; write the table, chart and page; return the summary
    (``computed``: cells computed in this call)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        store = _Store(out / "cells.json", cfg.to_dict())
        keys = cell_keys(cfg)
        todo = [k for k in keys if key_text(*k, axis=cfg.axis) not in store.cells]
        ctx = AuditContext(cfg, progress) if todo else None
        t0 = time.perf_counter()
        for n, k in enumerate(todo):
            kind, method, b, eps, i = k
            if progress is not None:
                progress(ProgressEvent("audit", len(keys) - len(todo) + n, len(keys),
                                       note=key_text(*k, axis=cfg.axis)))
            assert ctx is not None
            if kind == "obs":
                value = _obs_cell(ctx, method, b, eps, i)
            else:
                value = _acc_cell(ctx, method, eps, out / "runs" / f"{kind}-{method}-{cfg.axis}{eps_text(eps)}",
                                  cfg.canaries if kind == "canary" else 0)
            store.put(key_text(*k, axis=cfg.axis), value)
        if progress is not None:
            progress(ProgressEvent("audit", len(keys), len(keys), phase="done"))
        summary = summarise(cfg, store.cells)
        summary["computed"] = len(todo)
        summary["seconds_this_run"] = round(time.perf_counter() - t0, 2)
        summary["files"] = write_outputs(out, summary)
        return summary
    finally:
        torch.set_num_threads(old)
