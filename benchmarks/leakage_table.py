"""The README's leakage table: attacks x priors on the trained tiny MNIST target, honest baselines beside.

For each observation kind (CoOp prompt, CLIP-Adapter) and batch size, clients draw private digits; every
attack runs on the same observations; each row reports mean PSNR, SSIM and re-identification (the
reconstruction picks its client's true digit out of K=10 private digits of its class; chance 10%; batches
scored one-to-one: one truth counts once however many reconstructions claim it), label accuracy (the
label multiset), the share of the batch the feature recovery separated, and seconds per batch.
Baseline rows: class prototype (mean public image of the attacker's label)
and public nearest neighbour in the target's feature space (of the attack's feature estimate).

    python benchmarks/leakage_table.py --images 8 --json runs/leakage.json

Seconds per batch of a featmatch row include the feature recovery (computed once per observation and
shared by the featmatch rows). Trained target and priors come from the artifact cache (built on first
use: tiny-mnist, tiny-mnist-vae, tiny-mnist-decoder).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from clipleak.api import attack_observation, make_observation, public_for
from clipleak.client import load_private
from clipleak.evaluation import evaluate, public_nearest_neighbour
from clipleak.peft import rebuild_victim
from clipleak.recover import recovered_features

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="private images per (method, batch) cell")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--methods", default="adapter,coop")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--attacks", default="", help="subset of row names separated by ';' (default all)")
    ap.add_argument("--weights", default="tiny-mnist")
    ap.add_argument("--seed-offset", type=int, default=0, help="first batch-draw seed (draws seed, seed+1, ...)")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [a.strip() for a in args.attacks.split(";") if a.strip()]
    unknown = [a for a in wanted if a not in ATTACKS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; rows: {list(ATTACKS)}")
    chosen = {k: v for k, v in ATTACKS.items() if not wanted or k in wanted}
    rows = []
    for method in args.methods.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            n_draws = max(1, args.images // batch)
            for draw in range(n_draws):
                obs, truth = make_observation(weights=args.weights, method=method, batch_size=batch,
                                              seed=args.seed_offset + draw)
                spec, public = public_for(obs.meta)
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
                    for m in ("attack", "prototype", "public-nn"):
                        acc[f"{row}|{m}"]["psnr"].append(ev["methods"][m]["psnr_mean"])
                        acc[f"{row}|{m}"]["ssim"].append(ev["methods"][m]["ssim_mean"])
                        acc[f"{row}|{m}"]["reid"].append(ev["reidentification"][m])
                    acc[f"{row}|attack"]["labels"].append(ev["label_count_accuracy"])
                    sep = (rec.meta.get("feature_recovery") or {}).get("images_separated")
                    if sep is not None:
                        acc[f"{row}|attack"]["separated"].append(sep / batch)
                    acc[f"{row}|attack"]["seconds"].append(sec)
                    print(f"{method} b={batch} draw {draw} {row}: {ev['methods']['attack']['psnr_mean']:.1f} dB "
                          f"reid {ev['reidentification']['attack']:.0%} ({sec:.1f} s)", flush=True)
            for key, vals in acc.items():
                row, m = key.split("|")
                rows.append({"method": method, "batch": batch, "attack": row, "scored": m,
                             **{k: sum(v) / len(v) for k, v in vals.items()}, "n_images": n_draws * batch})
    print()
    print("| observation | batch | attack | scored | PSNR dB | SSIM | re-id (one-to-one) | labels (multiset) | "
          "separated | s/batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['batch']} | {r['attack']} | {r['scored']} | {r['psnr']:.1f} | {r['ssim']:.2f} | "
              f"{r['reid']:.0%} | {r.get('labels', float('nan')):.0%} | {r.get('separated', float('nan')):.0%} | "
              f"{r.get('seconds', float('nan')):.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
