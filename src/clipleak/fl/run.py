"""Running a federated experiment (Flower simulation or in-process) and the evaluator's report on it.

The evaluator is the only party that sees both sides: after the run it pairs each reconstruction the
server made (``OUT/rounds/round-RRR/attacks/node-N``) with the truth client ``N`` wrote for that round
(``TRUTH_DIR/node-N/round-RRR.truth.safetensors``), scores it next to the class prototype and the public
nearest neighbour, and writes ``OUT/report/`` (``report.html``, ``metrics.json``, one comparison PNG per
attacked update), every rate with its 95% interval over the images.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..client import load_private
from ..data import public_for_observation
from ..errors import ClipleakError
from ..evaluation import (
    Interval,
    at_chance,
    bootstrap_mean,
    evaluate,
    pooled_rate,
    public_nearest_neighbour,
    rate_interval,
)
from ..models import build_model
from ..peft import PeftConfig, build_victim
from ..records import Reconstruction, Truth, digests_match
from ..report.html import save_comparison
from ..report.page import Section, image, interval_text, paragraph, table, write_page
from .client_app import make_client_app, truth_path
from .inprocess import InProcessGrid, server_identity
from .local import ClientData
from .server_app import EventFn, RunSpec, finished_rounds, load_state, make_server_app, server_main
from .settings import Recipe

ENGINES = ("simulation", "inprocess")


def run_federated(spec: RunSpec, data: ClientData, *, engine: str = "simulation", parallel: int = 1,
                  on_event: EventFn | None = None, quiet: bool = True) -> dict[str, Any]:
    """Run (or resume) ``spec``'s rounds with clients holding ``data``; returns ``state.json``'s content.

    ``simulation``: Flower's simulation engine (Ray), ``parallel`` clients at a time, one CPU and one torch
    thread each. ``inprocess``: the same apps through :class:`InProcessGrid` (no Ray).
    """
    if engine not in ENGINES:
        raise ClipleakError(f"unknown engine {engine!r}: {', '.join(ENGINES)}")
    remember_client_data(data)
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if spec.secagg is not None:
        from .secagg import secagg_client_app

        client_app = secagg_client_app(data)
    else:
        client_app = make_client_app(data)
    if engine == "inprocess":
        grid = InProcessGrid(client_app, spec.clients)
        with server_identity():
            server_main(grid, spec, on_event)
    else:
        from flwr.simulation import run_simulation

        run_simulation(server_app=make_server_app(spec, on_event), client_app=client_app,
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


def remember_client_data(data: ClientData) -> None:
    """Keep the clients' settings in their truth folder (``clients.json``) and refuse to resume a run whose
    clients hold other digits (another data seed, partition or shard size) into the same folder."""
    if not data.truth_dir:
        return
    path = Path(data.truth_dir) / "clients.json"
    mine = data.to_dict()
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = {k: v for k, v in mine.items() if k != "truth_dir" and saved.get(k) != v}
        if differ:
            diff = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in differ.items())
            raise ClipleakError(f"{path.parent} holds the truth of clients with {diff}; use another --out or "
                                "--truth-dir for other images")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2, sort_keys=True))


BASELINES = ("attack", "prototype", "public-nn")
"""What every attacked update is scored as: the reconstruction and the two honest baselines."""


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def leakage_summary(entries: list[dict[str, Any]], chance: float) -> dict[str, Any]:
    """Means over the scored updates and 95% intervals over their images: re-identification and label
    accuracy pooled over the images (Wilson), PSNR a bootstrap over the images; ``at_chance`` by the
    interval of the attack's re-identification."""
    scored = [c for c in entries if "psnr" in c]
    out: dict[str, Any] = {"attacked_updates": len(entries), "scored": len(scored),
                           "images": sum(int(c["images"]) for c in scored), "chance": chance}
    for key in ("psnr", "ssim", "reid"):
        out[key] = {k: _mean([c[key][k] for c in scored]) for k in BASELINES}
    sizes = [int(c["images"]) for c in scored]
    out["reid_interval"] = {k: pooled_rate([c["reid"][k] for c in scored], sizes).to_dict()
                            if scored and all(c["reid"][k] is not None for c in scored) else None
                            for k in BASELINES}
    out["psnr_interval"] = {}
    for k in BASELINES:
        values = [v for c in scored for v in c["psnr_images"][k] if v is not None]
        out["psnr_interval"][k] = bootstrap_mean(values).to_dict() if values else None
    labels = pooled_rate([c["label_accuracy"] for c in scored], sizes) if scored else None
    out["label_accuracy"] = None if labels is None else labels.value
    out["label_accuracy_interval"] = None if labels is None else labels.to_dict()
    iv = out["reid_interval"]["attack"]
    out["at_chance"] = None if iv is None else at_chance(Interval(**iv), chance)
    return out


class _Scorer:
    """The evaluator's tools for one run, built on the first update: the public set, the private pool and
    a victim for the public nearest neighbour."""

    def __init__(self, meta: dict[str, Any], truth: Truth, reid_k: int):
        ds, self.public = public_for_observation(meta)
        clip = build_model(meta["arch"], meta["weights"])
        self.private = load_private(ds, int(meta["image_size"]), str(truth.meta.get("part", "private")))
        self.victim = build_victim(clip, list(meta["classnames"]), PeftConfig(method="adapter"))
        self.reid_k = reid_k

    def score(self, rec: Reconstruction, truth: Truth, png: Path) -> dict[str, Any]:
        """Score one reconstruction against its truth beside the baselines; write its comparison figure."""
        meta = rec.meta["observation"]
        with torch.no_grad():
            est = rec.features if rec.features is not None else self.victim.raw_image_features(rec.images)
        nn_images, _ = public_nearest_neighbour(self.victim, self.public, est, rec.labels)
        ev = evaluate(rec, truth, self.public.prototypes(), with_lpips=False, reid_pool=self.private,
                      reid_k=self.reid_k, extra_baselines={"public-nn": nn_images})
        perm = torch.tensor(ev["pairing"])
        names = list(meta["classnames"])
        tl = truth.labels.tolist()
        rl = rec.labels[perm].tolist()
        save_comparison([("truth", truth.images, [names[i] for i in tl]),
                         ("reconstruction", rec.images[perm], [names[i] for i in rl]),
                         ("prototype", self.public.prototypes()[rec.labels[perm]], [names[i] for i in rl]),
                         ("public NN", nn_images[perm], [names[i] for i in rl])], png)
        m = ev["methods"]
        reid = ev["reidentification"] or {}
        n = int(truth.images.shape[0])
        return {"png": png.name, "label_accuracy": ev["label_accuracy"],
                "label_accuracy_interval": rate_interval(ev["label_accuracy"], n).to_dict(),
                "psnr": {k: m[k]["psnr_mean"] for k in BASELINES},
                "psnr_images": {k: m[k]["psnr"] for k in BASELINES},
                "psnr_interval": {k: m[k].get("psnr_interval") for k in BASELINES},
                "ssim": {k: m[k]["ssim_mean"] for k in BASELINES},
                "reid": {k: reid.get(k) for k in BASELINES},
                "reid_interval": {k: (reid.get("interval") or {}).get(k) for k in BASELINES},
                "verdict": ev["verdict"]["text"]}


def _truth_of(truth_dir: str | Path, nodes: list[int], rnd: int) -> Truth:
    """The truth of round ``rnd`` of one client, or of several (secure aggregation: the union of their
    batches, in the order of ``nodes``)."""
    truths = []
    for node in nodes:
        tp = truth_path(truth_dir, node, rnd)
        if not tp.is_file():
            raise ClipleakError(f"no truth for node {node}, round {rnd}: {tp} (the clients' truth folder?)")
        truths.append(Truth.load(tp))
    if len(truths) == 1:
        return truths[0]
    return Truth(images=torch.cat([t.images for t in truths]), labels=torch.cat([t.labels for t in truths]),
                 meta={"part": truths[0].meta.get("part", "private"), "round": rnd, "nodes": nodes,
                       "private_indices": [i for t in truths for i in t.meta.get("private_indices", [])]})


def _check_reply(meta: dict[str, Any], truth: Truth, node: int, rnd: int) -> bool | None:
    """Whether the client's truth belongs to the very update the server attacked (the SHA-256 of the state it
    sent, as the client wrote it and as the server received it); None when either record predates the digest.
    A mismatch is an error: the truth folder belongs to another run."""
    return digests_match(meta.get("reply_sha256"), truth.meta.get("reply_sha256"),
                         f"node {node}, round {rnd}: the truth belongs to another update (SHA-256 {{truth}}...) "
                         "than the one the server attacked ({attacked}...); give the truth folder of this run")


def evaluate_run(out: str | Path, truth_dir: str | Path, *, reid_k: int = 10) -> dict[str, Any]:
    """Evaluator side: pair every reconstruction with its client's truth, score, write ``OUT/report``
    (``metrics.json``: per update, per round and over the run, every rate with its 95% interval over the
    images; the clients' settings from their ``clients.json`` when they kept one)."""
    out = Path(out)
    state = load_state(out)
    spec = json.loads((out / "run.json").read_text())
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    clients: list[dict[str, Any]] = []
    scorer: _Scorer | None = None
    for rdir in sorted((out / "rounds").glob("round-*")):
        rnd = int(rdir.name.split("-")[1])
        if str(rnd) not in state["rounds"]:
            continue
        targets: list[tuple[Path, list[int], int | None]] = [
            (adir, [int(adir.name.split("-")[1])], int(adir.name.split("-")[1]))
            for adir in sorted((rdir / "attacks").glob("node-*"), key=lambda p: int(p.name.split("-")[1]))]
        if (rdir / "attacks" / "aggregate").is_dir():  # secure aggregation: all the round's clients at once
            targets.append((rdir / "attacks" / "aggregate", [int(n) for n in state["rounds"][str(rnd)]["clients"]],
                            None))
        for adir, nodes, node in targets:
            rec = Reconstruction.load(adir)
            truth = _truth_of(truth_dir, nodes, rnd)
            meta = rec.meta["observation"]
            entry: dict[str, Any] = {"round": rnd, "node_id": node, "images": int(truth.images.shape[0]),
                                     "reconstructed": int(rec.images.shape[0]),
                                     "from_update": meta.get("from_update"),
                                     "attack_seconds": rec.meta.get("attack_seconds")}
            if node is None:
                entry["aggregate_of"] = nodes
            else:
                entry["truth_matches_update"] = _check_reply(meta, truth, node, rnd)
            if rec.images.shape != truth.images.shape:
                entry["error"] = (f"the attack made {rec.images.shape[0]} images, the client(s) used "
                                  f"{truth.images.shape[0]}")
            else:
                scorer = scorer or _Scorer(meta, truth, reid_k)
                name = f"node-{node}" if node is not None else "aggregate"
                entry.update(scorer.score(rec, truth, report / f"round-{rnd:03d}-{name}.png"))
            clients.append(entry)
    chance = 1.0 / reid_k
    rounds = sorted({c["round"] for c in clients})
    kept = Path(truth_dir) / "clients.json"
    metrics = {"run": spec, "client_data": json.loads(kept.read_text()) if kept.is_file() else None,
               "reid_k": reid_k, "secure_aggregation": state.get("secure_aggregation"),
               "initial_accuracy": state.get("initial_accuracy"), "rounds": state["rounds"],
               "clients": clients, "by_round": {str(r): leakage_summary([c for c in clients if c["round"] == r],
                                                                         chance) for r in rounds},
               "summary": leakage_summary(clients, chance)}
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    write_run_page(report / "report.html", metrics)
    return metrics


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _iv(entry: dict[str, Any], key: str, k: str, kind: str = "pct") -> str:
    """An entry's interval ``entry[key + "_interval"][k]`` as text, or its bare value when it has none."""
    iv = (entry.get(f"{key}_interval") or {}).get(k)
    if iv:
        return interval_text(iv, kind)
    return _f(entry[key][k], ".1f" if kind == "db" else ".0%")


def _leakage_text(s: dict[str, Any]) -> str:
    """One summary's re-identification, labels and PSNR, each with its interval, and the chance decision."""
    decision = ("" if s.get("at_chance") is None else
                "; at chance by its 95% interval" if s["at_chance"] else "; above chance by its 95% interval")
    return (f"re-identification attack {_iv(s, 'reid', 'attack')} (prototype {_iv(s, 'reid', 'prototype')}, "
            f"public NN {_iv(s, 'reid', 'public-nn')}; chance {s['chance']:.0%}{decision}); labels "
            f"{interval_text(s.get('label_accuracy_interval'))}; PSNR attack {_iv(s, 'psnr', 'attack', 'db')} "
            f"(prototype {_f(s['psnr']['prototype'], '.1f')} dB, public NN {_f(s['psnr']['public-nn'], '.1f')} dB)")


def _accuracy_section(m: dict[str, Any]) -> Section:
    rows = [["0 (start)", _f(m["initial_accuracy"], ".1%"), "", "", ""]]
    for r in sorted(m["rounds"], key=int):
        x = m["rounds"][r]
        rows.append([r, _f(x.get("accuracy"), ".1%"), f"{len(x.get('attacked', []))} of {len(x.get('clients', []))}",
                     _f(x.get("epsilon_so_far"), ".3g"), _f(x.get("seconds"), ".1f")])
    return Section("Global model (FedAvg) accuracy on the validation split",
                   [table(["round", "accuracy", "attacked", "epsilon so far", "seconds"], rows)])


def _rounds_section(m: dict[str, Any]) -> Section:
    rows = [[r, f"{s['scored']} of {s['attacked_updates']}", s["images"], _iv(s, "reid", "attack"),
             _iv(s, "reid", "public-nn"), interval_text(s.get("label_accuracy_interval")),
             _iv(s, "psnr", "attack", "db")] for r, s in sorted(m.get("by_round", {}).items(), key=lambda t: int(t[0]))
            if s["scored"]]
    head = ["round", "updates scored", "images", "re-identification [95%]", "public NN re-id [95%]",
            "labels [95%]", "PSNR attack [95%]"]
    return Section("Leakage per round", [table(head, rows), paragraph(
        "Intervals: 95% over the round's attacked images (Wilson for rates, a bootstrap for PSNR).", "note")])


def _update_section(c: dict[str, Any], chance: float) -> Section:
    title = (f"round {c['round']}, node {c['node_id']}" if c.get("aggregate_of") is None else
             f"round {c['round']}, aggregate of nodes {', '.join(str(n) for n in c['aggregate_of'])}")
    if "error" in c:
        return Section(title, [paragraph(c["error"])], level=3)
    text = (f"PSNR attack {_iv(c, 'psnr', 'attack', 'db')}, prototype {_f(c['psnr']['prototype'], '.1f')} dB, "
            f"public NN {_f(c['psnr']['public-nn'], '.1f')} dB; re-identification attack {_iv(c, 'reid', 'attack')}, "
            f"prototype {_iv(c, 'reid', 'prototype')}, public NN {_iv(c, 'reid', 'public-nn')} (chance "
            f"{chance:.0%}); labels {interval_text(c.get('label_accuracy_interval'))}")
    return Section(f"{title}: {c['images']} image(s)", [paragraph(text), paragraph(c["verdict"]),
                                                         image(c["png"], f"{title}: truth and reconstruction")],
                   level=3)


def write_run_page(path: Path, m: dict[str, Any]) -> Path:
    """The federated run's ``report.html`` from its metrics (:func:`evaluate_run`)."""
    run = m["run"]
    rec = Recipe.from_dict(run["recipe"])  # the composed form, or a run's flat one saved before it
    s = m["summary"]
    dp = None if rec.dp is None else rec.dp.to_dict()
    intro = paragraph(f"E = {rec.local_steps} local steps, B = {rec.batch_size}, eta = {rec.lr}, "
                      f"DP: {json.dumps(dp)}; attack {run['attack']} {json.dumps(run['attack_settings'])}"
                      + ("" if not run.get("secagg") else f"; secure aggregation (SecAgg+ {json.dumps(run['secagg'])}):"
                         " the server read only each round's aggregate and attacked it as one batch"))
    cd = m.get("client_data")
    who = [paragraph(f"The clients' digits: data seed {cd['seed']}, partition {cd['partition']}, shard size "
                     f"{cd['client_size'] or 'whole shard'} ({cd['part']} split).", "note")] if cd else []
    updates = Section(f"Attacked updates ({s['scored']} scored of {s['attacked_updates']})", [
        paragraph(f"Over the run ({s['images']} images): {_leakage_text(s)}."),
        paragraph("Rows of each figure: the client's truth, the reconstruction, the class prototype, the public "
                  "nearest neighbour.", "note")])
    return write_page(path, f"Federated run: {run['clients']} clients, {run['rounds']} rounds, {rec.peft.method}", [
        Section(None, [intro, *who]), _accuracy_section(m), _rounds_section(m), updates,
        *(_update_section(c, s["chance"]) for c in m["clients"])])
