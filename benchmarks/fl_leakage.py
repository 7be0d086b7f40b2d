"""Leakage of federated updates: E = 1 updates against single gradients, and re-identification against the
number of local steps E and the client's dataset size n (docs/fl.md).

Every cell is one FedAvg round of ``--clients`` clients through the real apps (ClientApp, AttackingFedAvg,
ServerApp) on the in-process grid (no Ray: the transport does not change an update), each client holding
``n`` private digits and running E SGD steps at batch 1; the server attacks every update with featmatch and
the decoder (``tiny-mnist-decoder``, no search); the evaluator pairs the reconstructions with the clients'
truth (the E distinct digits each touched, ``min(n, E)``) and scores them one-to-one (re-identification
among K = 10 same-class private digits; chance 10%), each rate with its 95% interval over the attacked
images. ``--seed`` is the clients' data seed: it picks which private digits they hold.

    python benchmarks/fl_leakage.py --method adapter --grid --threads 1
    python benchmarks/fl_leakage.py --method adapter --compare --clients 8

``--compare``: each of ``--clients`` clients holds one digit; its E = 1 update is attacked, and so is the
single-gradient observation ``client.share`` makes of the same digit at the same global state (same
attack, same digits).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from clipleak import artifacts
from clipleak.attacks import make_config, run_attack
from clipleak.client import share
from clipleak.data import public_for_observation
from clipleak.evaluation import evaluate, pooled_rate, public_nearest_neighbour
from clipleak.fl import ClientData, InProcessGrid, Recipe, RunSpec, make_client_app, server_identity, server_main
from clipleak.fl.run import evaluate_run
from clipleak.fl.server_app import Server
from clipleak.peft import rebuild_victim
from clipleak.records import Observation, Reconstruction, Truth


def one_round(tmp: Path, method: str, clients: int, n: int, steps: int, lr: float, seed: int,
              part: str = "private") -> dict:
    out = tmp / f"{method}-n{n}-e{steps}-s{seed}"
    spec = RunSpec(out=str(out), clients=clients, rounds=1,
                   recipe=Recipe(method=method, local_steps=steps, batch_size=1, lr=lr),
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
    server = Server(RunSpec(out=str(out), recipe=Recipe(method=method)))
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
    ap.add_argument("--seed", type=int, default=0,
                    help="the clients' data seed: which private digits they hold, their batches and DP noise")
    ap.add_argument("--steps", default="1,2,5,10", help="E values of the E sweep (n fixed at --n-for-e)")
    ap.add_argument("--sizes", default="1,2,5,10", help="n values of the n sweep (E fixed at --e-for-n)")
    ap.add_argument("--n-for-e", type=int, default=10)
    ap.add_argument("--e-for-n", type=int, default=10)
    ap.add_argument("--grid", action="store_true", help="run the E sweep and the n sweep")
    ap.add_argument("--compare", action="store_true", help="E = 1 updates vs single gradients")
    ap.add_argument("--part", default="private", help="the clients' split: private (reported) or validation (tuning)")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.compare:
            r = compare(tmp, args.method, args.clients, args.lr, args.seed)
            print(json.dumps(r["summary"]), flush=True)
            rows.append(r)
        if args.grid:
            cells = [(args.n_for_e, int(e)) for e in args.steps.split(",")]
            cells += [(int(n), args.e_for_n) for n in args.sizes.split(",") if (int(n), args.e_for_n) not in cells]
            for n, e in cells:
                r = one_round(tmp, args.method, args.clients, n, e, args.lr, args.seed, args.part)
                r.pop("out")
                print(json.dumps(r), flush=True)
                rows.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
