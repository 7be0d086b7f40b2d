"""CoOp DP fine-tuning at epsilon 3: the text-features site vs the prompt (parameters) site vs non-private.

The schedule of docs/audit.md's "accuracy at epsilon 3" section: target ``tiny-mnist``, the client's 500
private digits, 200 steps, Poisson sampling at expected batch 25 (q = 0.05), delta 1e-5, RDP, Adam, cosine
decay; accuracy on the 500 validation digits (where the settings are also chosen: no untouched split is
left). Rows: non-private; per-example DP-SGD on the prompt (``--dp-site parameters``); per-example at the
text features (``--dp-site text-features``); each at the clipping norms and seeds given (the seeds are the
fine-tuning seeds: batches and noise; no private digits are drawn, the client trains on all of them).
Every accuracy carries its 95% Wilson interval over the validation images. Resumable: a run whose
``finetune.json`` exists under OUT is read, not rerun. Rows and the run's provenance go to
benchmarks/results/<name>.json.

    python benchmarks/dp_site_accuracy.py                                  # C 0.01, 0.1, 1; seed 0; epsilon 3
    python benchmarks/dp_site_accuracy.py --clips 0.01 --seeds 0,1,2 --out runs/dp-site-seeds --name dp_site-seeds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from clipleak import api
from clipleak.evaluation import rate_interval
from clipleak.peft import PeftConfig
from clipleak.report.results import markdown_table, provenance, write_results
from clipleak.training import FinetuneConfig, finetune_dp

COLUMNS = [("run", "run"), ("site", "DP site"), ("clip", "C"), ("seed", "seed"), ("sigma", "sigma"),
           ("epsilon_spent", "epsilon spent"), ("n_images", "n (validation)"),
           ("accuracy_before", "accuracy before"), ("accuracy", "accuracy [95% CI]"), ("train_seconds", "train s")]


def _rate(value: float, n: int) -> dict[str, Any]:
    return {**rate_interval(value, n).to_dict(), "kind": "rate"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/dp-site-acc"))
    ap.add_argument("--clips", default="0.01,0.1,1", help="clipping norms C (both sites)")
    ap.add_argument("--sites", default="parameters,text-features")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-plain", action="store_true", help="skip the non-private rows")
    ap.add_argument("--name", default="dp_site_accuracy", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prov = provenance(split="validation", draw_seeds=[], images=0, threads=args.threads)
    clips = [float(c) for c in args.clips.split(",") if c]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs: list[tuple[str, FinetuneConfig]] = []
    base: dict[str, Any] = dict(peft=PeftConfig(method="coop"), steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, sampling="poisson")
    for seed in seeds:
        if not args.no_plain:
            runs.append((f"plain-s{seed}", FinetuneConfig(**base, seed=seed)))
        for site in args.sites.split(","):
            for c in clips:
                runs.append((f"{site}-C{c:g}-s{seed}",
                             FinetuneConfig(**base, seed=seed, dp=finetune_dp("per-example", site=site, clip=c,
                                                                              epsilon=args.epsilon, delta=1e-5))))
    notes = (f"CoOp on the trained target, {args.steps} steps, Poisson sampling at expected batch "
             f"{args.batch_size}, lr {args.lr:g}, Adam with cosine decay; DP rows at epsilon {args.epsilon:g}, delta "
             "1e-5 (RDP). Accuracy on the validation split (where the settings are chosen), each with its 95% "
             "Wilson interval over those images.")
    rows: list[dict[str, Any]] = []
    for name, cfg in runs:
        out = args.out / name
        f = out / "finetune.json"
        res = json.loads(f.read_text()) if f.is_file() else api.finetune_client(cfg, out, threads=args.threads)
        pv = res["privacy"]
        n = int(res["held_out"]["n_images"])
        prov["images"] = max(int(prov["images"]), n)
        row = {"run": name, "site": None if pv is None else pv["site"], "clip": None if pv is None else pv["clip"],
               "seed": cfg.seed, "sigma": None if pv is None else pv["noise_multiplier"],
               "epsilon_spent": None if pv is None else pv["epsilon_spent"], "n_images": n,
               "accuracy_before": _rate(res["accuracy_before"], n), "accuracy": _rate(res["accuracy"], n),
               "train_seconds": res["train_seconds"], "out": str(out)}
        rows.append(row)
        eps = "-" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.3f}"
        print(f"{name:28s} eps {eps:>6s}  val acc {res['accuracy']:.1%} (start {res['accuracy_before']:.1%})  "
              f"{row['train_seconds']:.1f} s", flush=True)
        path = write_results(args.name, rows, prov, title=f"CoOp DP fine-tuning at epsilon {args.epsilon:g}: "
                             "text-features site vs prompt site", columns=COLUMNS, notes=notes)  # kept per run
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
