"""Full fine-tuning of the visual tower (tiny-mnist, full-visual): analytic read-outs and gradient-matching
presets on private digits, honest baselines beside.

    python benchmarks/gradvit_table.py --threads 1 --json runs/gradvit.json
    python benchmarks/gradvit_table.py --cells "1:closed form,projection + decoder:8" --iterations 200
    python benchmarks/gradvit_table.py --cells "4:gradvit (neighbours start),neighbours start alone:2" \
        --part validation                      # tune on the validation split, report the private one
    python benchmarks/gradvit_table.py --weights tiny-mnist-64 --cells "1:closed form,gradvit:2"

Rows: ``closed form``, ``projection + decoder``, ``gradvit`` (the preset: random start), ``gradvit
(prototype start)`` / ``gradvit (neighbours start)`` (the preset started from the public class mean of
the read label, or from the mean of the 8 public images of that label nearest the feature read off the
projection gradient; lr 0.01, restarts perturbed by N(0, 0.05^2)), ``neighbours start alone`` (that start,
no optimisation), ``ig``, ``dlg``, ``idlg``. ``--cnn`` / ``--decoder`` default to the artifacts
``WEIGHTS-cnn`` / ``WEIGHTS-decoder``.

A cell is ``BATCH:ROW,ROW,...:DRAWS``; batch-draw seeds 0..DRAWS-1 (``--first-draw F``: F..F+DRAWS-1);
labels are never shared (each attack infers them its own way). Every row reports mean PSNR, SSIM,
one-to-one re-identification (K = 10, 20 draws; chance 10%), label-multiset accuracy and seconds per
batch; the class prototype of the attack's own
labels is scored on the same images (evaluation.evaluate).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from clipleak import artifacts
from clipleak.api import attack_observation, make_observation, public_for
from clipleak.client import load_private
from clipleak.evaluation import evaluate

ROWS = {
    "closed form": dict(name="closed-form"),
    "projection + decoder": dict(name="projection", decoder="{decoder}"),
    "gradvit": dict(name="gradvit", bn_prior="{cnn}"),
    # starts an attacker may use once the labels (and, from the projection, the features) are read off:
    # the public class mean of the read label, or the mean of the K public images of that label nearest
    # the read feature; lr 0.01 tuned on the validation split (lr 0.1 walks away from a good start)
    "gradvit (prototype start)": dict(name="gradvit", bn_prior="{cnn}", start="prototype", lr=0.01,
                                      start_noise=0.05),
    "gradvit (neighbours start)": dict(name="gradvit", bn_prior="{cnn}", start="neighbours", lr=0.01,
                                       start_noise=0.05),
    "neighbours start alone": dict(name="gradvit", bn_prior="{cnn}", start="neighbours", iterations=0),
    "ig": dict(name="ig"),
    "dlg": dict(name="dlg"),
    "idlg": dict(name="idlg"),
}
OPTIMISED = ("gradvit", "ig", "dlg", "idlg")
DEFAULT_CELLS = ("1:closed form,projection + decoder:8;4:projection + decoder:4;8:projection + decoder:2;"
                 "4:gradvit,ig:2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=DEFAULT_CELLS)
    ap.add_argument("--iterations", type=int, default=200, help="steps per restart of the optimisation rows")
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--weights", default="tiny-mnist")
    ap.add_argument("--arch", help="the target's architecture (default: the artifact's, else tiny-32)")
    ap.add_argument("--cnn", help="GradViT's prior network (default: the artifact WEIGHTS-cnn)")
    ap.add_argument("--decoder", help="the projection row's decoder (default: the artifact WEIGHTS-decoder)")
    ap.add_argument("--part", default="private", choices=("private", "validation"),
                    help="where the client's digits come from (tune on validation, report private)")
    ap.add_argument("--first-draw", type=int, default=0,
                    help="batch-draw seeds FIRST..FIRST+DRAWS-1 (to add batches to a cell measured before)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = args.arch or (str(getattr(artifacts.get(args.weights).recipe, "arch", "tiny-32"))
                         if artifacts.is_artifact(args.weights) else "tiny-32")
    out = []
    for cell in args.cells.split(";"):
        b_s, rows_s, draws_s = cell.split(":")
        batch, draws = int(b_s), int(draws_s)
        acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for draw in range(args.first_draw, args.first_draw + draws):
            obs, truth = make_observation(arch=arch, weights=args.weights, method="full-visual", batch_size=batch,
                                          seed=draw, part=args.part)
            spec, public = public_for(obs.meta)
            private = load_private(spec, int(obs.meta["image_size"]), args.part)
            names = {"{cnn}": args.cnn or f"{args.weights}-cnn", "{decoder}": args.decoder or f"{args.weights}-decoder"}
            for row in rows_s.split(","):
                kw = {k: names.get(v, v) if isinstance(v, str) else v for k, v in ROWS[row].items()}
                name = kw.pop("name")
                if name in OPTIMISED and "iterations" not in kw:
                    kw.update(iterations=args.iterations, restarts=args.restarts)
                t0 = time.perf_counter()
                rec = attack_observation(obs, name=name, weights=args.weights, **kw)
                sec = time.perf_counter() - t0
                ev = evaluate(rec, truth, public.prototypes(), with_lpips=False, reid_pool=private)
                for m in ("attack", "prototype"):
                    acc[f"{row}|{m}"]["psnr"].append(ev["methods"][m]["psnr_mean"])
                    acc[f"{row}|{m}"]["ssim"].append(ev["methods"][m]["ssim_mean"])
                    acc[f"{row}|{m}"]["reid"].append(ev["reidentification"][m])
                acc[f"{row}|attack"]["labels"].append(ev["label_count_accuracy"])
                acc[f"{row}|attack"]["seconds"].append(sec)
                print(f"b={batch} draw {draw} {row}: {ev['methods']['attack']['psnr_mean']:.1f} dB, ssim "
                      f"{ev['methods']['attack']['ssim_mean']:.2f}, reid {ev['reidentification']['attack']:.0%}, "
                      f"labels {ev['label_count_accuracy']:.0%} | prototype "
                      f"{ev['methods']['prototype']['psnr_mean']:.1f} dB reid "
                      f"{ev['reidentification']['prototype']:.0%} ({sec:.1f} s)", flush=True)
        for key, vals in acc.items():
            row, m = key.split("|")
            out.append({"batch": batch, "row": row if m == "attack" else f"{row}: class prototype",
                        "draws": draws, **{k: sum(v) / len(v) for k, v in vals.items()}})
    print("| batch | row | batches | PSNR dB | SSIM | re-id | labels | s/batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['batch']} | {r['row']} | {r['draws']} | {r['psnr']:.1f} | {r['ssim']:.2f} | {r['reid']:.0%} | "
              f"{r['labels']:.0%} | {r['seconds']:.1f} |" if "labels" in r else
              f"| {r['batch']} | {r['row']} | {r['draws']} | {r['psnr']:.1f} | {r['ssim']:.2f} | {r['reid']:.0%} | | |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "rows": out}, fh, indent=2)


if __name__ == "__main__":
    main()
