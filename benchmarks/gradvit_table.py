"""Full fine-tuning of the visual tower (tiny-mnist, full-visual): analytic read-outs and gradient-matching
presets on private digits, honest baselines beside.

    python benchmarks/gradvit_table.py --threads 2                 # writes benchmarks/results/gradvit.json
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

A cell is ``BATCH:ROW,ROW,...:DRAWS``; batch-draw seeds D..D+DRAWS-1 (``--draw-seed D``, default 0);
labels are never shared (each attack infers them its own way). Every row reports mean PSNR, SSIM,
one-to-one re-identification (K = 10, 20 draws; chance 10%) with its 95% Wilson interval over the cell's
images, label-multiset accuracy and seconds per batch; the class prototype of the attack's own labels is
scored on the same images (evaluation.evaluate).
"""

from __future__ import annotations

import argparse
import time

import torch

from clipleak import artifacts
from clipleak.api import attack_observation, make_observation
from clipleak.client import load_private
from clipleak.data import public_for_observation
from clipleak.evaluation import evaluate
from clipleak.peft import PeftConfig
from clipleak.report.results import Cell, markdown_table, provenance, write_results

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
DEFAULT_CELLS = ("1:closed form,projection + decoder:40;4:projection + decoder:10;"
                 "4:gradvit (neighbours start),neighbours start alone:4")
COLUMNS = [("batch", "batch"), ("attack", "attack"), ("n_images", "n"), ("reid", "re-id [95% CI]"),
           ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("labels", "labels"), ("prototype_reid", "prototype re-id"),
           ("prototype_psnr", "prototype dB"), ("seconds_per_batch", "s / batch")]
HEADLINE = {"closed form": "closed form (APRIL), full-visual",
            "projection + decoder": "projection read-out + decoder, full-visual",
            "gradvit (neighbours start)": "GradViT (neighbours start), full-visual"}


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
    ap.add_argument("--draw-seed", type=int, default=0, help="batch-draw seeds D..D+DRAWS-1 of every cell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="gradvit", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--headline", action="store_true", help="mark the named rows for the README's table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arch = args.arch or (str(getattr(artifacts.get(args.weights).recipe, "arch", "tiny-32"))
                         if artifacts.is_artifact(args.weights) else "tiny-32")
    cells = [(int(b), rows.split(","), int(d)) for b, rows, d in (c.split(":") for c in args.cells.split(";"))]
    most = max(d for _, _, d in cells)
    prov = provenance(split=args.part, draw_seeds=range(args.draw_seed, args.draw_seed + most),
                      images=max(b * d for b, _, d in cells), threads=args.threads)
    notes = (f"Full fine-tuning of the visual tower of {args.weights}; labels never shared. One-to-one "
             "re-identification among K = 10 candidates per image (chance 10%); intervals 95% (Wilson over the "
             f"images for rates, bootstrap for means). Optimisation rows: {args.iterations} steps x "
             f"{args.restarts} restarts.")
    title = f"Full fine-tuning: analytic read-outs and GradViT ({args.part} digits)"
    out: list[dict] = []
    for batch, row_names, draws in cells:
        acc = {row: Cell.new() for row in row_names}
        for draw in range(args.draw_seed, args.draw_seed + draws):
            obs, truth = make_observation(arch=arch, weights=args.weights, peft=PeftConfig(method="full-visual"),
                                          batch_size=batch,
                                          seed=draw, part=args.part)
            spec, public = public_for_observation(obs.meta)
            private = load_private(spec, int(obs.meta["image_size"]), args.part)
            names = {"{cnn}": args.cnn or f"{args.weights}-cnn", "{decoder}": args.decoder or f"{args.weights}-decoder"}
            for row in row_names:
                kw = {k: names.get(v, v) if isinstance(v, str) else v for k, v in ROWS[row].items()}
                name = kw.pop("name")
                if name in OPTIMISED and "iterations" not in kw:
                    kw.update(iterations=args.iterations, restarts=args.restarts)
                t0 = time.perf_counter()
                rec = attack_observation(obs, name=name, weights=args.weights, **kw)
                sec = time.perf_counter() - t0
                ev = evaluate(rec, truth, public.prototypes(), with_lpips=False, reid_pool=private)
                acc[row].add_evaluation(ev, {"attack": "", "prototype": "prototype_"}, seconds=sec)
                print(f"b={batch} draw {draw} {row}: {ev['methods']['attack']['psnr_mean']:.1f} dB, ssim "
                      f"{ev['methods']['attack']['ssim_mean']:.2f}, reid {ev['reidentification']['attack']:.0%}, "
                      f"labels {ev['label_count_accuracy']:.0%} | prototype "
                      f"{ev['methods']['prototype']['psnr_mean']:.1f} dB reid "
                      f"{ev['reidentification']['prototype']:.0%} ({sec:.1f} s)", flush=True)
        for row in row_names:
            case = f"{HEADLINE.get(row, row)}, batch {batch}"
            case += "" if args.weights == "tiny-mnist" else f", {args.weights}"  # the target, when not the default
            out.append(acc[row].row(case=case, batch=batch, attack=row,
                                    headline=bool(args.headline and row in HEADLINE)))
        path = write_results(args.name, out, prov, title=title, columns=COLUMNS, notes=notes)  # kept per cell
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in out]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
