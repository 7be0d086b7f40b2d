"""Leakage of federated updates: E = 1 updates against single gradients, and re-identification against the
number of local steps E and the client's dataset size n (docs/fl.md).

Every cell is one FedAvg round of ``--clients`` clients through the real apps (ClientApp, AttackingFedAvg,
ServerApp) on the in-process grid (no Ray: the transport does not change an update), each client holding
``n`` private digits and running E SGD steps at batch 1; the server attacks every update with featmatch and
the decoder (``tiny-mnist-decoder``, no search); the evaluator pairs the reconstructions with the clients'
truth (the E distinct digits each touched, ``min(n, E)``) and scores them one-to-one (re-identification
among K = 10 same-class private digits; chance 10%), each rate with its 95% interval over the attacked
images, PSNR with its bootstrap interval over them. ``--draw-seed`` is the clients' data seed: it picks which
private digits they hold (and seeds their batches and DP noise). Rows (one per cell) and the run's
provenance go to benchmarks/results/<name>.json, rewritten after every finished cell.

    python benchmarks/fl_leakage.py --method adapter --grid --threads 1           # the E and n sweeps
    python benchmarks/fl_leakage.py --method adapter --compare --clients 8 --name fl_leakage-compare
    python benchmarks/fl_leakage.py --grid --part validation --draw-seed 20 --name fl_leakage-validation

``--compare``: each of ``--clients`` clients holds one digit; its E = 1 update is attacked, and so is the
single-gradient observation ``client.share`` makes of the same digit at the same global state (same
attack, same digits).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clipleak import artifacts
from clipleak.attacks import make_config, run_attack
from clipleak.client import share
from clipleak.data import public_for_observation
from clipleak.evaluation import bootstrap_mean, evaluate, pooled_rate, public_nearest_neighbour
from clipleak.fl import ClientData, InProcessGrid, Recipe, RunSpec, make_client_app, server_identity, server_main
from clipleak.fl.run import evaluate_run
from clipleak.fl.server_app import Server
from clipleak.peft import PeftConfig, rebuild_victim
from clipleak.records import Observation, Reconstruction, Truth
from clipleak.report.results import markdown_table, provenance, write_results

COLUMNS = [("case", "case"), ("n", "n (digits per client)"), ("E", "E"), ("n_images", "images"),
           ("reid", "re-id [95% CI]"), ("prototype_reid", "prototype re-id"), ("public_nn_reid", "public-nn re-id"),
           ("psnr", "PSNR dB"), ("labels", "labels"), ("feature_cosine", "cosine update vs gradient"),
           ("attack_s", "attack s / update")]


def _rate(iv: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if iv is None else {**iv, "kind": "rate"}


def _mean(iv: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if iv is None else {**iv, "kind": "mean"}


def grid_row(r: dict[str, Any]) -> dict[str, Any]:
    """A results row of one FedAvg cell: its metrics with their intervals under the shared column keys."""
    return {**r, "case": f"{r['method']}, n {r['n']}, E {r['E']}", "n_images": r["images"],
            "reid": _rate(r["reid_attack_interval"]), "prototype_reid": _rate(r["reid_prototype_interval"]),
            "public_nn_reid": _rate(r["reid_public-nn_interval"]), "psnr": _mean(r["psnr_attack_interval"]),
            "prototype_psnr": r["psnr_prototype"], "labels": _rate(r["label_acc_interval"])}


def compare_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Results rows of ``compare``: the E = 1 updates and the single gradients of the same digits."""
    out = []
    for kind, digits in r["per_digit"].items():
        n = len(digits)
        cos = [float(d["feature_cos_update_vs_gradient"]) for d in digits
               if d.get("feature_cos_update_vs_gradient") is not None]
        out.append({"case": f"{r['method']}, {'E = 1 update' if kind == 'update' else 'single gradient'}",
                    "kind": kind, "method": r["method"], "n": 1, "E": 1, "n_images": n, "part": "private",
                    "reid": {**pooled_rate([d["reid"] for d in digits], [1] * n).to_dict(), "kind": "rate"},
                    "psnr": {**bootstrap_mean([d["psnr"] for d in digits]).to_dict(), "kind": "mean"},
                    "labels": {**pooled_rate([d["label"] for d in digits], [1] * n).to_dict(), "kind": "rate"},
                    "feature_cosine": {**bootstrap_mean(cos).to_dict(), "kind": "mean"} if cos else None,
                    "per_digit": digits})
    return out


def one_round(tmp: Path, method: str, clients: int, n: int, steps: int, lr: float, seed: int,
              part: str = "private") -> dict:
    out = tmp / f"{method}-n{n}-e{steps}-s{seed}"
    spec = RunSpec(out=str(out), clients=clients, rounds=1,
                   recipe=Recipe(peft=PeftConfig(method=method), local_steps=steps, batch_size=1, lr=lr),
                   attack_settings={"decoder": "tiny-mnist-decoder", "iterations": 0})
    data = ClientData(client_size=n, seed=seed, truth_dir=str(out / "clients"), part=part)
    t0 = time.perf_counter()
    with server_identity():
        server_main(InProcessGrid(make_client_app(data), clients), spec)
    wall = time.perf_counter() - t0
    m = evaluate_run(out, out / "clients")
    s = m["summary"]
    secs = [c["attack_seconds"] for c in m["clients"] if c.get("attack_seconds") is not None]
    return {"method": method, "n": n, "E": steps, "images_per_update": m["clients"][0]["images"],
            "updates": s["scored"], "images": s["images"], "data_seed": seed,
            **{f"{k}_{w}": v for k in ("reid", "psnr") for w, v in s[k].items()},
            **{f"{k}_{w}_interval": v for k in ("reid", "psnr") for w, v in s[f"{k}_interval"].items()},
            "label_acc": s["label_accuracy"], "label_acc_interval": s["label_accuracy_interval"],
            "attack_s": sum(secs) / len(secs), "round_wall_s": wall, "part": part, "out": str(out)}


def compare(tmp: Path, method: str, clients: int, lr: float, seed: int) -> dict:
    """E = 1 updates vs client.share gradients of the same digits, same attack."""
    row = one_round(tmp, method, clients, 1, 1, lr, seed)
    out = Path(row["out"])
    settings = {"decoder": str(artifacts.resolve_path("tiny-mnist-decoder")), "iterations": 0}
    server = Server(RunSpec(out=str(out), recipe=Recipe(peft=PeftConfig(method=method))))
    res = {"update": [], "gradient": []}
    for upd in sorted((out / "rounds" / "round-001" / "updates").glob("node-*.safetensors")):
        node = int(upd.stem.split("-")[1])
        obs_u = Observation.load(upd)
        truth = Truth.load(out / "clients" / f"node-{node}" / "round-001.truth.safetensors")
        server.victim.load_peft_state(obs_u.peft_state)
        obs_g = share(server.victim, truth.images, truth.labels, data=obs_u.meta["data"])
        _, public = public_for_observation(obs_g.meta)
        for kind, obs in (("update", obs_u), ("gradient", obs_g)):
            victim = rebuild_victim(obs if kind == "gradient" else Observation(
                gradients=obs.gradients, meta={**obs.meta, "kind": "gradient", "batch_size": 1},
                peft_state=obs.peft_state), server.weights)
            rec: Reconstruction = run_attack("featmatch", obs, victim, make_config("featmatch", **settings))
            nn, _ = public_nearest_neighbour(victim, public, rec.features, rec.labels)
            from clipleak.client import load_private
            from clipleak.data import DataSpec

            private = load_private(DataSpec.from_dict(obs_u.meta["data"]), 32)
            ev = evaluate(rec, truth, public.prototypes(), with_lpips=False, reid_pool=private,
                          extra_baselines={"public-nn": nn})
            cos = None
            if kind == "update":
                res.setdefault("features", []).append(rec.features)
            else:
                cos = float((rec.features * res["features"][-1]).sum())
            res[kind].append({"node": node, "psnr": ev["methods"]["attack"]["psnr_mean"],
                              "reid": ev["reidentification"]["attack"], "label": ev["label_accuracy"],
                              "feature_cos_update_vs_gradient": cos})
    res.pop("features")
    summary = {k: {"psnr": sum(r["psnr"] for r in v) / len(v), "reid": sum(r["reid"] for r in v) / len(v),
                   "reid_interval": pooled_rate([r["reid"] for r in v], [1] * len(v)).to_dict(),
                   "labels": sum(r["label"] for r in v) / len(v)} for k, v in res.items()}
    return {"method": method, "digits": clients, "summary": summary, "per_digit": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="adapter")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--draw-seed", "--seed", dest="seed", type=int, default=0,
                    help="the clients' data seed: which private digits they hold, their batches and DP noise")
    ap.add_argument("--steps", default="1,2,5,10", help="E values of the E sweep (n fixed at --n-for-e)")
    ap.add_argument("--sizes", default="1,2,5,10", help="n values of the n sweep (E fixed at --e-for-n)")
    ap.add_argument("--n-for-e", type=int, default=10)
    ap.add_argument("--e-for-n", type=int, default=10)
    ap.add_argument("--grid", action="store_true", help="run the E sweep and the n sweep")
    ap.add_argument("--compare", action="store_true", help="E = 1 updates vs single gradients")
    ap.add_argument("--part", default="private", help="the clients' split: private (reported) or validation (tuning)")
    ap.add_argument("--name", default="fl_leakage", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cells = [(args.n_for_e, int(e)) for e in args.steps.split(",") if e.strip()]
    cells += [(int(n), args.e_for_n) for n in args.sizes.split(",")
              if n.strip() and (int(n), args.e_for_n) not in cells]
    per_cell = [args.clients] if args.compare else []
    per_cell += [args.clients * min(n, e) for n, e in cells] if args.grid else []
    prov = provenance(split=args.part if args.grid else "private", draw_seeds=[args.seed],
                      images=max(per_cell, default=0), threads=args.threads)
    notes = (f"One FedAvg round of {args.clients} clients ({args.method}, SGD at batch 1, lr {args.lr:g}) on the "
             "in-process grid; every update attacked with featmatch and tiny-mnist-decoder (no search) and scored "
             "one-to-one among K = 10 same-class private digits (chance 10%); n: digits per client, E: local "
             "steps, images: the distinct digits the attacked updates touched. Compare rows: each client holds one "
             "digit; its E = 1 update and client.share's gradient of the same digit at the same global state.")
    rows: list[dict[str, Any]] = []

    def keep(new: list[dict[str, Any]]) -> None:
        rows.extend(new)
        write_results(args.name, rows, prov, title=f"Federated updates: leakage against E and n ({args.method})",
                      columns=COLUMNS, notes=notes)

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.compare:
            keep(compare_rows(compare(tmp, args.method, args.clients, args.lr, args.seed)))
            if args.grid:  # the grid takes a while: the comparison's rows now
                print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]),
                      flush=True)
        if args.grid:
            for n, e in cells:
                r = one_round(tmp, args.method, args.clients, n, e, args.lr, args.seed, args.part)
                r.pop("out")
                keep([grid_row(r)])
                print(f"{args.method} n {n} E {e}: {r['images']} images, re-id {r['reid_attack']:.0%}, "
                      f"PSNR {r['psnr_attack']:.1f} dB", flush=True)
    if rows:
        print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
        print(f"wrote benchmarks/results/{args.name}.json")


if __name__ == "__main__":
    main()
