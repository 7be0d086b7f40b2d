"""Does clipping, or the noise, keep the feature fit above its noise floor? (docs/audit.md, "Noise-aware fits")

The audit's adapter cell at epsilon 1e6 (sigma 0.0105, C 0.01, batch 4) ends its feature fit at a relative
residual of 0.845 against a noise floor of 0.447. The fit models the *unclipped* batch gradient (the mean of
the per-example gradients); with C = 0.01 some per-example gradients are scaled down by the clipping. This
script takes the same private batches (draw seeds as the audit's) and shares them four ways, one factor at a
time:

* ``clip+noise``: C 0.01, sigma 0.0105 (the audit's cell, same noise seed);
* ``clip only``:  C 0.01, sigma 0;
* ``noise only``: C = ``--big-clip`` (1: no adapter per-example gradient is clipped, their norms are about
  0.01), sigma chosen so that the noise has the same absolute std sigma C as in the audit's cell (1.05e-4),
  same noise seed;
* ``neither``:    C = ``--big-clip``, sigma 0.

and reports, per case, the fit's relative residual, the floor the noise alone would leave, the fraction of
examples the clipping scaled, the recovered features' cosine to the truth, re-identification and PSNR (the
audit's scoring: featmatch + the decoder, labels inferred). ``--unmodelled``: the fit without its model of
the clipping (as before it read C off the defense).

The CoOp fit does not model clipping; ``--method coop --class-specific --batch 2`` asks the same question of
the CoOp audit's cells (its noise floor is computed in the fit's reduced coordinates).

Run:  python benchmarks/clip_fit_isolation.py [--method adapter] [--batch 4] [--draws 0,1] [--unmodelled]
      [--method coop --class-specific --batch 2 --big-clip 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from clipleak.attacks import make_config, run_attack
from clipleak.audit import AuditConfig, AuditContext
from clipleak.client import sample_batch, share
from clipleak.evaluation import evaluate
from clipleak.peft import rebuild_victim
from clipleak.privacy import DpSetting, global_norm, per_example_gradients
from clipleak.records import Truth
from clipleak.training import derive_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="adapter")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--draws", default="0,1")
    ap.add_argument("--epsilon", default="1e+06", help="the audit cell whose noise seed is reused")
    ap.add_argument("--sigma", type=float, default=0.010466, help="the audit's sigma at that epsilon (C 0.01)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--big-clip", type=float, default=1.0,
                    help="the C of the unclipped cases, above every per-example norm (adapter: 1; class-specific "
                         "CoOp's norms reach 1: use 1000)")
    ap.add_argument("--class-specific", action="store_true", help="coop: one context per class")
    ap.add_argument("--unmodelled", action="store_true",
                    help="the fit as it was before it modelled the clipping (C not read off the defense)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.unmodelled:
        import clipleak.recover.features as features

        features.modelled_clip = lambda obs: None
    ft = {**AuditConfig().finetune, **({"class_specific": True} if args.class_specific else {})}
    cfg = AuditConfig(epsilons=[math.inf], methods=[args.method], batch_sizes=[args.batch], finetune=ft)
    ctx = AuditContext(cfg, None)
    victim = ctx.victims[args.method]
    std = args.sigma * 0.01
    big = args.big_clip
    cases = {"clip+noise": (0.01, args.sigma), "clip only": (0.01, 0.0), "noise only": (big, std / big),
             "neither": (big, 0.0)}
    rows = []
    for i in [int(d) for d in args.draws.split(",")]:
        images, labels, idx = sample_batch(ctx.private, args.batch, seed=i)
        norms = global_norm(per_example_gradients(victim, images, labels), batched=True)
        for name, (c, sigma) in cases.items():
            dp = DpSetting("per-example", clip=c, noise_multiplier=sigma)
            seed = derive_seed(cfg.seed, "observation", args.method, args.batch, args.epsilon, i)
            obs = share(victim, images, labels, data=ctx.data_meta, dp=dp, dp_seed=seed)
            truth = Truth(images=images, labels=labels, meta={"private_indices": idx.tolist(), "seed": i})
            attacker = rebuild_victim(obs, ctx.path)
            rec = run_attack("featmatch", obs, attacker, make_config("featmatch", iterations=0, labels="auto",
                                                                     decoder=ctx.decoder, prior="none"))
            ev = evaluate(rec, truth, ctx.prototypes, with_lpips=False, reid_pool=ctx.private, reid_k=cfg.reid_k)
            fr = rec.meta["feature_recovery"]
            with torch.no_grad():  # the evaluator's paired cosine of the recovered features to the truth's
                true_feats = F.normalize(victim.raw_image_features(images), dim=-1)
            cos = float((F.normalize(rec.features.float(), dim=-1)[torch.tensor(ev["pairing"])] * true_feats)
                        .sum(-1).mean()) if rec.features is not None else None
            row = {"draw": i, "case": name, "clip": c, "sigma": sigma, "noise_std": sigma * c,
                   "clipped_fraction": float((norms > c).float().mean()),
                   "per_example_norms": [round(float(n), 5) for n in norms],
                   "relative_residual": fr["relative_residual"], "noise_floor": fr["expected_noise_residual"],
                   "feature_cosine": cos,
                   "reid": (ev["reidentification"] or {}).get("attack"), "psnr": ev["methods"]["attack"]["psnr_mean"],
                   "labels": ev["label_accuracy"]}
            rows.append(row)
            floor = "-" if row["noise_floor"] is None else f"{row['noise_floor']:.3f}"
            cos = "-" if row["feature_cosine"] is None else f"{row['feature_cosine']:.3f}"
            print(f"draw {i} {name:11s} C {c:g} sigma {sigma:.3g}: clipped {row['clipped_fraction']:.0%}, residual "
                  f"{row['relative_residual']:.3f} (floor {floor}), feature cos {cos}, re-id {row['reid']:.0%}, "
                  f"PSNR {row['psnr']:.1f} dB, labels {row['labels']:.0%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
