"""Zero-shot accuracy of a pretrained target CLIP against wall time of training.

For each time budget it runs :func:`clipleak.training.pretrain` with the learning-rate schedule fitted to
that budget (``steps=None, time_budget_s=B``) and measures zero-shot accuracy on the validation split every
``--every`` seconds of training (evaluation time is not counted), then prints the curve of each run and a
table with one row per run (final accuracy with the prompt "a photo of a {}." and with the template
ensemble, each with its 95% Wilson interval over the validation images). ``--steps N`` instead runs one
fixed-length schedule (the artifact recipe).

Each row records the machine's load average at the start and end of its run: on a 2-core machine shared
with other busy processes, timings (and a 2-thread run in particular) can be several times slower.
Rows (one per run, with its accuracy curve) and the run's provenance go to benchmarks/results/<name>.json.

    python benchmarks/pretrain.py                                   # budgets 60, 120, 240 s
    python benchmarks/pretrain.py --budgets 60,120 --every 15 --threads 2 --name pretrain-budgets
    python benchmarks/pretrain.py --steps 400 --name pretrain-recipe  # the artifact recipe's schedule
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipleak.evaluation import rate_interval
from clipleak.report.results import markdown_table, provenance, write_results
from clipleak.training.pretrain import PretrainConfig, pretrain

COLUMNS = [("run", "run"), ("steps_done", "steps"), ("train_seconds", "train s"),
           ("seconds_per_step", "s / step"), ("n_images", "n (validation)"), ("accuracy", "zero-shot accuracy"),
           ("ensemble_accuracy", "ensemble accuracy"), ("random_init_accuracy", "random init"),
           ("load", "load average")]
CURVE_COLUMNS = [("train_seconds", "train s"), ("step", "step"), ("accuracy", "zero-shot accuracy")]


def _rate(value: float | None, n: int) -> dict[str, Any] | None:
    return None if value is None else {**rate_interval(value, n).to_dict(), "kind": "rate"}


def run_one(cfg: PretrainConfig, every: float, threads: int | None, label: str) -> dict[str, Any]:
    """One pretraining run with an accuracy curve; returns the curve and the card's summary."""
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        card = pretrain(cfg, Path(tmp) / "model.safetensors", eval_every_s=every, threads=threads)
        wall = time.perf_counter() - t0
    zs = card["zero_shot"] or {}
    n = int(zs.get("n_images", 0))
    load1 = round(os.getloadavg()[0], 2)
    return {
        "run": label,
        "config": cfg.to_dict(),
        "threads": card["torch_threads"],
        "load_avg_start": round(load0, 2),
        "load_avg_end": load1,
        "load": f"{round(load0, 2)} -> {load1}",
        "steps_done": card["steps_done"],
        "steps_planned": card["steps_planned"],
        "train_seconds": card["train_seconds"],
        "seconds_per_step": card["seconds_per_step"],
        "wall_seconds": round(wall, 1),
        "final_loss": card["final_loss"],
        "n_images": n,
        "accuracy": _rate(zs.get("accuracy"), n),
        "ensemble_accuracy": _rate(zs.get("ensemble_accuracy"), n),
        "random_init_accuracy": _rate(zs.get("random_init_accuracy"), n),
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
    ap.add_argument("--name", default="pretrain", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()

    base = dict(arch=args.arch, data=args.data, batch_size=args.batch_size, lr=args.lr,
                warmup_steps=args.warmup, seed=args.seed, patch_dropout=args.patch_dropout,
                augment=not args.no_augment, checkpoint_every=10**9)
    if args.steps is not None:
        plans = [(f"{args.steps} steps", PretrainConfig(steps=args.steps, **base))]
    else:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        plans = [(f"budget {b:g} s", PretrainConfig(steps=None, time_budget_s=b, **base)) for b in budgets]

    threads = args.threads or torch.get_num_threads()
    prov = provenance(split="validation", draw_seeds=[], images=0, threads=threads)
    notes = (f"Contrastive pretraining of {args.arch} on {args.data}'s public split (batch {args.batch_size}, "
             f"lr {args.lr:g}, warmup {args.warmup}, patch dropout {args.patch_dropout:g}, augment "
             f"{not args.no_augment}, seed {args.seed}); zero-shot accuracy with the prompt \"a photo of a {{}}.\" "
             "and with the template ensemble on the validation split, each with its 95% Wilson interval over "
             "those images; seconds are training time only (evaluation not counted).")
    rows = []
    for label, cfg in plans:
        print(f"== {label}: {args.arch} on {args.data}, batch {args.batch_size}, lr {args.lr:g}, "
              f"warmup {args.warmup} (<= 10% of the steps), patch dropout {args.patch_dropout:g}, "
              f"augment {not args.no_augment}, threads {threads}", flush=True)
        r = run_one(cfg, args.every, args.threads, label)
        rows.append(r)
        prov["images"] = max(int(prov["images"]), r["n_images"])
        if r["curve"]:
            print(markdown_table([h for _, h in CURVE_COLUMNS], [[pt.get(k) for k, _ in CURVE_COLUMNS]
                                                                   for pt in r["curve"]]), flush=True)
        path = write_results(args.name, rows, prov, title="Zero-shot accuracy of the pretrained target against "
                             "training time", columns=COLUMNS, notes=notes)  # kept after every run
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
