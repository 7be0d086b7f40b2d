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
the clipping (C not read off the defense).

Draw ``i`` (of ``--draws``) takes its private batch with seed ``--draw-seed`` + i and its noise seed from i,
as the audit's point i does. One row per case, pooled over the draws: re-identification and label accuracy
with their 95% Wilson intervals over the images, PSNR and the feature cosine with bootstrap intervals over
the images, the residual and its floor as plain means over the draws; the per-draw figures stay in the row. Rows
and the run's provenance go to benchmarks/results/<name>.json.

The CoOp fit does not model clipping; ``--method coop --class-specific --batch 2`` asks the same question of
the CoOp audit's cells (its noise floor is computed in the fit's reduced coordinates).

    python benchmarks/clip_fit_isolation.py                            # adapter, batch 4, draws 0 and 1
    python benchmarks/clip_fit_isolation.py --draws 0,1,2,3 --unmodelled --name clip_fit_isolation-unmodelled
    python benchmarks/clip_fit_isolation.py --method coop --class-specific --batch 2 --big-clip 1000 --name cfi-coop
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F

from clipleak.attacks import make_config, run_attack
from clipleak.audit import AuditConfig, AuditContext
from clipleak.client import sample_batch, share
from clipleak.evaluation import evaluate
from clipleak.peft import rebuild_victim
from clipleak.privacy import DpSetting, global_norm, per_example_gradients
from clipleak.records import Truth
from clipleak.report.results import Cell, markdown_table, provenance, write_results
from clipleak.training import derive_seed

COLUMNS = [("case", "case"), ("clip", "C"), ("sigma", "sigma"), ("noise_std", "noise std"),
           ("n_images", "n"), ("clipped", "clipped"), ("relative_residual", "residual"),
           ("noise_floor", "noise floor"), ("feature_cosine", "feature cosine"), ("reid", "re-id [95% CI]"),
           ("psnr", "PSNR dB"), ("label_accuracy", "labels")]


def _mean(values: list[float]) -> float | None:
    """A mean over the draws (one value per batch, not per image: no interval)."""
    return sum(values) / len(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="adapter")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--draws", default="0,1", help="comma-separated draw indices i (the audit's points)")
    ap.add_argument("--draw-seed", type=int, default=0, help="draw i takes its batch with seed D + i (the audit's D)")
    ap.add_argument("--epsilon", default="1e+06", help="the audit cell whose noise seed is reused")
    ap.add_argument("--sigma", type=float, default=0.010466, help="the audit's sigma at that epsilon (C 0.01)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--big-clip", type=float, default=1.0,
                    help="the C of the unclipped cases, above every per-example norm (adapter: 1; class-specific "
                         "CoOp's norms reach 1: use 1000)")
    ap.add_argument("--class-specific", action="store_true", help="coop: one context per class")
    ap.add_argument("--unmodelled", action="store_true",
                    help="the fit as it was before it modelled the clipping (C not read off the defense)")
    ap.add_argument("--name", default="clip_fit_isolation", help="results file: benchmarks/results/NAME.json")
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
    draws = [int(d) for d in args.draws.split(",") if d.strip()]
    prov = provenance(split="private", draw_seeds=[args.draw_seed + i for i in draws], images=args.batch * len(draws),
                      threads=args.threads)
    per_draw: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    cells = {name: Cell.new() for name in cases}
    for i in draws:
        draw = args.draw_seed + i
        images, labels, idx = sample_batch(ctx.private, args.batch, seed=draw)
        norms = global_norm(per_example_gradients(victim, images, labels), batched=True)
        for name, (c, sigma) in cases.items():
            dp = DpSetting("per-example", clip=c, noise_multiplier=sigma)
            seed = derive_seed(cfg.seed, "observation", args.method, args.batch, args.epsilon, i)
            obs = share(victim, images, labels, data=ctx.data_meta, dp=dp, dp_seed=seed)
            truth = Truth(images=images, labels=labels, meta={"private_indices": idx.tolist(), "seed": draw})
            attacker = rebuild_victim(obs, ctx.path)
            rec = run_attack("featmatch", obs, attacker, make_config("featmatch", iterations=0, labels="auto",
                                                                     decoder=ctx.decoder, prior="none"))
            ev = evaluate(rec, truth, ctx.prototypes, with_lpips=False, reid_pool=ctx.private, reid_k=cfg.reid_k)
            fr = rec.meta["feature_recovery"]
            with torch.no_grad():  # the evaluator's paired cosine of the recovered features to the truth's
                true_feats = F.normalize(victim.raw_image_features(images), dim=-1)
            cosines = ((F.normalize(rec.features.float(), dim=-1)[torch.tensor(ev["pairing"])] * true_feats)
                       .sum(-1).tolist() if rec.features is not None else [])
            cos = sum(cosines) / len(cosines) if cosines else None
            row = {"draw": draw, "case": name, "clip": c, "sigma": sigma, "noise_std": sigma * c,
                   "clipped_fraction": float((norms > c).float().mean()),
                   "per_example_norms": [round(float(n), 5) for n in norms],
                   "relative_residual": fr["relative_residual"], "noise_floor": fr["expected_noise_residual"],
                   "feature_cosine": cos,
                   "reid": (ev["reidentification"] or {}).get("attack"), "psnr": ev["methods"]["attack"]["psnr_mean"],
                   "labels": ev["label_accuracy"]}
            per_draw[name].append(row)
            cell = cells[name]
            cell.add_evaluation(ev, {"attack": ""})
            cell.rates.setdefault("label_accuracy", []).append(float(ev["label_accuracy"]))
            cell.rates.setdefault("clipped", []).append(row["clipped_fraction"])
            cell.values.setdefault("feature_cosine", []).extend(float(c) for c in cosines)
            floor = "-" if row["noise_floor"] is None else f"{row['noise_floor']:.3f}"
            cos = "-" if row["feature_cosine"] is None else f"{row['feature_cosine']:.3f}"
            print(f"draw {i} {name:11s} C {c:g} sigma {sigma:.3g}: clipped {row['clipped_fraction']:.0%}, residual "
                  f"{row['relative_residual']:.3f} (floor {floor}), feature cos {cos}, re-id {row['reid']:.0%}, "
                  f"PSNR {row['psnr']:.1f} dB, labels {row['labels']:.0%}", flush=True)
    rows = []
    for name, (c, sigma) in cases.items():
        runs = per_draw[name]
        floors = [float(r["noise_floor"]) for r in runs if r["noise_floor"] is not None]
        rows.append(cells[name].row(
            case=name, clip=c, sigma=sigma, noise_std=sigma * c, method=args.method, batch_size=args.batch,
            epsilon_cell=args.epsilon, unmodelled=args.unmodelled,
            relative_residual=_mean([float(r["relative_residual"]) for r in runs]), noise_floor=_mean(floors),
            per_draw=runs))
    mode = "unmodelled clipping" if args.unmodelled else "clipping modelled"
    notes = (f"{args.method}{' class-specific' if args.class_specific else ''}, batch {args.batch}, the audit's cell "
             f"at epsilon {args.epsilon} (sigma {args.sigma:g}, C 0.01) shared four ways; featmatch + the decoder, "
             f"labels inferred, {mode}. Re-identification among K = {cfg.reid_k} same-class private digits "
             f"(chance {cfg.chance:.0%}); \"clipped\": fraction of the examples whose per-example gradient the "
             "clipping scaled; residual and noise floor: means over the draws.")
    path = write_results(args.name, rows, prov, title="Clipping or noise: the feature fit against its noise floor",
                         columns=COLUMNS, notes=notes)
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
