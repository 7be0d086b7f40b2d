"""Zero-shot accuracy of a pretrained target CLIP against wall time of training.

For each time budget it runs :func:`clipleak.training.pretrain` with the learning-rate schedule fitted to
that budget (``steps=None, time_budget_s=B``) and measures zero-shot accuracy on the private split every
``--every`` seconds of training (evaluation time is not counted), then prints one table row per
measurement and a summary per budget (final accuracy with the prompt "a photo of a {}." and with the
template ensemble). ``--steps N`` instead runs one fixed-length schedule (the artifact recipe).

The machine's load average is printed at the start and end of every run: on a 2-core machine shared with
other busy processes, timings (and a 2-thread run in particular) can be several times slower.

Run:  PYTHONPATH=src python benchmarks/pretrain.py [--budgets 60,120,240] [--every 15] [--threads 2]
                                                   [--steps 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipleak.training.pretrain import PretrainConfig, pretrain


def run_one(cfg: PretrainConfig, every: float, threads: int | None, label: str) -> dict[str, Any]:
    """One pretraining run with an accuracy curve; returns the curve and the card's summary."""
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        card = pretrain(cfg, Path(tmp) / "model.safetensors", eval_every_s=every, threads=threads)
        wall = time.perf_counter() - t0
    zs = card["zero_shot"] or {}
    return {
        "run": label,
        "config": cfg.to_dict(),
        "threads": card["torch_threads"],
        "load_avg_start": round(load0, 2),
        "load_avg_end": round(os.getloadavg()[0], 2),
        "steps_done": card["steps_done"],
        "steps_planned": card["steps_planned"],
        "train_seconds": card["train_seconds"],
        "seconds_per_step": card["seconds_per_step"],
        "wall_seconds": round(wall, 1),
        "final_loss": card["final_loss"],
        "accuracy": zs.get("accuracy"),
        "ensemble_accuracy": zs.get("ensemble_accuracy"),
        "random_init_accuracy": zs.get("random_init_accuracy"),
        "curve": card["curve"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="60,120,240", help="comma-separated training budgets in seconds")
    ap.add_argument("--steps", type=int, default=None, help="one fixed-length run instead of budgets")
    ap.add_argument("--every", type=float, default=15.0, help="seconds of training between evaluations")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--arch", default="tiny-32")
    ap.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=PretrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=PretrainConfig.warmup_steps)
    ap.add_argument("--patch-dropout", type=float, default=PretrainConfig.patch_dropout)
    ap.add_argument("--no-augment", action="store_true", help="no random affine augmentation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    base = dict(arch=args.arch, data=args.data, batch_size=args.batch_size, lr=args.lr,
                warmup_steps=args.warmup, seed=args.seed, patch_dropout=args.patch_dropout,
                augment=not args.no_augment, checkpoint_every=10**9)
    if args.steps is not None:
        plans = [(f"{args.steps} steps", PretrainConfig(steps=args.steps, **base))]
    else:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        plans = [(f"budget {b:g} s", PretrainConfig(steps=None, time_budget_s=b, **base)) for b in budgets]

    results = []
    for label, cfg in plans:
        print(f"== {label}: {args.arch} on {args.data}, batch {args.batch_size}, lr {args.lr:g}, "
              f"warmup {args.warmup} (<= 10% of the steps), patch dropout {args.patch_dropout:g}, "
              f"augment {not args.no_augment}, threads {args.threads or torch.get_num_threads()}", flush=True)
        r = run_one(cfg, args.every, args.threads, label)
        results.append(r)
        print(f"{'train s':>8} {'step':>6} {'zero-shot acc':>14}")
        for pt in r["curve"]:
            print(f"{pt['train_seconds']:8.1f} {pt['step']:6d} {pt['accuracy']:14.3f}")
        print(f"{r['train_seconds']:8.1f} {r['steps_done']:6d} {r['accuracy']:14.3f}  (final; ensemble "
              f"{r['ensemble_accuracy']:.3f}; random init {r['random_init_accuracy']:.3f})")
        print(f"   {r['seconds_per_step']:.3f} s/step, load average {r['load_avg_start']} -> "
              f"{r['load_avg_end']}\n", flush=True)

    print(f"{'run':>16} {'steps':>6} {'train s':>8} {'s/step':>7} {'acc':>6} {'ens acc':>8} {'load':>10}")
    for r in results:
        print(f"{r['run']:>16} {r['steps_done']:6d} {r['train_seconds']:8.1f} {r['seconds_per_step']:7.3f} "
              f"{r['accuracy']:6.3f} {r['ensemble_accuracy']:8.3f} "
              f"{r['load_avg_start']:>4}->{r['load_avg_end']:<4}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
