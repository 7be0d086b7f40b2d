"""MIP on CLIP PEFT gradients: the adapter, CoOp with shared context and CoOp with class-specific context, at
several batch sizes, on private digits of a trained target (`tiny-mnist` unless --weights), scored one-to-one
beside the class prototype and the public nearest neighbour. Writes benchmarks/results/<name>.json (rows + provenance).

    python benchmarks/mip_table.py                                        # the default cells, private split
    python benchmarks/mip_table.py --cells "adapter:1,8;coop:1" --images 40 --name mip
    python benchmarks/mip_table.py --split validation --draw-seed 20 ...  # where settings are tuned
    python benchmarks/mip_table.py --weights tiny-mnist-224 --cells "adapter:1;coop:1" --name mip224  # 224 px

A cell is PEFT:batch; it draws images // batch batches with draw seeds draw-seed, draw-seed + 1, ...
Every rate carries its 95% Wilson interval over the cell's images; PSNR a bootstrap interval over the images.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from clipleak import artifacts
from clipleak.api import attack_observation, evaluate_reconstruction, make_observation
from clipleak.peft import PeftConfig
from clipleak.report.results import Cell, markdown_table, provenance, write_results

ATTACKS = {
    "mip": dict(name="mip", decoder="tiny-mnist-decoder", labels="predicted"),
    "mip, zero-shot labels": dict(name="mip", decoder="tiny-mnist-decoder", labels="feature"),
    "ig (pixels + TV)": dict(name="ig", iterations=100, restarts=1, labels="infer"),
    "mip + latent search": dict(name="mip", decoder="tiny-mnist-decoder", labels="predicted",
                                prior="generative:tiny-mnist-vae", search=100),
    "mip + gradient refinement": dict(name="mip", decoder="tiny-mnist-decoder", labels="predicted", refine=100),
}
KINDS = {"adapter": dict(method="adapter"), "coop": dict(method="coop"),
         "coop-cs": dict(method="coop", class_specific=True)}
KIND_NAMES = {"adapter": "CLIP-Adapter", "coop": "CoOp, shared context", "coop-cs": "CoOp, class-specific context"}
SCORED = {"attack": "", "prototype": "prototype_", "public-nn": "nn_"}
COLUMNS = [("peft", "PEFT"), ("batch", "batch"), ("attack", "attack"), ("n_images", "n"),
           ("reid", "re-id [95% CI]"), ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("labels", "labels"),
           ("feature_cosine", "feature cos"), ("prototype_reid", "prototype re-id"),
           ("prototype_psnr", "prototype dB"), ("nn_reid", "public NN re-id"), ("nn_psnr", "public NN dB"),
           ("seconds_per_batch", "s / batch")]


def parse_cells(text: str) -> list[tuple[str, int]]:
    cells = []
    for part in text.split(";"):
        kind, _, batches = part.strip().partition(":")
        if kind not in KINDS or not batches:
            raise SystemExit(f"bad cell {part!r}: use KIND:B[,B...] with KIND one of {', '.join(KINDS)}")
        cells += [(kind, int(b)) for b in batches.split(",")]
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="adapter:1,8;coop:1,4;coop-cs:4",
                    help="PEFT:batches separated by ';' (PEFT: adapter, coop, coop-cs)")
    ap.add_argument("--images", type=int, default=40,
                    help="images per cell (at least one batch); 40 keeps a rate's interval within about "
                         "+-15 points")
    ap.add_argument("--attacks", default="mip", help=f"attacks separated by ';' (any of: {'; '.join(ATTACKS)})")
    ap.add_argument("--weights", default="tiny-mnist", help="the target: an artifact name or a weights file")
    ap.add_argument("--arch", help="the target's architecture (default: the artifact's, else tiny-32)")
    ap.add_argument("--decoder", help="the decoder of the MIP rows (default: the artifact WEIGHTS-decoder)")
    ap.add_argument("--split", default="private", choices=["private", "validation"])
    ap.add_argument("--draw-seed", type=int, default=200, help="first draw seed: batch j draws with seed D + j")
    ap.add_argument("--distinct-classes", action="store_true", help="every batch has distinct labels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="mip", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--headline", action="store_true", help="mark the first attack's rows for the README table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arch = args.arch or (str(getattr(artifacts.get(args.weights).recipe, "arch", "tiny-32"))
                         if artifacts.is_artifact(args.weights) else "tiny-32")
    decoder = args.decoder or f"{args.weights}-decoder"
    attacks = [a.strip() for a in args.attacks.split(";") if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        ap.error(f"unknown attack(s) {bad}; choose from {list(ATTACKS)}")
    cells = parse_cells(args.cells)
    draws = {b: max(1, args.images // b) for _, b in cells}
    prov = provenance(split=args.split, draw_seeds=range(args.draw_seed, args.draw_seed + max(draws.values())),
                      images=args.images, threads=args.threads)
    title = f"MIP on CLIP PEFT gradients ({args.weights}, {args.split} digits)"
    notes = ("One-to-one re-identification among K = 10 candidates per image (chance 10%); labels: the label "
             "multiset; feature cos: the recovered features' cosine to the true ones (paired). Intervals: 95%, "
             "Wilson over the images for rates, bootstrap over the images for means. Baselines are scored on "
             "the same batches: the class prototype of the attack's labels and the public nearest neighbour.")
    rows: list[dict] = []
    scratch = tempfile.mkdtemp(prefix="mip-table-")
    for kind, b in cells:
        acc = {a: Cell.new() for a in attacks}
        for j in range(draws[b]):
            obs, truth = make_observation(arch=arch, weights=args.weights, batch_size=b, seed=args.draw_seed + j,
                                          part=args.split, distinct_classes=args.distinct_classes,
                                          peft=PeftConfig(**KINDS[kind]))
            for a in attacks:
                kw = dict(ATTACKS[a])
                name = kw.pop("name")
                if "decoder" in kw:
                    kw["decoder"] = decoder
                t0 = time.perf_counter()
                rec = attack_observation(obs, name=name, weights=args.weights, **kw)
                sec = time.perf_counter() - t0
                _, ev = evaluate_reconstruction(rec, truth, f"{scratch}/{kind}-{b}-{j}-{name}", with_lpips=False)
                acc[a].add_evaluation(ev, SCORED, seconds=sec)
                print(f"{kind} b={b} draw {args.draw_seed + j} {a}: {ev['methods']['attack']['psnr_mean']:.1f} dB, "
                      f"re-id {ev['reidentification']['attack']:.0%}, labels {ev['label_count_accuracy']:.0%}, "
                      f"{sec:.1f} s", flush=True)
        for i, a in enumerate(attacks):
            case = f"MIP, {KIND_NAMES[kind]}, batch {b}" if a == "mip" else f"{a}, {kind}, batch {b}"
            case += "" if args.weights == "tiny-mnist" else f", {args.weights}"  # the target, when not the default
            rows.append(acc[a].row(case=case, peft=KIND_NAMES[kind], batch=b, attack=a,
                                   headline=bool(args.headline and i == 0)))
        path = write_results(args.name, rows, prov, title=title, columns=COLUMNS, notes=notes)  # kept per cell
    print()
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
