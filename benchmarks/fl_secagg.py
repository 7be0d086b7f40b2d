"""Secure aggregation (SecAgg+ on Flower): re-identification against the number of clients in the aggregate
(docs/fl.md, docs/threat-models.md).

Every cell is one FedAvg round of k clients through the real apps on the in-process grid (no Ray: the
transport does not change what the server reads) with Flower's SecAgg+ workflow and ``secaggplus_mod``:
the server reads only the aggregate and attacks it as one update of all the clients' images
(featmatch with ``tiny-mnist-decoder``, no search; FedAvg weights known: the clients' example counts). Each
client holds B private digits and runs E SGD steps at batch B (lr 0.1), so it touches its B digits; the
aggregate is then one batch of k B digits. k = 1 is a plain round (SecAgg+ needs two clients; the aggregate
of one client is its update). Re-identification is one-to-one among K = 10 same-class private digits
(chance 10%), pooled over the cell's images with its Wilson interval; a cell repeats rounds with fresh
client draws (data seeds ``--draw-seed``, +1, ...) until it has ``--min-images`` digits (default 4: one
round from k B = 4 on). SecAgg+ settings:
clipping range 8, 2**24 quantisation levels, max weight B (a power of two: the FedAvg weights stay exact;
the aggregate is then within about 1e-6 of plain FedAvg's, :meth:`clipleak.fl.secagg.SecAggSettings.tolerance`).

    python benchmarks/fl_secagg.py --threads 1                       # the grid: 2 methods x E x B x k
    python benchmarks/fl_secagg.py --methods adapter --steps 1 --per-client 1 --clients 1,2
    python benchmarks/fl_secagg.py --cells "coop-cs:2:1:2;coop-cs:2:4:1" --name fl_secagg-coop   # chosen cells
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipleak.evaluation import bootstrap_mean, pooled_rate
from clipleak.fl import ClientData, Recipe, RunSpec
from clipleak.fl.run import evaluate_run, run_federated
from clipleak.peft import PeftConfig
from clipleak.report.results import markdown_table, provenance, write_results

COLUMNS = [("case", "case"), ("clients", "clients k"), ("per_client", "digits per client"), ("E", "E"),
           ("n_images", "images"), ("reid", "re-id [95% CI]"), ("prototype_reid", "prototype re-id"),
           ("public_nn_reid", "public-nn re-id"), ("psnr", "PSNR dB"), ("labels", "labels"),
           ("attack_s", "attack s / aggregate")]

METHODS = {"adapter": {"method": "adapter"}, "coop-cs": {"method": "coop", "class_specific": True}}
"""The PEFT modules measured: CLIP-Adapter and class-specific CoOp."""


def one_round(tmp: Path, method: str, clients: int, per_client: int, steps: int, lr: float, seed: int,
              part: str) -> dict[str, Any]:
    """One FedAvg round (SecAgg+ from two clients on), attacked and scored; the evaluator's entries."""
    out = tmp / f"{method}-k{clients}-b{per_client}-e{steps}-s{seed}"
    secagg = None if clients < 2 else {"max_weight": float(per_client)}
    spec = RunSpec(out=str(out), clients=clients, rounds=1, secagg=secagg,
                   recipe=Recipe(peft=PeftConfig(**METHODS[method]), local_steps=steps, batch_size=per_client, lr=lr),
                   attack_settings={"decoder": "tiny-mnist-decoder", "iterations": 0})
    data = ClientData(client_size=per_client, seed=seed, truth_dir=str(out / "clients"), part=part)
    run_federated(spec, data, engine="inprocess")
    m = evaluate_run(out, out / "clients")
    return {"entries": m["clients"], "summary": m["summary"]}


def cell(tmp: Path, method: str, clients: int, per_client: int, steps: int, lr: float, seed: int, part: str,
         min_images: int) -> dict[str, Any]:
    """Rounds with fresh draws until ``min_images`` digits are scored; the cell's pooled row."""
    draws = max(1, math.ceil(min_images / (clients * per_client)))
    entries: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for d in range(draws):
        entries += one_round(tmp, method, clients, per_client, steps, lr, seed + d, part)["entries"]
    errors = [e["error"] for e in entries if "error" in e]
    scored = [e for e in entries if "error" not in e]
    sizes = [int(e["images"]) for e in scored]
    row: dict[str, Any] = {"case": f"{method}, k {clients}, {per_client} digit(s) each, E {steps}", "method": method,
                           "clients": clients, "per_client": per_client, "E": steps, "lr": lr, "part": part,
                           "secure_aggregation": clients >= 2, "rounds": draws, "draw_seeds": [seed + d for d in
                                                                                               range(draws)],
                           "n_images": sum(sizes), "errors": errors, "wall_s": time.perf_counter() - t0}
    if scored:
        for key, name in (("reid", "attack"), ("prototype_reid", "prototype"), ("public_nn_reid", "public-nn")):
            row[key] = {**pooled_rate([e["reid"][name] for e in scored], sizes).to_dict(), "kind": "rate"}
        row["labels"] = {**pooled_rate([e["label_accuracy"] for e in scored], sizes).to_dict(), "kind": "rate"}
        psnr = [v for e in scored for v in e["psnr_images"]["attack"] if v is not None]
        row["psnr"] = {**bootstrap_mean(psnr).to_dict(), "kind": "mean"} if psnr else None
        secs = [e["attack_seconds"] for e in scored if e.get("attack_seconds") is not None]
        row["attack_s"] = sum(secs) / len(secs) if secs else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="adapter,coop-cs", help=f"of {', '.join(METHODS)}")
    ap.add_argument("--clients", default="1,2,4,8", help="k: clients in the aggregate")
    ap.add_argument("--per-client", default="1,4", help="B: digits each client holds and trains on (batch B)")
    ap.add_argument("--steps", default="1,2", help="E: local steps")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--min-images", type=int, default=4, help="repeat rounds until a cell has this many digits")
    ap.add_argument("--draw-seed", type=int, default=0, help="the clients' data seed of a cell's first round")
    ap.add_argument("--part", default="private", help="the clients' split: private (reported) or validation")
    ap.add_argument("--name", default="fl_secagg", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cells", help="instead of the grid: METHOD:E:B:K cells separated by ';' (e.g. coop-cs:2:1:4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ints = [[int(x) for x in text.split(",") if x.strip()] for text in (args.clients, args.per_client, args.steps)]
    ks, bs, es = ints
    methods = [m for m in args.methods.split(",") if m.strip()]
    # the attack's cost grows with the batch k B (and CoOp's with E, its exact replay): the cheap cells first,
    # aggregates of 16 digits or more last, so a run cut short has the rest
    if args.cells:
        picked = [part.strip().split(":") for part in args.cells.split(";") if part.strip()]
        grid = [(m, int(e), int(b), int(k)) for m, e, b, k in picked]
        methods = list(dict.fromkeys(m for m, _, _, _ in grid))
        if any(m not in METHODS for m in methods):
            raise SystemExit(f"--cells: methods are {', '.join(METHODS)}")
    else:
        grid = [(m, e, b, k) for m in methods for e in es for b in bs for k in ks]
    cells = sorted(grid, key=lambda c: (c[2] * c[3] >= 16, methods.index(c[0]), c[1] if c[0] != "adapter" else 0,
                                        c[2] * c[3], c[2], c[1]))
    prov = provenance(split=args.part, draw_seeds=list(range(args.draw_seed, args.draw_seed + args.min_images)),
                      images=max(max(args.min_images, k * b) for _, _, b, k in cells), threads=args.threads)
    notes = ("One FedAvg round per draw on the in-process grid, SecAgg+ (Flower's workflow and client mod; "
             "clipping range 8, 2**24 levels, max weight = digits per client) from k = 2 on; the server attacks "
             "the aggregate as one update of all k B digits with featmatch and tiny-mnist-decoder (no search). "
             "k = 1: a plain round, the aggregate is the client's update. Each client holds B digits and runs E "
             "SGD steps at batch B, lr 0.1. Re-identification one-to-one among K = 10 same-class private digits "
             "(chance 10%), Wilson intervals over the cell's digits (a cell repeats rounds with fresh draws until "
             f"it has {args.min_images} digits); PSNR a bootstrap over them.")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as td:
        for method, e, b, k in cells:
            row = cell(Path(td), method, k, b, e, args.lr, args.draw_seed, args.part, args.min_images)
            rows.append(row)
            write_results(args.name, rows, prov, title="Secure aggregation: re-identification against the clients "
                          "in the aggregate", columns=COLUMNS, notes=notes)
            reid = (row.get("reid") or {}).get("value")
            print(f"{row['case']}: {row['n_images']} digits, re-id "
                  f"{'-' if reid is None else format(reid, '.0%')}, {row['wall_s']:.0f} s", flush=True)
    print(markdown_table([h for _, h in COLUMNS], [[r.get(c) for c, _ in COLUMNS] for r in rows]))
    print(f"wrote benchmarks/results/{args.name}.json")


if __name__ == "__main__":
    main()
