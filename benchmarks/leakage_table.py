"""The README's leakage table: attacks x priors on the trained tiny MNIST target, honest baselines beside.

For each observation kind (CoOp prompt, CLIP-Adapter) and batch size, clients draw private digits; every
attack runs on the same observations; each row reports mean PSNR, SSIM and re-identification (the
reconstruction picks its client's true digit out of K=10 private digits of its class; chance 10%; batches
scored one-to-one: one truth counts once however many reconstructions claim it), label accuracy (the
label multiset) and seconds per batch.
Baseline rows: class prototype (mean public image of the attacker's label)
and public nearest neighbour in the target's feature space (of the attack's feature estimate).

    python benchmarks/leakage_table.py --images 8 --attacks "featmatch, decoder only"   # -> results/leakage.json

Seconds per batch of a featmatch row include the feature recovery (computed once per observation and
shared by the featmatch rows). Trained target and priors come from the artifact cache (built on first
use: tiny-mnist, tiny-mnist-vae, tiny-mnist-decoder).
"""

from __future__ import annotations

import argparse
import time

import torch

from clipleak.api import attack_observation, make_observation
from clipleak.client import load_private
from clipleak.data import public_for_observation
from clipleak.evaluation import evaluate, public_nearest_neighbour
from clipleak.peft import PeftConfig, rebuild_victim
from clipleak.recover import recovered_features
from clipleak.report.results import Cell, markdown_table, provenance, write_results

ATTACKS = {
    "ig, prior none": dict(name="ig", prior="none"),
    "ig, prior tv": dict(name="ig", prior="tv"),
    "ig, prior generative (VAE latent)": dict(name="ig", prior="generative:tiny-mnist-vae", lr=0.05),
    "featmatch, prior none": dict(name="featmatch", prior="none", lr=0.05),
    "featmatch, prior tv": dict(name="featmatch", prior="tv", lr=0.05),
    "featmatch, VAE latent search (random starts)": dict(name="featmatch", prior="generative:tiny-mnist-vae",
                                                         lr=0.05),
    "featmatch, decoder only": dict(name="featmatch", decoder="tiny-mnist-decoder", iterations=0),
    "featmatch, decoder + VAE latent search": dict(name="featmatch", decoder="tiny-mnist-decoder",
                                                   prior="generative:tiny-mnist-vae", lr=0.05),
}

COLUMNS = [("method", "observation"), ("batch", "batch"), ("attack", "attack"), ("n_images", "n"),
           ("reid", "re-id [95% CI]"), ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("labels", "labels"),
           ("prototype_reid", "prototype re-id"), ("prototype_psnr", "prototype dB"), ("nn_reid", "public NN re-id"),
           ("nn_psnr", "public NN dB"), ("seconds_per_batch", "s / batch")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8,
                    help="private images per (method, batch) cell; at 8 a rate's 95%% interval is about +-30 points "
                         "(40 images: +-15), so the default favours time over precision")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--methods", default="adapter,coop")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--attacks", default="", help="subset of row names separated by ';' (default all)")
    ap.add_argument("--weights", default="tiny-mnist")
    ap.add_argument("--draw-seed", type=int, default=0, help="first batch-draw seed (draws D, D+1, ...)")
    ap.add_argument("--name", default="leakage", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wanted = [a.strip() for a in args.attacks.split(";") if a.strip()]
    unknown = [a for a in wanted if a not in ATTACKS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; rows: {list(ATTACKS)}")
    chosen = {k: v for k, v in ATTACKS.items() if not wanted or k in wanted}
    batches = [int(b) for b in args.batches.split(",")]
    prov = provenance(split="private", draw_seeds=range(args.draw_seed, args.draw_seed + max(1, args.images)),
                      images=args.images, threads=args.threads)
    rows = []
    for method in args.methods.split(","):
        for batch in batches:
            acc = {row: Cell.new() for row in chosen}
            n_draws = max(1, args.images // batch)
            for draw in range(n_draws):
                obs, truth = make_observation(weights=args.weights, peft=PeftConfig(method=method), batch_size=batch,
                                              seed=args.draw_seed + draw)
                spec, public = public_for_observation(obs.meta)
                private = load_private(spec, int(obs.meta["image_size"]))
                victim = rebuild_victim(obs)
                protos = public.prototypes()
                fit_s = 0.0
                if method in ("adapter", "coop"):  # featmatch rows share one feature recovery (cached); time it once
                    t0 = time.perf_counter()
                    recovered_features(obs, victim)
                    fit_s = time.perf_counter() - t0
                for row, kw in chosen.items():
                    if method not in ("adapter", "coop") and kw["name"] == "featmatch":
                        continue
                    kw = dict(kw)
                    name = kw.pop("name")
                    cfg = {"iterations": args.iterations, "restarts": args.restarts, "seed": draw, **kw}
                    t0 = time.perf_counter()
                    rec = attack_observation(obs, name=name, **cfg)
                    sec = time.perf_counter() - t0 + (fit_s if name == "featmatch" else 0.0)
                    with torch.no_grad():
                        est = rec.features if rec.features is not None else victim.raw_image_features(rec.images)
                    nn_img, _ = public_nearest_neighbour(victim, public, est, rec.labels)
                    ev = evaluate(rec, truth, protos, with_lpips=False, reid_pool=private,
                                  extra_baselines={"public-nn": nn_img})
                    acc[row].add_evaluation(ev, {"attack": "", "prototype": "prototype_", "public-nn": "nn_"},
                                            seconds=sec)
                    print(f"{method} b={batch} draw {draw} {row}: {ev['methods']['attack']['psnr_mean']:.1f} dB "
                          f"reid {ev['reidentification']['attack']:.0%} ({sec:.1f} s)", flush=True)
            for row in chosen:
                if acc[row].sizes:
                    rows.append(acc[row].row(case=f"{row}, {method}, batch {batch}", method=method, batch=batch,
                                             attack=row))
    notes = ("Trained target tiny-mnist, private digits; one-to-one re-identification among K = 10 candidates "
             "(chance 10%); intervals 95% (Wilson over the images for rates, bootstrap for means). Seconds of "
             "a featmatch row include the feature recovery.")
    path = write_results(args.name, rows, prov, title="Attacks and priors on the trained target (private digits)",
                         columns=COLUMNS, notes=notes)
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
