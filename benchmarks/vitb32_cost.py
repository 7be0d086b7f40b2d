"""Real-size cost of the MIP read-outs: a random-init ViT-B-32 (open_clip's own, 224 px, saved to a temporary
.pt; nothing is downloaded) on skimage-photos (K = 8 classes), batch 1 and batch 4. Per case: the client's
share, the attacker's public features, and the read-out (CoOp: the text Jacobian, its SVD and the feature fit;
the adapter read-out; the ViT projection read-out of a full-visual gradient), in seconds, with the peak
resident memory (GB) of the case's own process. Quality on a random init means nothing; each finished
read-out is checked for whether its fit reproduces the observed gradient (relative residual below 1e-3): the
run exits non-zero when one does not (its row says so).

    python benchmarks/vitb32_cost.py --threads 2                  # every case, benchmarks/results/vitb32_cost.json
    python benchmarks/vitb32_cost.py --threads 1 --cases coop:1,coop-cs:1,adapter:1,projection:1
    python benchmarks/vitb32_cost.py --case-timeout 300           # a case past it is stopped, reported unfinished

Each case runs in a fresh process, so its peak RSS is its own. A case stopped at --case-timeout reports its
peak RSS so far and no read-out time. A batch-1 case costs about a CPU minute or less, share and public
features included; the batch-4 CoOp fits (label search, then up to thousands of Levenberg-Marquardt steps over
4 x 512 unknowns) cost far more, so give them a --case-timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES: dict[str, dict[str, Any]] = {
    "coop": dict(method="coop"), "coop-cs": dict(method="coop", class_specific=True),
    "adapter": dict(method="adapter"), "projection": dict(method="full-visual")}
NAMES = {"coop": "CoOp feature fit, shared context", "coop-cs": "CoOp feature fit, class-specific context",
         "adapter": "adapter read-out", "projection": "ViT projection read-out (full-visual)"}
DEFAULT_CASES = "coop:1,4;coop-cs:1,4;adapter:1,4;projection:1,4"
RESIDUAL_BOUND = 1e-3
COLUMNS = [("readout", "read-out"), ("batch", "batch"), ("status", "status"), ("readout_cpu_s", "read-out CPU s"),
           ("readout_s", "read-out wall s"), ("jacobian_cpu_s", "text Jacobian CPU s"), ("svd_cpu_s", "SVD CPU s"),
           ("fit_cpu_s", "fit CPU s"), ("share_cpu_s", "share CPU s"), ("public_cpu_s", "public features CPU s"),
           ("peak_rss_gb", "peak RSS GB"), ("residual", "fit residual"), ("load", "load avg")]


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Clock:
    """Wall and CPU seconds of consecutive stages into ``row`` (``NAME_s``, ``NAME_cpu_s``): on a shared
    machine the process's CPU seconds are the better estimate of what an idle machine takes."""

    def __init__(self, row: dict):
        self.row = row
        self.last = self.mark()

    @staticmethod
    def mark() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def lap(self, name: str, since: tuple[float, float] | None = None) -> None:
        now = self.mark()
        ref = since if since is not None else self.last
        self.row[f"{name}_s"] = now[0] - ref[0]
        self.row[f"{name}_cpu_s"] = now[1] - ref[1]
        self.last = now


def run_case(kind: str, batch: int, weights: str, threads: int) -> dict:
    """One case in this process: the timings, the fit's residual and the peak RSS."""
    import torch

    torch.set_num_threads(threads)
    from clipleak.api import make_observation
    from clipleak.data.split import public_for_observation
    from clipleak.peft import PeftConfig, rebuild_victim
    from clipleak.recover import CoopGradientModel, coop_features, recovered_features, text_jacobian
    from clipleak.recover.bank import public_features

    row: dict = {}
    clock = Clock(row)
    obs, _ = make_observation(arch="ViT-B-32", weights=weights, data="skimage-photos", batch_size=batch, seed=0,
                              peft=PeftConfig(**CASES[kind]))
    clock.lap("share")
    victim = rebuild_victim(obs)
    public = public_for_observation(obs.meta)[1]
    if kind != "projection":
        pub = public_features(victim.clip_info, public)
        clock.lap("public")
    start = clock.mark()
    if kind.startswith("coop"):
        jac_text = text_jacobian(victim)
        clock.lap("jacobian")
        model = CoopGradientModel(victim, jac_text)
        clock.lap("svd")
        fit = coop_features(obs, victim, pub, public.labels, model=model)
        clock.lap("fit")
        residual = fit.residual
    else:
        residual = float(recovered_features(obs, victim, labels="predicted").residual or 0.0)
    clock.lap("readout", since=start)
    row["residual"] = residual
    row["peak_rss_gb"] = _peak_rss_gb()
    row["reproduces"] = residual < RESIDUAL_BOUND
    return row


def _vm_hwm_gb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _spawn(kind: str, batch: int, weights: str, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{kind}:{batch}", "--weights", weights, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    start, hwm = time.monotonic(), None
    while proc.poll() is None:
        hwm = _vm_hwm_gb(proc.pid) or hwm
        if timeout and time.monotonic() - start > timeout:
            proc.kill()
            proc.wait()
            return {"status": f"stopped at {timeout:.0f} s", "peak_rss_gb": hwm}
        time.sleep(0.5)
    out = proc.stdout.read() if proc.stdout else ""
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"case {kind}:{batch} failed (exit {proc.returncode})")
    row = json.loads(lines[-1])
    return {"status": "done" if row["reproduces"] else "residual above 1e-3", **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES,
                    help=f"KIND:B[,B...] separated by ';' (KIND: {', '.join(CASES)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case-timeout", type=float, default=0.0, help="seconds per case (0: none)")
    ap.add_argument("--name", default="vitb32_cost", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, _, b = args.one.partition(":")
        print(json.dumps(run_case(kind, int(b), args.weights, args.threads)), flush=True)
        return

    import open_clip
    import torch

    from clipleak.report.results import markdown_table, provenance, write_results

    cells: list[tuple[str, int]] = []
    for part in args.cases.split(";"):
        kind, _, batches = part.strip().partition(":")
        if kind not in CASES or not batches:
            ap.error(f"bad case {part!r}: use KIND:B[,B...] with KIND one of {', '.join(CASES)}")
        cells += [(kind, int(b)) for b in batches.split(",")]
    prov = provenance(split="private", draw_seeds=[0], images=0, threads=args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vitb32-cost-") as tmp:
        weights = str(Path(tmp) / "vitb32.pt")
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)  # random init, no download
        for kind, b in cells:
            load = os.getloadavg()[0]
            row = _spawn(kind, b, weights, args.threads, args.case_timeout)
            row.update(case=f"{NAMES[kind]}, batch {b}", readout=NAMES[kind], batch=b,
                       load=round(max(load, os.getloadavg()[0]), 1))
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            path = write_results(args.name, rows, prov, title="Real-size cost of the MIP read-outs (ViT-B-32, 224 px)",
                                 columns=COLUMNS, notes=NOTES.format(threads=args.threads))
    print()
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"\nwrote {path}")
    failed = [r["case"] for r in rows if r.get("reproduces") is False]
    if failed:  # the rows are written; the run still fails
        raise SystemExit(f"the fit does not reproduce the observed gradient (relative residual >= "
                         f"{RESIDUAL_BOUND:g}): {'; '.join(failed)}")


NOTES = ("A random-init open_clip ViT-B-32 (224 px, text width 512, E = 512; CoOp with 4 shared context "
         "vectors: P = 2048 gradient numbers) on skimage-photos (K = 8 classes), private split, draw seed 0, "
         "{threads} CPU thread(s). Seconds per stage: CPU seconds of the case's process (on a shared machine the "
         "better estimate of an idle machine's wall time at 1 thread) and wall seconds; peak RSS of the case's "
         "own process (the share included). "
         "Quality on a random init is not meaningful: each finished read-out is checked only for whether its fit "
         "reproduces the observed gradient (relative residual < 1e-3). load avg: the 1-minute load average "
         "while the case ran (a shared machine makes every time an upper bound).")


if __name__ == "__main__":
    main()
