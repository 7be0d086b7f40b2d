"""Running a federated experiment (Flower simulation or in-process) and the evaluator's report on it.

The evaluator is the only party that sees both sides: after the run it pairs each reconstruction the
server made (``OUT/rounds/round-RRR/attacks/node-N``) with the truth client ``N`` wrote for that round
(``TRUTH_DIR/node-N/round-RRR.truth.safetensors``), scores it next to the class prototype and the public
nearest neighbour, and writes ``OUT/report/`` (``report.html``, ``metrics.json``, one comparison PNG per
attacked update).
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..client import load_private
from ..data import public_for_observation
from ..errors import ClipleakError
from ..evaluation import evaluate, public_nearest_neighbour
from ..models import build_model
from ..peft import PeftConfig, build_victim
from ..records import Reconstruction, Truth
from ..report.html import save_comparison
from .client_app import make_client_app, truth_path
from .inprocess import InProcessGrid, server_identity
from .local import ClientData
from .server_app import EventFn, RunSpec, finished_rounds, load_state, make_server_app, server_main

ENGINES = ("simulation", "inprocess")


def run_federated(spec: RunSpec, data: ClientData, *, engine: str = "simulation", parallel: int = 1,
                  on_event: EventFn | None = None, quiet: bool = True) -> dict[str, Any]:
    """Run (or resume) ``spec``'s rounds with clients holding ``data``; returns ``state.json``'s content.

    ``simulation``: Flower's simulation engine (Ray), ``parallel`` clients at a time, one CPU and one torch
    thread each. ``inprocess``: the same apps through :class:`InProcessGrid` (no Ray).
    """
    if engine not in ENGINES:
        raise ClipleakError(f"unknown engine {engine!r}: {', '.join(ENGINES)}")
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if engine == "inprocess":
        grid = InProcessGrid(make_client_app(data), spec.clients)
        with server_identity():
            server_main(grid, spec, on_event)
    else:
        from flwr.simulation import run_simulation

        run_simulation(server_app=make_server_app(spec, on_event), client_app=make_client_app(data),
                       num_supernodes=spec.clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": max(1, parallel), "num_gpus": 0,
                                                     "include_dashboard": False, "log_to_driver": False}},
                       verbose_logging=not quiet)
    state = load_state(spec.out)
    if finished_rounds(state) < spec.rounds:
        raise ClipleakError(f"the run stopped after {finished_rounds(state)} of {spec.rounds} rounds "
                            f"(Flower's log says why); rerun the same command to resume")
    return state


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def evaluate_run(out: str | Path, truth_dir: str | Path, *, reid_k: int = 10) -> dict[str, Any]:
    """Evaluator side: pair every reconstruction with its client's truth, score, write ``OUT/report``."""
    out = Path(out)
    state = load_state(out)
    spec = json.loads((out / "run.json").read_text())
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    clients: list[dict[str, Any]] = []
    cache: dict[str, Any] = {}
    for rdir in sorted((out / "rounds").glob("round-*")):
        rnd = int(rdir.name.split("-")[1])
        if str(rnd) not in state["rounds"]:
            continue
        for adir in sorted((rdir / "attacks").glob("node-*"), key=lambda p: int(p.name.split("-")[1])):
            node = int(adir.name.split("-")[1])
            rec = Reconstruction.load(adir)
            tp = truth_path(truth_dir, node, rnd)
            if not tp.is_file():
                raise ClipleakError(f"no truth for node {node}, round {rnd}: {tp} (the clients' truth folder?)")
            truth = Truth.load(tp)
            meta = rec.meta["observation"]
            if "ctx" not in cache:
                ds, public = public_for_observation(meta)
                clip = build_model(meta["arch"], meta["weights"])
                part = str(truth.meta.get("part", "private"))
                cache["ctx"] = (public, load_private(ds, int(meta["image_size"]), part),
                                build_victim(clip, list(meta["classnames"]), PeftConfig(method="adapter")))
            public, private, victim = cache["ctx"]
            entry: dict[str, Any] = {"round": rnd, "node_id": node, "images": int(truth.images.shape[0]),
                                     "reconstructed": int(rec.images.shape[0]),
                                     "from_update": meta.get("from_update"),
                                     "attack_seconds": rec.meta.get("attack_seconds")}
            if rec.images.shape != truth.images.shape:
                entry["error"] = (f"the attack made {rec.images.shape[0]} images, the client used "
                                  f"{truth.images.shape[0]}")
                clients.append(entry)
                continue
            with torch.no_grad():
                est = rec.features if rec.features is not None else victim.raw_image_features(rec.images)
            nn_images, _ = public_nearest_neighbour(victim, public, est, rec.labels)
            ev = evaluate(rec, truth, public.prototypes(), with_lpips=False, reid_pool=private, reid_k=reid_k,
                          extra_baselines={"public-nn": nn_images})
            perm = torch.tensor(ev["pairing"])
            names = list(meta["classnames"])
            tl = truth.labels.tolist()
            rl = rec.labels[perm].tolist()
            png = report / f"round-{rnd:03d}-node-{node}.png"
            save_comparison([("truth", truth.images, [names[i] for i in tl]),
                             ("reconstruction", rec.images[perm], [names[i] for i in rl]),
                             ("prototype", public.prototypes()[rec.labels[perm]], [names[i] for i in rl]),
                             ("public NN", nn_images[perm], [names[i] for i in rl])], png)
            m = ev["methods"]
            reid = ev["reidentification"] or {}
            entry.update({"png": png.name, "label_accuracy": ev["label_accuracy"],
                          "psnr": {k: m[k]["psnr_mean"] for k in ("attack", "prototype", "public-nn")},
                          "ssim": {k: m[k]["ssim_mean"] for k in ("attack", "prototype", "public-nn")},
                          "reid": {k: reid.get(k) for k in ("attack", "prototype", "public-nn")},
                          "verdict": ev["verdict"]["text"]})
            clients.append(entry)
    scored = [c for c in clients if "psnr" in c]
    summary: dict[str, Any] = {"attacked_updates": len(clients), "scored": len(scored)}
    for key in ("psnr", "ssim", "reid"):
        summary[key] = {k: _mean([c[key][k] for c in scored]) for k in ("attack", "prototype", "public-nn")}
    metrics = {"run": spec, "initial_accuracy": state.get("initial_accuracy"), "rounds": state["rounds"],
               "clients": clients, "summary": summary}
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (report / "report.html").write_text(_html(metrics))
    return metrics


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _html(m: dict[str, Any]) -> str:
    e = html.escape
    run = m["run"]
    rec = run["recipe"]
    rows = [f"<tr><td>0 (start)</td><td>{_f(m['initial_accuracy'], '.1%')}</td><td></td><td></td><td></td></tr>"]
    for r in sorted(m["rounds"], key=int):
        x = m["rounds"][r]
        rows.append(f"<tr><td>{r}</td><td>{_f(x.get('accuracy'), '.1%')}</td><td>{len(x.get('attacked', []))} of "
                    f"{len(x.get('clients', []))}</td><td>{_f(x.get('epsilon_so_far'), '.3g')}</td>"
                    f"<td>{_f(x.get('seconds'), '.1f')}</td></tr>")
    cl = []
    for c in m["clients"]:
        if "error" in c:
            cl.append(f"<h3>round {c['round']}, node {c['node_id']}</h3><p>{e(c['error'])}</p>")
            continue
        cl.append(
            f"<h3>round {c['round']}, node {c['node_id']}: {c['images']} image(s)</h3>"
            f"<p>PSNR attack {_f(c['psnr']['attack'], '.1f')} dB, prototype {_f(c['psnr']['prototype'], '.1f')} dB, "
            f"public NN {_f(c['psnr']['public-nn'], '.1f')} dB; "
            f"re-identification attack {_f(c['reid']['attack'], '.0%')}, "
            f"prototype {_f(c['reid']['prototype'], '.0%')}, public NN {_f(c['reid']['public-nn'], '.0%')}; labels "
            f"{_f(c['label_accuracy'], '.0%')}</p><p>{e(c['verdict'])}</p><img src=\"{e(c['png'])}\">")
    s = m["summary"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>clipleak federated run</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}
td,th{{padding:2px 10px;border-bottom:1px solid #ccc}} img{{max-width:100%}}</style></head><body>
<h1>Federated run: {run['clients']} clients, {run['rounds']} rounds, {e(rec['method'])}</h1>
<p>E = {rec['local_steps']} local steps, B = {rec['batch_size']}, eta = {rec['lr']}, DP: {e(json.dumps(rec['dp']))};
attack {e(str(run['attack']))} {e(json.dumps(run['attack_settings']))}</p>
<h2>Global model (FedAvg) accuracy on the validation split</h2>
<table><tr><th>round</th><th>accuracy</th><th>attacked</th><th>epsilon so far</th><th>seconds</th></tr>
{''.join(rows)}</table>
<h2>Attacked updates ({s['scored']} scored of {s['attacked_updates']})</h2>
<p>Means: PSNR attack {_f(s['psnr']['attack'], '.1f')} dB (prototype {_f(s['psnr']['prototype'], '.1f')},
public NN {_f(s['psnr']['public-nn'], '.1f')}); re-identification attack {_f(s['reid']['attack'], '.0%')}
(prototype {_f(s['reid']['prototype'], '.0%')}, public NN {_f(s['reid']['public-nn'], '.0%')}; chance 10%).
Rows of each figure: the client's truth, the reconstruction, the class prototype, the public nearest neighbour.</p>
{''.join(cl)}
</body></html>
"""
