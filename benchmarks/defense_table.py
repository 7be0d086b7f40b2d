"""What the defenses without noise buy back: `clipleak audit --defense ...` (pruning or quantisation swept
instead of epsilon) on the trained target, its rows written to benchmarks/results/<name>.json with
provenance and its chart copied to docs/img/<name>.png.

    python benchmarks/defense_table.py --defense prune:1,0.1,0.01,0.001 --name defense-prune
    python benchmarks/defense_table.py --defense quantize:32,8,4,1 --name defense-quantize

Adapter and CoOp, batch 1 and 4, by default: one audit per batch size, each with ``--images-per-point``
attacked images per point (8: eight batches of 1, two batches of 4), merged into one table and one chart.
The audit folders (default runs/bench-<name>-b<B>) are resumable.
Every rate carries its 95% Wilson interval over the point's images; "at chance" means the interval
reaches chance. Accuracy: fine-tuning on the private digits with the defense on every step's gradient
(the audit's schedule, no DP), validation split.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from clipleak.api import audit
from clipleak.audit import AuditConfig, summarise, write_chart
from clipleak.audit.summary import result_figures
from clipleak.report.results import markdown_table, provenance, write_results

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [("peft", "PEFT"), ("batch_size", "batch"), ("defense", "defense"), ("attack", "attack"), ("n_images", "n"),
           ("reid", "re-id [95% CI]"), ("psnr", "PSNR dB"), ("labels", "labels"),
           ("prototype_true_reid", "prototype re-id (true label)"), ("prototype_true_psnr", "prototype dB"),
           ("accuracy", "accuracy (validation)"), ("verdict", "at chance?")]


def rows_from(summary: dict) -> list[dict]:
    out = []
    for r in summary["rows"]:
        if r.get("reid_interval") is None:
            continue
        defense = r["defense"] or f"none ({r['axis']}:{r['epsilon']})"
        out.append({
            "case": f"defense audit: {r['peft']}, batch {r['batch_size']}, {defense}",
            "peft": r["peft"], "batch_size": r["batch_size"], "defense": defense, "attack": r["attack"],
            **result_figures(r),
        })
    return out


def _cells(folder: Path) -> dict:
    """The finished cells of an audit folder (none when it has no cells.json yet)."""
    path = folder / "cells.json"
    return json.loads(path.read_text())["cells"] if path.is_file() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defense", required=True, help="e.g. prune:1,0.1,0.01,0.001 or quantize:32,8,4,1")
    ap.add_argument("--methods", default="adapter,coop")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--images-per-point", type=int, default=8,
                    help="attacked images per point: IMAGES / B batches of B (at least one batch)")
    ap.add_argument("--attack", default="featmatch")
    ap.add_argument("--draw-seed", type=int, default=0, help="point i draws its batch with seed D + i")
    ap.add_argument("--seed", type=int, default=0, help="seeds the fine-tuning batches")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", help="the audit folders' prefix (default runs/bench-NAME)")
    ap.add_argument("--note", default="", help="a sentence added to the results' notes")
    ap.add_argument("--finished-only", action="store_true",
                    help="compute nothing: table and chart from the cells already in the folders (a point's n "
                         "says how many images it rests on)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    summaries, configs, folders = [], [], []
    for b in [int(b) for b in args.batch_sizes.split(",")]:
        cfg = AuditConfig(defense=args.defense, methods=args.methods.split(","), batch_sizes=[b], attack=args.attack,
                          images=max(1, args.images_per_point // b), canaries=0, seed=args.seed,
                          draw_seed=args.draw_seed)
        folder = Path(f"{args.out or f'runs/bench-{args.name}'}-b{b}")
        folders.append(folder)
        if args.finished_only:
            summaries.append({**summarise(cfg, _cells(folder)), "seconds_this_run": 0.0})
        else:
            summaries.append(audit(cfg, folder, threads=args.threads))
        configs.append(cfg)
    load = os.getloadavg()[0]
    seconds = sum(s["seconds_this_run"] for s in summaries)
    cfg = configs[0]
    summary = {**summaries[0], "rows": [r for s in summaries for r in s["rows"]],
               "findings": [f for s in summaries for f in s["findings"]]}
    accuracy = {(r["method"], r["epsilon"]): r["accuracy"] for r in summary["rows"] if r["accuracy"] is not None}
    for r in summary["rows"]:  # the accuracy does not depend on the attacked batch size: any audit's cell
        r["accuracy"] = accuracy.get((r["method"], r["epsilon"]))
    summary["config"] = {**summary["config"], "images": " / ".join(f"{c.images} (batch {c.batch_sizes[0]})"
                                                                   for c in configs)}
    draw_seeds = sorted({d for c in configs for d in c.draw_seeds()})
    prov = provenance(split="private", draw_seeds=draw_seeds, images=args.images_per_point, threads=args.threads)
    rows = rows_from(summary)
    befores = sorted({f"{c['accuracy_before']:.1%}" for f in folders for k, c in _cells(f).items()
                      if k.startswith("acc|") and c.get("accuracy_before") is not None})
    before = " / ".join(befores) or "not recorded"
    notes = (f"Update defense {args.defense} (no DP) on observations of private digits, attacked with `{args.attack}` "
             "(featmatch with the decoder; the observation records the defense and the feature fit models it: "
             "each pruned or quantised entry bounds the true one to an interval, and the features are fitted to "
             "those intervals from the read-out's estimate and from public features, clipleak.recover.defended) "
             f"and scored one-to-one among K = {cfg.reid_k} same-class candidates "
             f"(chance {cfg.chance:.0%}); n = attacked images per point "
             "(a batch of 4 counts four). Accuracy: fine-tuning (200 steps, Poisson "
             "sampling at expected batch 25 of the private digits, Adam lr 1e-2) with the defense applied to every "
             f"step's gradient, validation split (the target's zero-shot accuracy before fine-tuning: {before}). "
             + ("Rendered from the finished cells only (a point without cells is left out); "
                if args.finished_only else f"{seconds:.0f} s this run; ")
             + f"load average {load:.1f} (timings are upper bounds). {args.note} Findings: "
             + " ".join(summary.get("findings", [])))
    path = write_results(args.name, rows, prov, title=f"Defense audit: {args.defense} (private digits)",
                         columns=COLUMNS, notes=notes)
    write_chart(summary, ROOT / "docs" / "img" / f"{args.name}.png")
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path} and docs/img/{args.name}.png")


if __name__ == "__main__":
    main()
