"""The privacy audit: epsilon x PEFT method x batch size, attacked and scored, beside the task accuracy
that DP fine-tuning keeps at the same epsilon.

For every epsilon the noise multiplier is calibrated for one stated schedule: a client holding the N
private digits trains with Poisson sampling at expected batch size ``finetune.batch_size`` (q = B / N)
for ``finetune.steps`` steps, clipping norm C = ``finetune.clip``, delta ``delta`` (RDP accountant).
Then, per cell:

* ``obs``: ``images`` defended observations (each a batch of B private digits, draw seed 0..images-1;
  the shared update is one DP-SGD step of that schedule: clipped per-example gradients + N(0, (sigma C)^2),
  of the victim at its PEFT initialisation), attacked (``featmatch`` + decoder by default: the strongest
  cheap attack) and scored: PSNR and one-to-one re-identification among K = 10 same-class private
  digits (chance 10%), beside the class prototype of the attacker's label and of the true label.
* ``acc``: DP fine-tuning (:func:`clipleak.training.finetune`) on the same schedule and epsilon;
  accuracy on the validation split. epsilon = inf: no clipping, no noise.
* ``canary``: the same DP run with canaries (:mod:`.canary`): an empirical epsilon lower bound.

CoOp options ride in ``finetune`` (so they reach the DP fine-tuning and the shared observations alike):
``class_specific`` (one context per class) and ``dp_site`` (``text-features``: clip and noise at the text
features, docs/privacy.md); the adapter ignores both. The attack is ``featmatch`` (with the decoder), ``mip``
(the same feature recovery under MIP's name, decoded; ``iterations`` = its gradient refinement steps) or any
other registered attack (``iterations`` steps).

Every finished cell goes into ``cells.json`` at once; a rerun skips what is there.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
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
from ..records import ProgressEvent, ProgressFn, Truth
from ..training import FinetuneConfig, derive_seed, dp_setting, finetune
from .canary import canary_audit

CHANCE_MARGIN = 0.10
"""Re-identification within this many points of chance counts as "at chance" (with 8 digits x 20 draws,
the spread of an image-independent guess around chance is of this order)."""


@dataclass
class AuditConfig:
    """What the audit sweeps and the schedule its epsilons are calibrated for."""

    epsilons: list[float] = field(default_factory=lambda: [math.inf, 100.0, 30.0, 10.0, 3.0, 1.0])
    methods: list[str] = field(default_factory=lambda: ["adapter", "coop"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    attack: str = "featmatch"
    images: int = 8
    weights: str = "tiny-mnist"
    decoder: str | None = "tiny-mnist-decoder"
    iterations: int = 0
    data: str = "mnist"
    split_seed: int = 0
    delta: float = 1e-5
    finetune: dict[str, Any] = field(default_factory=lambda: {"steps": 200, "batch_size": 25, "clip": 0.01,
                                                               "lr": 1e-2, "sampling": "poisson"})
    canaries: int = 1000
    reid_k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.epsilons or any(not (e > 0) for e in self.epsilons):
            raise ClipleakError("epsilons must be positive numbers (inf for no defense)")
        if int(self.images) < 1 or not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ClipleakError("images and batch sizes must be positive")
        for m in self.methods or ["adapter"]:
            self.ft(m, 1.0)

    def label(self, method: str) -> str:
        """``method`` as tables and charts name it (CoOp's context kind and DP site when not the default)."""
        if method != "coop":
            return method
        parts = [method + (" class-specific" if self.finetune.get("class_specific") else "")]
        if self.finetune.get("dp_site", "parameters") != "parameters":
            parts.append(f"DP at the {self.finetune['dp_site']}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epsilons"] = [eps_text(e) for e in self.epsilons]
        return d

    def ft(self, method: str, eps: float, canaries: int = 0) -> FinetuneConfig:
        ft = dict(self.finetune)
        site = ft.pop("dp_site", "parameters")
        if method != "coop":  # CoOp-only options
            ft.pop("class_specific", None)
            site = "parameters"
        base = FinetuneConfig(**{**ft, "method": method, "seed": self.seed})
        if math.isinf(eps):
            return base
        return FinetuneConfig(**{**base.to_dict(), "dp": "per-example", "dp_site": site, "epsilon": float(eps),
                                 "delta": self.delta, "canaries": canaries})


def eps_text(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def parse_epsilons(text: str) -> list[float]:
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if not t:
            continue
        try:
            out.append(math.inf if t in ("inf", "infinity", "none") else float(t))
        except ValueError as e:
            raise ClipleakError(f"epsilons are numbers or inf, got {t!r}") from e
    return out


class _Store:
    """``cells.json``: finished cells by key, written atomically after each one."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.cells: dict[str, Any] = {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("config") != config:
                raise ClipleakError(f"{path} belongs to an audit with other settings; use another --out or "
                                    "delete it")
            self.cells = saved.get("cells", {})
        self.config = config

    def put(self, key: str, value: Any) -> None:
        self.cells[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config, "cells": self.cells}, indent=1))
        os.replace(tmp, self.path)


class _Context:
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
        return dp_setting(self.cfg.ft(method, eps), len(self.private))


def _arch(path: str) -> str:
    card = read_card(path) or {}
    return str(card.get("arch", "tiny-32"))


def _obs_cell(ctx: _Context, method: str, b: int, eps: float, i: int) -> dict[str, Any]:
    cfg = ctx.cfg
    t0 = time.perf_counter()
    setting = ctx.setting(method, eps)
    images, labels, idx = sample_batch(ctx.private, b, seed=i)
    obs = share(ctx.victims[method], images, labels, data=ctx.data_meta, dp=setting,
                dp_seed=derive_seed(cfg.seed, "observation", method, b, eps_text(eps), i))
    truth = Truth(images=images, labels=labels, meta={"private_indices": idx.tolist(), "seed": i})
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
    return {"psnr": m["attack"]["psnr_mean"], "ssim": m["attack"]["ssim_mean"],
            "prototype_psnr": m["prototype"]["psnr_mean"], "prototype_true_psnr": m["prototype-true"]["psnr_mean"],
            "reid": reid.get("attack"), "prototype_reid": reid.get("prototype"),
            "prototype_true_reid": reid.get("prototype-true"), "chance": reid.get("chance"),
            "label_accuracy": ev["label_accuracy"],
            "noise_multiplier": None if setting is None else setting.noise_multiplier,
            "epsilon": None if setting is None else setting.epsilon,
            "attack_seconds": round(t_attack, 3), "seconds": round(time.perf_counter() - t0, 3)}


def _acc_cell(ctx: _Context, method: str, eps: float, out: Path, canaries: int = 0) -> dict[str, Any]:
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


def cell_keys(cfg: AuditConfig) -> list[tuple[str, str, int, float, int]]:
    """Every cell of the sweep: (kind, method, batch size, epsilon, image) in the order they run."""
    keys: list[tuple[str, str, int, float, int]] = []
    for method in cfg.methods:
        for eps in cfg.epsilons:
            keys.append(("acc", method, 0, eps, 0))
            if cfg.canaries and not math.isinf(eps):
                keys.append(("canary", method, 0, eps, 0))
            for b in cfg.batch_sizes:
                keys.extend(("obs", method, int(b), eps, i) for i in range(cfg.images))
    return keys


def key_text(kind: str, method: str, b: int, eps: float, i: int) -> str:
    if kind == "obs":
        return f"obs|{method}|b{b}|eps{eps_text(eps)}|{i}"
    return f"{kind}|{method}|eps{eps_text(eps)}"


def run_audit(cfg: AuditConfig, out_dir: str | Path, *, progress: ProgressFn | None = None,
              threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep into ``out_dir``; write the table, chart and page; return the summary
    (``computed``: cells computed in this call)."""
    from .chart import summarise, write_outputs

    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        store = _Store(out / "cells.json", cfg.to_dict())
        keys = cell_keys(cfg)
        todo = [k for k in keys if key_text(*k) not in store.cells]
        ctx = _Context(cfg, progress) if todo else None
        t0 = time.perf_counter()
        for n, k in enumerate(todo):
            kind, method, b, eps, i = k
            if progress is not None:
                progress(ProgressEvent("audit", len(keys) - len(todo) + n, len(keys), note=key_text(*k)))
            assert ctx is not None
            if kind == "obs":
                value = _obs_cell(ctx, method, b, eps, i)
            else:
                value = _acc_cell(ctx, method, eps, out / "runs" / f"{kind}-{method}-eps{eps_text(eps)}",
                                  cfg.canaries if kind == "canary" else 0)
            store.put(key_text(*k), value)
        if progress is not None:
            progress(ProgressEvent("audit", len(keys), len(keys), phase="done"))
        summary = summarise(cfg, store.cells)
        summary["computed"] = len(todo)
        summary["seconds_this_run"] = round(time.perf_counter() - t0, 2)
        summary["files"] = write_outputs(out, summary)
        return summary
    finally:
        torch.set_num_threads(old)
