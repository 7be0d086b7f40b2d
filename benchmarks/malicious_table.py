"""A malicious server against CLIP-Adapter clients: it sends crafted adapter weights (an imprint layer built from
public features, :mod:`clipleak.recover.malicious`), reads the batch's features off one update and decodes them.
Re-identification (one-to-one) against the batch size on private digits of `tiny-mnist`, for the task's adapter
width (reduction 4) and a wider one a server could ask for (reduction 1), beside the honest-but-curious read-out
of the same batch and the class prototype; a DP-SGD row; and the client-side weight check's detection and
false-positive rates. Writes benchmarks/results/<name>.json (rows + provenance) and <name>-check.json.

    python benchmarks/malicious_table.py                                   # the default cells, private split
    python benchmarks/malicious_table.py --split validation --draw-seed 20 --images 96   # where groups were tuned
    python benchmarks/malicious_table.py --cells "1:32:8" --dp-epsilon 8 --name malicious-dp

A cell is REDUCTION:BATCH:GROUPS (the imprint's number of groups, chosen per width and batch on the validation
split); it draws images // batch batches with draw seeds draw-seed, draw-seed + 1, ...
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from clipleak import artifacts
from clipleak.client import load_private, sample_batch, share
from clipleak.data import DataSpec
from clipleak.data.split import load_public
from clipleak.evaluation import evaluate
from clipleak.evaluation.stats import wilson
from clipleak.fl.malicious import MaliciousServer
from clipleak.models import build_model
from clipleak.peft import PeftConfig, Victim, build_victim
from clipleak.priors import FeatureDecoder, decoder_images, load_prior
from clipleak.privacy import DpSetting
from clipleak.records import Reconstruction, Truth
from clipleak.recover import adapter_features
from clipleak.recover.malicious import check_weights
from clipleak.report.results import Cell, markdown_table, provenance, write_results

DEFAULT_CELLS = "4:8:8;4:16:1;4:32:1;4:64:1;1:8:8;1:16:8;1:32:8;1:64:1"
"""Groups per width and batch: the best of 1, 2, 4, 8 on the validation split (draw seeds 20-23, share of
features recovered with cosine > 0.99)."""
SCORED = {"attack": "", "prototype": "prototype_"}
EXACT = 0.99
"""A recovered feature is exact above this cosine to its true one (a trained CLIP's same-class features have
cosines near 0.98, so a mixture of two same-class images can pass 0.9)."""
COLUMNS = [("hidden", "adapter width"), ("batch", "batch"), ("attack", "read-out"), ("defense", "defense"),
           ("n_images", "n"), ("reid_k", "K"), ("reid", "re-id [95% CI]"),
           ("exact", "features exact (cos > 0.99)"), ("psnr", "PSNR dB"),
           ("feature_cosine", "feature cos"), ("prototype_reid", "prototype re-id"), ("seconds_per_batch", "s / batch")]
CHECK_COLUMNS = [("weights", "weights received"), ("rounds", "rounds"), ("flagged", "flagged [95% CI]"),
                 ("redundancy", "W1 row redundancy"), ("rank_share", "W2 stable rank / width")]


def parse_cells(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(";"):
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise SystemExit(f"bad cell {part!r}: use REDUCTION:BATCH:GROUPS")
        out.append((int(bits[0]), int(bits[1]), int(bits[2])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="REDUCTION:BATCH:GROUPS separated by ';'")
    ap.add_argument("--images", type=int, default=64, help="images per cell (at least one batch)")
    ap.add_argument("--split", default="private", choices=["private", "validation"])
    ap.add_argument("--draw-seed", type=int, default=300, help="first draw seed: batch j draws with seed D + j")
    ap.add_argument("--craft-seed", type=int, default=0, help="seed of the imprint's secret directions")
    ap.add_argument("--dp-epsilon", type=float, help="privatise every update with per-example DP-SGD at this epsilon "
                    "(the audit's schedule: C = 0.01, 200 steps, delta 1e-5, sample rate batch / private images)")
    ap.add_argument("--no-honest", action="store_true", help="leave out the honest-but-curious rows")
    ap.add_argument("--check-seeds", type=int, default=0,
                    help="also measure the client-side check over this many honest inits per width (0: skip)")
    ap.add_argument("--reid-k", type=int, default=4,
                    help="candidates per re-identification (chance 1/k); one-to-one at batch 64 needs k - 1 "
                         "distractors of each image's class per image, and the private split holds about 45 a class")
    ap.add_argument("--weights", default="tiny-mnist", help="the target (e.g. tiny-mnist-224 with --arch tiny-224)")
    ap.add_argument("--arch", default="tiny-32")
    ap.add_argument("--decoder", default="tiny-mnist-decoder", help="the target's feature decoder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="malicious", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cells = parse_cells(args.cells)
    draws = {b: max(1, args.images // b) for _, b, _ in cells}
    prov = provenance(split=args.split, draw_seeds=range(args.draw_seed, args.draw_seed + max(draws.values())),
                      images=args.images, threads=args.threads)
    prov["load_average"] = [round(x, 2) for x in os.getloadavg()]

    path = artifacts.resolve_path(args.weights)
    clip = build_model(args.arch, path)
    spec = DataSpec.parse("mnist", split_seed=0)
    public = load_public(spec, clip.image_size)
    private = load_private(spec, clip.image_size, args.split)
    data_meta = {**spec.to_dict(), "grayscale": private.grayscale}
    dec = load_prior(str(artifacts.resolve_path(args.decoder)))
    assert isinstance(dec, FeatureDecoder)
    rows: list[dict[str, Any]] = []
    reid_k: dict[int, int] = {}
    checks: dict[str, list[tuple[bool, float, float]]] = {}

    prototypes = public.prototypes()

    def score(rec: Reconstruction, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The evaluator's scores (clipleak.evaluation.evaluate: re-identification among the private split,
        the class prototype) and the recovered features' cosine to the true ones, without the report folder."""
        for k in range(args.reid_k, 1, -1):  # the largest K up to --reid-k that the private split allows
            ev = evaluate(rec, Truth(images=x, labels=y, meta={"part": args.split}), prototypes, with_lpips=False,
                          reid_pool=private, reid_k=k)
            if ev["reidentification"]["attack"] is not None:
                break
        else:
            raise SystemExit(ev["reidentification"]["note"])
        with torch.no_grad():
            true = F.normalize(victim.raw_image_features(x), dim=-1)
        assert rec.features is not None
        cos = (F.normalize(rec.features.float(), dim=-1)[torch.tensor(ev["pairing"])] * true).sum(-1)
        ev["feature_recovery"] = {"cosine_to_truth": [float(c) for c in cos]}
        ev["exact"] = float((cos > EXACT).float().mean())
        return ev

    for red, b, groups in cells:
        cfg = PeftConfig(method="adapter", adapter_reduction=red)
        honest = build_victim(clip, list(private.classnames), cfg)
        malicious = build_victim(clip, list(private.classnames), cfg)
        hidden = int(honest.adapter.fc1.weight.shape[0]) if honest.adapter is not None else 0
        server = MaliciousServer.craft(malicious, public, groups=groups, seed=args.craft_seed, decoder=dec)
        malicious.load_peft_state(server.payload())
        dp = None
        if args.dp_epsilon is not None:
            dp = DpSetting(mechanism="per-example", clip=0.01, epsilon=args.dp_epsilon, delta=1e-5,
                           sample_rate=b / len(private), steps=200).resolve()
        defense = "none" if dp is None else f"DP-SGD per example, epsilon {args.dp_epsilon:g} (C 0.01, sigma " \
                                           f"{dp.noise_multiplier:.2f})"
        acc = {"malicious": Cell.new(), "honest": Cell.new()}
        for j in range(draws[b]):
            x, y, _ = sample_batch(private, b, seed=args.draw_seed + j)
            with torch.no_grad():
                own = F.normalize(malicious.raw_image_features(x), dim=-1)
            c = check_weights(server.payload(), own)
            checks.setdefault(f"malicious, width {hidden}", []).append((c.flagged, c.row_redundancy, c.w2_rank_share))
            t0 = time.perf_counter()
            obs = share(malicious, x, y, data=data_meta, dp=dp, dp_seed=args.draw_seed + j)
            rec = server.attack(obs, malicious)
            sec = time.perf_counter() - t0
            ev = score(rec, malicious, x, y)
            acc["malicious"].add_evaluation(ev, SCORED, seconds=sec)
            acc["malicious"].rates.setdefault("exact", []).append(ev["exact"])
            reid_k[b] = min(reid_k.get(b, args.reid_k), int(ev["reidentification"]["k"]))
            line = f"width {hidden} b={b} G={groups} draw {args.draw_seed + j}: malicious re-id " \
                   f"{ev['reidentification']['attack']:.0%} (separated {rec.meta['feature_recovery']['separated']})"
            if not args.no_honest:
                t0 = time.perf_counter()
                obs_h = share(honest, x, y, data=data_meta, dp=dp, dp_seed=args.draw_seed + j)
                est = adapter_features(obs_h, honest)
                with torch.no_grad():
                    labs = (est.features @ honest.text_features().t()).argmax(-1)
                rec_h = Reconstruction(images=decoder_images(dec, est.features), labels=labs,
                                       label_source="zero-shot class of the recovered feature", attack="adapter-rows",
                                       history={}, features=est.features,
                                       meta={"observation": obs_h.meta, "observation_digest": obs_h.digest()})
                sec = time.perf_counter() - t0
                ev_h = score(rec_h, honest, x, y)
                acc["honest"].add_evaluation(ev_h, SCORED, seconds=sec)
                acc["honest"].rates.setdefault("exact", []).append(ev_h["exact"])
                reid_k[b] = min(reid_k[b], int(ev_h["reidentification"]["k"]))
                line += f", honest-but-curious {ev_h['reidentification']['attack']:.0%}"
            print(line, flush=True)
        for kind, cell in acc.items():
            if not cell.sizes:
                continue
            what = (f"malicious imprint ({groups} group{'s' if groups > 1 else ''})" if kind == "malicious"
                    else "honest-but-curious (W1-gradient rows clustered)")
            rows.append(cell.row(case=f"{what}, width {hidden}, batch {b}, {defense}", hidden=hidden, batch=b,
                                 groups=groups, attack=what, defense=defense, reduction=red,
                                 reid_k=reid_k[b]))
        out = write_results(args.name, rows, prov, title=f"Malicious server vs CLIP-Adapter ({args.weights}, "
                            f"{args.split} digits)", columns=COLUMNS, notes=NOTES)
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {out}")
    if args.check_seeds:
        check_rows = client_check(clip, private, public, args, checks)
        out = write_results(f"{args.name}-check", check_rows, prov, title="Client-side check on received adapter "
                            f"weights ({args.weights})", columns=CHECK_COLUMNS, notes=CHECK_NOTES)
        print(markdown_table([h for _, h in CHECK_COLUMNS], [[r.get(k) for k, _ in CHECK_COLUMNS] for r in check_rows]))
        print(f"wrote {out}")


NOTES = ("One-to-one re-identification among K same-class candidates per image (chance 1/K): K = 4, or the "
         "largest K the private split allows (one-to-one draws K - 1 distinct distractors of its class per image; "
         "about 50 private digits a class), each batch's decoded images "
         "paired with its true images by assignment. Malicious: the server sends imprint weights (same architecture "
         "and width; W1 rows a_g - beta mu, W2 = c 1^T) and reads the features off the W1 gradient's bin "
         "differences, peeling across groups; honest-but-curious: the same batch's update of the usual init read "
         "by clustering the W1-gradient rows (recover.adapter_features). Images from the shipped tiny-mnist-decoder; "
         "labels: the zero-shot class of each recovered feature. Feature cos: recovered vs true feature (paired). "
         "Intervals: 95%, Wilson over the images for rates, bootstrap over the images for means.")
CHECK_NOTES = ("The client computes on the weights it receives (recover.malicious.check_weights): W1's row "
               "redundancy, the mean over rows of the largest |cos| with another row (flag above 0.6), and W2's stable "
               "rank over the width (flag below 0.05). Malicious rounds: every crafted payload of the "
               "re-identification cells; honest rounds: the usual init across seeds, and the same after 20 local SGD "
               "steps (lr 0.1) on the client's batch.")


def client_check(clip: Any, private: Any, public: Any, args: argparse.Namespace,
                 checks: dict[str, list[tuple[bool, float, float]]]) -> list[dict[str, Any]]:
    """Rows of the client-side check: detection on the malicious payloads seen above, false positives on honest
    inits (and briefly fine-tuned ones) of both widths."""
    for red in sorted({r for r, _, _ in parse_cells(args.cells)}):
        for seed in range(args.check_seeds):
            victim = build_victim(clip, list(private.classnames),
                                  PeftConfig(method="adapter", adapter_reduction=red, init_seed=seed))
            assert victim.adapter is not None
            hidden = int(victim.adapter.fc1.weight.shape[0])
            x, y, _ = sample_batch(private, 32, seed=args.draw_seed + 1000 + seed)
            with torch.no_grad():
                own = F.normalize(victim.raw_image_features(x), dim=-1)
            c = check_weights(victim.peft_state(), own)
            checks.setdefault(f"honest init, width {hidden}", []).append((c.flagged, c.row_redundancy,
                                                                           c.w2_rank_share))
            params = victim.trainable()
            for _ in range(20):  # a client's local fine-tuning: what honest weights look like after a round
                g = victim.gradient(x, y)
                with torch.no_grad():
                    for n, p in params.items():
                        p -= 0.1 * g[n]
            c = check_weights(victim.peft_state(), own)
            checks.setdefault(f"honest, fine-tuned 20 steps, width {hidden}", []).append(
                (c.flagged, c.row_redundancy, c.w2_rank_share))
    rows = []
    for name, vals in checks.items():
        flagged = sum(v[0] for v in vals)
        rows.append({"case": name, "weights": name, "rounds": len(vals),
                     "flagged": {**wilson(flagged, len(vals)).to_dict(), "kind": "rate"},
                     "redundancy": round(sum(v[1] for v in vals) / len(vals), 3),
                     "rank_share": round(sum(v[2] for v in vals) / len(vals), 3)})
    return rows


if __name__ == "__main__":
    main()
