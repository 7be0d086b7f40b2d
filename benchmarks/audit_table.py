"""What differential privacy buys back: `clipleak audit` on the trained target, its rows written to
benchmarks/results/<name>.json with provenance and its chart copied to docs/img/<name>.png.

    python benchmarks/audit_table.py                                   # CLIP-Adapter, batch 1, 24 private digits
    python benchmarks/audit_table.py --methods coop --name audit-coop --images 16
    python benchmarks/audit_table.py --draw-seed 1000 --name audit-adapter-draw1000

The audit folder (default runs/bench-<name>) is resumable: a killed run continues where it stopped. Every
rate carries its 95% Wilson interval over the point's images; "at chance" means the interval reaches chance.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch

from clipleak.api import audit
from clipleak.audit import AuditConfig, parse_epsilons
from clipleak.audit.summary import result_figures
from clipleak.report.results import markdown_table, provenance, write_results

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [("peft", "PEFT"), ("batch_size", "batch"), ("epsilon", "epsilon"), ("noise_multiplier", "sigma"),
           ("n_images", "n"), ("reid", "re-id [95% CI]"), ("psnr", "PSNR dB"), ("labels", "labels"),
           ("prototype_true_reid", "prototype re-id (true label)"), ("prototype_true_psnr", "prototype dB"),
           ("accuracy", "accuracy (validation)"), ("verdict", "at chance?")]


def eps_label(eps: str) -> str:
    """``1e+06`` -> ``1e6``, ``100000`` -> ``1e5``; other values as they are."""
    if eps == "inf":
        return eps
    v = float(eps)
    exp = round(math.log10(v))
    return f"1e{exp}" if v >= 1e4 and v == 10.0 ** exp else f"{v:g}"


def rows_from(summary: dict, headline: set[float]) -> list[dict]:
    out = []
    for r in summary["rows"]:
        if r.get("reid_interval") is None:
            continue
        eps = eps_label(r["epsilon"])
        out.append({
            "case": f"audit: {r['peft']}, batch {r['batch_size']}, "
            + ("no DP" if eps == "inf" else f"DP epsilon {eps}"),
            "peft": r["peft"], "batch_size": r["batch_size"], "epsilon": eps,
            "noise_multiplier": r.get("noise_multiplier"), **result_figures(r),
            "prototype_psnr": r.get("prototype_true_psnr"),
            "headline": float(r["epsilon"]) in headline,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="adapter")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--epsilons", default="inf,1e6,1e5,1e4,100,3")
    ap.add_argument("--images", type=int, default=24, help="observations per point (24 batches of 1: +-20 points)")
    ap.add_argument("--attack", default="featmatch")
    ap.add_argument("--canaries", type=int, default=0, help="canaries of the canary audit (0: skip it)")
    ap.add_argument("--draw-seed", type=int, default=0, help="point i draws its batch with seed D + i")
    ap.add_argument("--seed", type=int, default=0, help="seeds the DP noise, the fine-tuning batches, the canaries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--name", default="audit-adapter")
    ap.add_argument("--out", help="the audit folder (default runs/bench-NAME)")
    ap.add_argument("--headline", default="", help="epsilons whose rows go to the README table (e.g. inf,1e5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AuditConfig(epsilons=parse_epsilons(args.epsilons), methods=args.methods.split(","),
                      batch_sizes=[int(b) for b in args.batch_sizes.split(",")], attack=args.attack,
                      images=args.images, canaries=args.canaries, seed=args.seed, draw_seed=args.draw_seed)
    prov = provenance(split="private", draw_seeds=cfg.draw_seeds(), images=args.images, threads=args.threads)
    out = Path(args.out or f"runs/bench-{args.name}")
    summary = audit(cfg, out, threads=args.threads, device=args.device)
    rows = rows_from(summary, {float(e) for e in args.headline.split(",") if e.strip()})
    notes = ("Defended observations of private digits attacked with `" + args.attack + "` and scored one-to-one "
             f"among K = {cfg.reid_k} same-class candidates (chance {cfg.chance:.0%}); the noise multiplier of each "
             "epsilon is calibrated for the client's DP fine-tuning schedule (200 DP-SGD steps, Poisson sampling "
             "at expected batch 25 of 500 digits, C = 0.01, delta 1e-5, RDP); accuracy: DP fine-tuning on that "
             "schedule, validation split. Verdict: " + " ".join(summary.get("verdict", [])) + " Findings: "
             + " ".join(summary.get("findings", [])))
    path = write_results(args.name, rows, prov, title=f"Privacy audit: {', '.join(cfg.methods)} (private digits)",
                         columns=COLUMNS, notes=notes)
    chart = Path(summary["files"]["chart"])
    shutil.copyfile(chart, ROOT / "docs" / "img" / f"{args.name}.png")
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path} and docs/img/{args.name}.png")


if __name__ == "__main__":
    main()
