"""Seconds per attack iteration vs. one plain forward+backward of the same model.

For each (architecture, PEFT method, batch size) it times
  * plain: the client's forward + backward of the PEFT gradient (what sharing costs), and
  * step: one Inverting Gradients iteration (forward, gradient with create_graph, cosine to the
    observed gradient, TV, backward to the image, Adam step) on the math attention kernel,
and prints the ratio step/plain (goal: at most 3.5x). Random-init weights: timing does not depend on
training. Run:  python benchmarks/attack_step.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clipleak.attacks import gradient_matching_term
from clipleak.client import share
from clipleak.engine import State, total_variation
from clipleak.models import build_model, math_attention
from clipleak.peft import PeftConfig, build_victim

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench(arch: str, method: str, batch: int, repeats: int) -> dict:
    clip = build_model(arch)
    victim = build_victim(clip, NAMES, PeftConfig(method=method))
    s = clip.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, s, s, generator=g)
    y = torch.arange(batch) % len(NAMES)
    obs = share(victim, x, y)
    params = list(victim.trainable().values())

    def plain() -> None:
        loss = victim.loss(x, y)
        torch.autograd.grad(loss, params)

    term = gradient_matching_term(victim, obs)
    cand = torch.rand(batch, 3, s, s, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([cand], lr=0.1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with math_attention():
            st = State(images=cand, labels=y, iteration=0, iterations=1)
            loss = term.fn(st) + 0.05 * total_variation(cand)
            loss.backward()
        cand.grad.sign_()
        opt.step()
        with torch.no_grad():
            cand.clamp_(0, 1)

    t_plain = _time(plain, repeats)
    t_step = _time(step, repeats)
    return {"arch": arch, "method": method, "batch": batch, "image_size": s,
            "trainable_params": sum(p.numel() for p in params),
            "plain_s": t_plain, "step_s": t_step, "ratio": t_step / t_plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("tiny-32", m, b, 10) for m in ("coop", "full-visual") for b in (1, 4)]
    if not args.quick:
        cases += [("ViT-B-32", m, b, 2) for m in ("coop", "full-visual") for b in (1, 4)]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'arch':10s} {'method':12s} {'batch':>5s} {'plain s':>9s} {'step s':>9s} {'ratio':>6s}")
    for arch, method, batch, rep in cases:
        r = bench(arch, method, batch, rep)
        rows.append(r)
        print(f"{arch:10s} {method:12s} {batch:5d} {r['plain_s']:9.4f} {r['step_s']:9.4f} {r['ratio']:6.2f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
