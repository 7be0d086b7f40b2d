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
and prints the ratio step/plain (goal: at most 3.5x). The timings are *interleaved*: each of ``--blocks``
blocks times plain, then every preset, so a load change on a shared machine hits all of them alike; the
table gives the median and the minimum over the blocks of each time and of the per-block ratio (the
minimum is the least disturbed figure on a busy machine). Random-init weights: timing does not depend
on training. Run:  python benchmarks/attack_step.py [--quick] [--threads 1] [--blocks 5]
ViT-B-32 (open_clip config, random init, nothing downloaded) runs full-visual at batch 1 only, presets
``--vit-presets`` (``--vit-b-32``; one attack step there is seconds on one CPU thread).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipleak import artifacts
from clipleak.attacks import PRESETS, run_attack
from clipleak.client import share
from clipleak.models import build_model
from clipleak.peft import PeftConfig, build_victim
from clipleak.priors import PriorCNN, load_prior, save_prior
from clipleak.report.results import markdown_table, provenance, write_results

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _time(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _cnn_for(image_size: int, default: str) -> str:
    """The preset's prior network at 32 px; at other sizes a random-init PriorCNN of that size (timing only)."""
    path = str(artifacts.resolve_path(default))
    if load_prior(path).image_size == image_size:
        return path
    out = Path(tempfile.mkdtemp()) / f"cnn-{image_size}.safetensors"
    torch.manual_seed(0)
    save_prior(PriorCNN(image_size=image_size, channels=3), out)
    return str(out)


def bench(arch: str, method: str, batch: int, repeats: int, presets: list[str], blocks: int = 5,
          cnn: str | None = None) -> list[dict[str, Any]]:
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

    runners = {}
    for name in presets:
        cls = PRESETS[name]
        extra: dict[str, Any] = {"labels": "infer" if name == "dlg" else "known"}
        if getattr(cls, "bn_prior", None):
            extra["bn_prior"] = cnn or _cnn_for(s, str(cls.bn_prior))

        def run(iterations: int, cls: Any = cls, extra: dict[str, Any] = extra, name: str = name) -> float:
            cfg = cls(iterations=iterations, restarts=1, **extra)
            return float(run_attack(name, obs, victim, cfg).meta["seconds"])

        run(2)  # warm-up (first autograd graph, prior network load)
        runners[name] = run
    _time(plain, 1)
    times: dict[str, list[float]] = {"plain": [], **{n: [] for n in presets}}
    for _ in range(blocks):  # interleaved: plain, then every preset, in each block
        times["plain"].append(_time(plain, repeats, warmup=0))
        for name, run in runners.items():
            warm = repeats
            times[name].append((run(warm + 2 * repeats) - run(warm)) / (2 * repeats))
    rows = []
    for name in presets:
        ratios = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
        rows.append({"arch": arch, "method": method, "batch": batch, "image_size": s, "preset": name,
                     "trainable_params": sum(p.numel() for p in params), "blocks": blocks,
                     "plain_s": statistics.median(times["plain"]), "plain_min_s": min(times["plain"]),
                     "step_s": statistics.median(times[name]), "step_min_s": min(times[name]),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_of_minima": min(times[name]) / min(times["plain"]),
                     "plain_all_s": times["plain"], "step_all_s": times[name]})
    return rows

COLUMNS = [("arch", "arch"), ("method", "method"), ("batch", "batch"), ("preset", "attack"),
           ("plain_s", "plain s (median)"), ("step_s", "step s (median)"), ("ratio", "step / plain (median)"),
           ("ratio_of_minima", "step / plain (minima)")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--name", default="attack_step", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: all)")
    ap.add_argument("--methods", default="full-visual,coop", help="comma-separated PEFT methods")
    ap.add_argument("--blocks", type=int, default=5, help="interleaved timing blocks (median and minimum)")
    ap.add_argument("--vit-b-32", action="store_true", help="also ViT-B-32 full-visual at batch 1")
    ap.add_argument("--vit-presets", default="ig,gradvit", help="presets timed on ViT-B-32")
    ap.add_argument("--arch", default="tiny-32", help="the tiny architecture (tiny-32, tiny-64)")
    ap.add_argument("--cnn", help="GradViT's prior network file or artifact (default: the preset's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    cnn = artifacts.resolve_path(args.cnn) if args.cnn else None
    cases = [(args.arch, m, b, 10, args.blocks, presets) for m in methods for b in (1, 4)]
    if args.vit_b_32 or not args.quick:
        vit = [p for p in args.vit_presets.split(",") if p]
        cases += [("ViT-B-32", "full-visual", 1, 1, max(2, args.blocks // 2), vit)]
    prov = provenance(split="none (timing)", draw_seeds=[], images=0, threads=torch.get_num_threads())
    rows = []
    for arch, method, batch, rep, blocks, names in cases:
        for r in bench(arch, method, batch, rep, names, blocks,
                       cnn=cnn if arch == args.arch else None):
            rows.append(r)
            print(f"{arch} {method} b={batch} {r['preset']}: step / plain {r['ratio']:.2f} (median), "
                  f"{r['ratio_of_minima']:.2f} (minima)", flush=True)
    path = write_results(args.name, rows, prov, title="Attack step against a plain forward + backward",
                         columns=COLUMNS, notes="Interleaved timing blocks; ratio of medians and of minima.")
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
