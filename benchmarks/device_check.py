"""Device check: the headline paths on one device, each asserted and timed.

Paths (``--device``, default auto: a GPU when there is one):

* share -> attack -> evaluate for the adapter, CoOp and full-visual at batch 1 and 4:
  tiny-32 with the tiny-mnist weights (MIP with tiny-mnist-decoder, on private digits), and ViT-B-32 size
  (random init, 224 px, sklearn digits: at batch 1 the features are read off the update and matched by a few
  pixel steps, no decoder serving a random init; at batch 4 a few gradient-matching steps);
* one audit cell through the API (tiny-mnist, adapter, no DP, 2 private digits, a short DP fine-tuning);
* one DP-SGD step of the adapter (:class:`clipleak.training.FinetuneRun`) at both sizes;
* one Flower round of 2 clients through the in-process runner (tiny-mnist adapter; the clients compute on
  the device, the server on the CPU).

Each path asserts its result (files written, shapes, finite metrics; MIP on the tiny-mnist adapter at batch 1
re-identifies at least 3 of 4 private digits) and records its seconds. Rows go to
``benchmarks/results/NAME.json`` with provenance (``device``: the device in words). ``--quick`` runs the
tiny-32 paths only, with a few gradient-matching steps in place of MIP at batch 4.

    python benchmarks/device_check.py --quick --threads 1          # CPU, a few minutes
    python benchmarks/device_check.py --device cuda                # a GPU, everything
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipleak import api, artifacts
from clipleak.devices import describe, resolve_device
from clipleak.evaluation.stats import wilson
from clipleak.peft import PeftConfig
from clipleak.records import Observation, Reconstruction, Truth
from clipleak.report.results import provenance, write_results

COLUMNS = [("size", "size"), ("path", "path"), ("method", "method"), ("batch", "batch"),
           ("seconds", "seconds"), ("check", "checked")]
METHODS = ("adapter", "coop", "full-visual")
BATCHES = (1, 4)
REID_DRAWS = 4
"""Private digits the tiny-mnist adapter batch-1 MIP row attacks; at least 3 must be re-identified."""

SIZES: dict[str, dict[str, Any]] = {
    "tiny-32": {"arch": "tiny-32", "weights": "tiny-mnist", "data": "mnist", "attack": "mip",
                "settings": {"decoder": "tiny-mnist-decoder"}},
    # --quick on a CPU: batch 4 runs a few gradient-matching steps instead of MIP's batch fit (minutes there)
    "tiny-32 quick b4": {"arch": "tiny-32", "weights": "tiny-mnist", "data": "mnist", "attack": "ig",
                         "settings": {"iterations": 3, "restarts": 1}},
    # a random init has no decoder: the read-out's features are matched by a few pixel steps
    "ViT-B-32": {"arch": "ViT-B-32", "weights": None, "data": "digits", "attack": "featmatch",
                 "settings": {"iterations": 3, "restarts": 1, "prior": "tv"}},
    # batch 4 at ViT-B-32 size: a few gradient-matching steps (double backward through the towers); the batch
    # read-outs' iterative fits are exercised at tiny-32 size
    "ViT-B-32 b4": {"arch": "ViT-B-32", "weights": None, "data": "digits", "attack": "ig",
                    "settings": {"iterations": 3, "restarts": 1}},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _finite(x: Any) -> bool:
    return x is None or (isinstance(x, int | float) and math.isfinite(float(x)))


def share_attack_evaluate(size: str, method: str, batch: int, seed: int, root: Path, device: torch.device,
                          quick: bool = False) -> tuple[dict[str, Any], float | None]:
    """One share -> attack -> evaluate run through files; returns its row and its re-identification rate."""
    key = size
    if batch > 1 and f"{size} b4" in SIZES:
        key = f"{size} b4"
    if batch > 1 and quick and f"{size} quick b4" in SIZES:
        key = f"{size} quick b4"
    s = SIZES[key]
    d = root / f"{size}-{method}-b{batch}-s{seed}"
    (obs, truth), t_share = _timed(device, lambda: api.make_observation(
        arch=s["arch"], weights=s["weights"], data=s["data"], peft=PeftConfig(method=method), batch_size=batch,
        seed=seed, device=device))
    obs_path, truth_path = obs.save(d / "observation"), truth.save(d / "truth")
    assert obs_path.is_file() and truth_path.is_file()
    loaded = Observation.load(obs_path)
    assert all(g.device.type == "cpu" and torch.isfinite(g).all() for g in loaded.gradients.values())
    rec, t_attack = _timed(device, lambda: api.attack_observation(
        obs_path, name=s["attack"], weights=s["weights"], device=device, **s["settings"]))
    rec.save(d / "reconstruction")
    tru = Truth.load(truth_path)
    rec = Reconstruction.load(d / "reconstruction")
    assert rec.images.shape == tru.images.shape and torch.isfinite(rec.images).all()
    (report, ev), t_eval = _timed(device, lambda: api.evaluate_reconstruction(
        d / "reconstruction", truth_path, d / "report", with_lpips=False, device=device))
    assert Path(report).is_file()
    means = ev["methods"]["attack"]
    assert _finite(means["psnr_mean"]) and _finite(means["ssim_mean"]), means
    reid = (ev.get("reidentification") or {}).get("attack")
    assert reid is None or 0.0 <= reid <= 1.0
    row = {"size": size, "path": f"share/{s['attack']}/evaluate", "method": method, "batch": batch,
           "seconds": round(t_share + t_attack + t_eval, 2),
           "stages": {"share": round(t_share, 2), "attack": round(t_attack, 2), "evaluate": round(t_eval, 2)},
           "reidentification": reid, "check": "files, shapes, finite metrics"}
    return row, reid


def audit_cell(root: Path, device: torch.device) -> dict[str, Any]:
    """One audit cell through the API (tiny-mnist, adapter, no DP, 2 images, a short DP fine-tuning)."""
    from clipleak.audit import AuditConfig

    cfg = AuditConfig(epsilons=[math.inf], methods=["adapter"], batch_sizes=[1], images=2,
                      finetune={"steps": 5, "batch_size": 25, "clip": 0.01, "lr": 1e-2, "sampling": "poisson"},
                      canaries=20)
    summary, t = _timed(device, lambda: api.audit(cfg, root / "audit", device=device))
    assert summary, "the audit returned no summary"
    written = [p for p in (root / "audit").rglob("*") if p.is_file()]
    assert written, "the audit wrote no files"
    return {"size": "tiny-32", "path": "audit cell (api.audit)", "method": "adapter", "batch": 1,
            "seconds": round(t, 2), "check": f"summary, {len(written)} files"}


def dp_sgd_step(size: str, device: torch.device) -> dict[str, Any]:
    """One DP-SGD step (per-example clipping + noise) of the adapter on 8 encoded private images."""
    from clipleak.client import load_private
    from clipleak.data import DataSpec
    from clipleak.models import build_model
    from clipleak.peft import build_victim
    from clipleak.training import FinetuneConfig, finetune_dp
    from clipleak.training.finetune import FinetuneRun, encode

    s = SIZES[size]
    weights = artifacts.resolve_path(s["weights"]) if s["weights"] else None
    clip = build_model(s["arch"], weights, device=device)
    private = load_private(DataSpec.parse(s["data"]), clip.image_size, "private")
    cfg = FinetuneConfig(peft=PeftConfig(method="adapter"), steps=1, batch_size=8, sampling="fixed",
                         dp=finetune_dp("per-example", clip=0.1, noise_multiplier=1.0))
    victim = build_victim(clip, private.classnames, cfg.peft)
    raw = encode(victim, private.images[:8])
    run = FinetuneRun(cfg, victim, raw, private.labels[:8], cfg.dp_setting(8))
    before = {k: p.detach().clone() for k, p in run.params.items()}
    loss, t = _timed(device, lambda: run.step(0, None))
    assert math.isfinite(loss)
    moved = any(not torch.equal(before[k], p.detach()) for k, p in run.params.items())
    assert moved and all(torch.isfinite(p).all() for p in run.params.values())
    return {"size": size, "path": "DP-SGD step", "method": "adapter", "batch": 8, "seconds": round(t, 3),
            "check": "finite loss, parameters moved"}


def flower_round(root: Path, device: torch.device) -> dict[str, Any]:
    """One FedAvg round of 2 clients (in-process runner), the server attacking each update."""
    from clipleak.fl import ClientData, Recipe, RunSpec
    from clipleak.fl.run import run_federated
    from clipleak.fl.server_app import finished_rounds

    out = root / "fl"
    spec = RunSpec(out=str(out), clients=2, rounds=1, recipe=Recipe(peft=PeftConfig(method="adapter")),
                   attack="featmatch",
                   attack_settings={"iterations": 0, "decoder": "tiny-mnist-decoder"})
    data = ClientData(truth_dir=str((out / "clients").resolve()), device=str(device))
    state, t = _timed(device, lambda: run_federated(spec, data, engine="inprocess"))
    assert finished_rounds(state) == 1, f"the round did not finish: {state}"
    return {"size": "tiny-32", "path": "Flower round (in-process)", "method": "adapter", "batch": 1,
            "seconds": round(t, 2), "check": "a finished round"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--quick", action="store_true", help="tiny-32 paths only (a few minutes on a CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", help="results file (default benchmarks/results/device_check[-quick].json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = ["tiny-32"] if args.quick else ["tiny-32", "ViT-B-32"]
    prov = provenance(split="private", draw_seeds=range(REID_DRAWS), images=REID_DRAWS, threads=args.threads,
                      device=describe(device))
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        print(f"{row['size']:9s} {row['path']:28s} {row['method']:12s} b{row['batch']:<2d} {row['seconds']:8.2f} s",
              flush=True)

    with tempfile.TemporaryDirectory(prefix="clipleak-device-check-") as tmp:
        root = Path(tmp)
        for size in sizes:
            for method in METHODS:
                for batch in BATCHES:
                    draws = REID_DRAWS if (size, method, batch) == ("tiny-32", "adapter", 1) else 1
                    reids: list[float] = []
                    row: dict[str, Any] = {}
                    seconds = 0.0
                    for seed in range(draws):
                        row, reid = share_attack_evaluate(size, method, batch, seed, root, device, args.quick)
                        reids.append(float(reid) if reid is not None else 0.0)
                        seconds += row["seconds"]
                    if draws > 1:
                        row["seconds"], row["draws"] = round(seconds, 2), draws  # stages: the last draw's
                        hits = sum(reids)
                        iv = wilson(hits, draws)
                        row["reidentification"] = {"value": hits / draws, "low": iv.low, "high": iv.high, "n": draws}
                        row["check"] += f"; MIP re-identification {hits:.0f}/{draws}"
                        assert hits >= draws - 1, f"tiny-mnist adapter b1: MIP re-identified {hits}/{draws}"
                    done(row)
            done(dp_sgd_step(size, device))
        done(audit_cell(root, device))
        done(flower_round(root, device))
    prov["seconds_total"] = round(time.perf_counter() - t_all, 1)
    name = Path(args.out).stem if args.out else ("device_check-quick" if args.quick else "device_check")
    root_dir = Path(args.out).parent if args.out else Path("benchmarks/results")
    title = f"Device check on {describe(device)}" + (" (tiny-32 only)" if args.quick else "")
    notes = ("Each path asserted (files written, shapes, finite metrics; MIP on the tiny-mnist adapter at batch 1 "
             f"re-identifies at least {REID_DRAWS - 1} of {REID_DRAWS} private digits). Seconds are wall time "
             "including model building and data loading, upper bounds on a shared machine.")
    path = write_results(name, rows, prov, title=title, columns=COLUMNS, notes=notes, root=root_dir)
    print(f"all {len(rows)} paths passed on {describe(device)} in {prov['seconds_total']:.0f} s; results: {path}")


if __name__ == "__main__":
    sys.exit(main())
