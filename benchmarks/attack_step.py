"""Seconds per attack iteration vs. one plain forward+backward of the same model.

For each (architecture, PEFT method, batch size) it times
  * plain: the client's forward + backward of the PEFT gradient (what sharing costs), and
  * one engine iteration of every gradient-matching preset (dlg, idlg, ig, gradvit; see
    :mod:`clipleak.attacks.gradient_matching`), run through the attack itself: forward, gradient with
    create_graph, gradient distance, the preset's priors (gradvit: BN prior of ``tiny-mnist-cnn``,
    patch-border TV, l2, switched on at half the run), backward to the image (and to the soft labels for
    dlg), the optimiser step (Adam or L-BFGS) and the box. Labels: dlg optimises them jointly (its
    recipe); the others get the observation's labels (iDLG's analytic read-out runs once, before the
    loop, and is not timed). The per-iteration time is the difference between a run of ``W + R`` and
    one of ``W`` iterations, over ``R`` (restart set-up and the final evaluation cancel out); the
    measured iterations straddle gradvit's switch, so half of them pay for the priors.
and prints the ratio step/plain (goal: at most 3.5x). Random-init weights: timing does not depend on
training. Run:  python benchmarks/attack_step.py [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from clipleak import artifacts
from clipleak.attacks import PRESETS, run_attack
from clipleak.client import share
from clipleak.models import build_model
from clipleak.peft import PeftConfig, build_victim

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _time(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench(arch: str, method: str, batch: int, repeats: int, presets: list[str]) -> list[dict[str, Any]]:
    clip = build_model(arch)
    victim = build_victim(clip, NAMES, PeftConfig(method=method))
    s = clip.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, s, s, generator=g)
    y = torch.arange(batch) % len(NAMES)
    obs = share(victim, x, y, include_labels=True)  # dlg ignores them (labels="infer")
    params = list(victim.trainable().values())

    def plain() -> None:
        loss = victim.loss(x, y)
        torch.autograd.grad(loss, params)

    t_plain = _time(plain, repeats)
    rows = []
    for name in presets:
        cls = PRESETS[name]
        extra: dict[str, Any] = {"labels": "infer" if name == "dlg" else "known"}
        if getattr(cls, "bn_prior", None):
            extra["bn_prior"] = artifacts.resolve_path(str(cls.bn_prior))

        def run(iterations: int, cls: Any = cls, extra: dict[str, Any] = extra, name: str = name) -> float:
            cfg = cls(iterations=iterations, restarts=1, **extra)
            return float(run_attack(name, obs, victim, cfg).meta["seconds"])

        warm = repeats
        run(2)  # warm-up (first autograd graph, prior network load)
        t_step = (run(warm + 2 * repeats) - run(warm)) / (2 * repeats)
        rows.append({"arch": arch, "method": method, "batch": batch, "image_size": s, "preset": name,
                     "trainable_params": sum(p.numel() for p in params),
                     "plain_s": t_plain, "step_s": t_step, "ratio": t_step / t_plain})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: all)")
    ap.add_argument("--methods", default="full-visual,coop", help="comma-separated PEFT methods")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    cases = [("tiny-32", m, b, 10) for m in methods for b in (1, 4)]
    if not args.quick:
        cases += [("ViT-B-32", m, b, 2) for m in methods for b in (1, 4)]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'arch':10s} {'method':12s} {'batch':>5s} {'preset':8s} {'plain s':>9s} {'step s':>9s} {'ratio':>6s}")
    for arch, method, batch, rep in cases:
        for r in bench(arch, method, batch, rep, presets):
            rows.append(r)
            print(f"{arch:10s} {method:12s} {batch:5d} {r['preset']:8s} {r['plain_s']:9.4f} {r['step_s']:9.4f} "
                  f"{r['ratio']:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
