"""The audit's outputs: the summary table (JSON + markdown), the one chart (PNG) and an HTML page."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .sweep import CHANCE_MARGIN, AuditConfig, eps_text, key_text  # noqa: E402


def _mean(xs: list[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def summarise(cfg: AuditConfig, cells: dict[str, Any]) -> dict[str, Any]:
    """One row per (method, batch size, epsilon): means over the images, the accuracy and canary bound."""
    rows: list[dict[str, Any]] = []
    for method in cfg.methods:
        for b in cfg.batch_sizes:
            for eps in cfg.epsilons:
                obs = [cells.get(key_text("obs", method, int(b), eps, i)) for i in range(cfg.images)]
                obs_done = [o for o in obs if o is not None]
                acc = cells.get(key_text("acc", method, 0, eps, 0)) or {}
                can = cells.get(key_text("canary", method, 0, eps, 0)) or {}
                chance = obs_done[0]["chance"] if obs_done else 1.0 / cfg.reid_k
                reid = _mean([o["reid"] for o in obs_done])
                row = {
                    "method": method, "peft": cfg.label(method), "batch_size": int(b), "epsilon": eps_text(eps),
                    "images": len(obs_done),
                    "noise_multiplier": obs_done[0]["noise_multiplier"] if obs_done else acc.get("noise_multiplier"),
                    "reid": reid, "psnr": _mean([o["psnr"] for o in obs_done]),
                    "ssim": _mean([o["ssim"] for o in obs_done]),
                    "label_accuracy": _mean([o["label_accuracy"] for o in obs_done]),
                    "prototype_reid": _mean([o["prototype_reid"] for o in obs_done]),
                    "prototype_psnr": _mean([o["prototype_psnr"] for o in obs_done]),
                    "prototype_true_reid": _mean([o["prototype_true_reid"] for o in obs_done]),
                    "prototype_true_psnr": _mean([o["prototype_true_psnr"] for o in obs_done]),
                    "chance": chance,
                    "attack_seconds_per_image": _mean([o["attack_seconds"] for o in obs_done]),
                    "accuracy": acc.get("accuracy"), "accuracy_epsilon_spent": acc.get("epsilon"),
                    "canary_epsilon_lower_bound": can.get("epsilon_lower_bound"),
                    "canary_guess_accuracy": can.get("accuracy"),
                }
                row["verdict"] = ("no observation yet" if reid is None else
                                  f"re-identification {reid:.0%} vs chance {chance:.0%}: "
                                  + ("at chance (within 10 points): the attack does not beat chance by much"
                                     if reid <= chance + CHANCE_MARGIN else "above chance: the images still leak"))
                rows.append(row)
    return {"config": cfg.to_dict(), "rows": rows, "findings": _findings(cfg, rows)}


def _findings(cfg: AuditConfig, rows: list[dict[str, Any]]) -> list[str]:
    """Where re-identification reaches chance (the largest epsilon from which on it stays there) and the
    accuracy paid there against the undefended run."""
    out = []
    for method in cfg.methods:
        for b in cfg.batch_sizes:
            mine = [r for r in rows if r["method"] == method and r["batch_size"] == int(b) and r["reid"] is not None]
            mine.sort(key=lambda r: -math.inf if r["epsilon"] == "inf" else -float(r["epsilon"]))
            base = next((r for r in mine if r["epsilon"] == "inf"), None)
            at = None
            for r in reversed(mine):  # smallest epsilon first: walk up while at chance
                if r["reid"] <= r["chance"] + CHANCE_MARGIN:
                    at = r
                else:
                    break
            name = cfg.label(method)
            if at is None:
                out.append(f"{name}, batch {b}: re-identification stays above chance at every epsilon measured.")
                continue
            acc = at["accuracy"]
            base_acc = base["accuracy"] if base else None
            paid = (f"; validation accuracy there {acc:.1%} vs {base_acc:.1%} without DP "
                    f"({(base_acc - acc) * 100:+.1f} points paid)") if acc is not None and base_acc is not None else ""
            out.append(f"{name}, batch {b}: re-identification is at chance ({at['reid']:.0%}, chance "
                       f"{at['chance']:.0%}) for epsilon <= {at['epsilon']}{paid}.")
    return out


def _x(eps: str, finite: list[float]) -> float:
    top = max(finite) if finite else 1.0
    return top * 10 if eps == "inf" else float(eps)


BATCH_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (3, 1, 1, 1)))]
"""Marker and line style per batch size (in the order the audit lists them); colour is per method."""


def write_chart(summary: dict[str, Any], path: Path) -> Path:
    """Re-identification (top) and PSNR (bottom) against epsilon (log x, infinity at the right), the task
    accuracy on a second axis in both panels; chance and the class prototype marked.

    Several batch sizes share the chart: colour says the PEFT method, marker and line style the batch
    size; the accuracy (which does not depend on the attacked batch size) is drawn once per method, and
    the class prototype once per method and batch size (its digits differ with the batches)."""
    rows = summary["rows"]
    finite = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] != "inf"})
    fig, axes = plt.subplots(2, 1, figsize=(8, 8.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    batches = sorted({int(r["batch_size"]) for r in rows})
    several = len(batches) > 1
    for panel, (ax, metric, label) in enumerate(zip(axes, ("reid", "psnr"),
                                                    ("re-identification (K = 10)", "PSNR (dB)"), strict=True)):
        acc_ax = ax.twinx()
        for m, method in enumerate(methods):
            c = colours[m % len(colours)]
            name = next(r.get("peft", method) for r in rows if r["method"] == method)
            for n, b in enumerate(batches):
                mine = sorted((r for r in rows if r["method"] == method and r["batch_size"] == b),
                              key=lambda r: _x(r["epsilon"], finite))
                if not mine:
                    continue
                marker, ls = BATCH_STYLES[n % len(BATCH_STYLES)]
                xs = [_x(r["epsilon"], finite) for r in mine]
                ys = [r[metric] for r in mine]
                ax.plot(xs, [np.nan if y is None else y for y in ys], marker=marker, ls=ls, color=c,
                        label=f"{name}, batch {b}: attack")
                proto = _mean([r[f"prototype_true_{metric}"] for r in mine])
                if proto is not None:
                    which = f"{name}, batch {b}" if several else name
                    ax.axhline(proto, color=c, ls=ls, lw=0.8, alpha=0.5, label=f"{which}: class prototype (true label)")
            acc_rows = {r["epsilon"]: r["accuracy"] for r in rows if r["method"] == method}
            xs_acc = sorted(acc_rows, key=lambda e: _x(e, finite))
            acc_ys = [np.nan if acc_rows[e] is None else acc_rows[e] for e in xs_acc]
            acc_ax.plot([_x(e, finite) for e in xs_acc], acc_ys, marker="x", ls=":", color=c, alpha=0.7,
                        label=f"{name}: validation accuracy (DP fine-tuning)")
        if metric == "reid" and rows:
            ax.axhline(rows[0]["chance"], color="black", ls=":", lw=1.5, label="chance")
            ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(label)
        acc_ax.set_ylabel("task accuracy (validation)")
        acc_ax.set_ylim(0.0, 1.0)
        if panel == 0:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = acc_ax.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    ax.set_xscale("log")
    ticks = [*finite, _x("inf", finite)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + ["∞ (no DP)"])
    ax.set_xlabel("epsilon (delta and schedule in the table)")
    cfg = summary["config"]
    what = "batch" if not several else "batches of " + ", ".join(str(b) for b in batches) + " digits"
    fig.suptitle(f"clipleak audit: {cfg['attack']} on {cfg['images']} private digit {what} per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{v:.0%}"
    if kind == "db":
        return f"{v:.1f}"
    if kind == "g":
        return f"{v:.3g}"
    return str(v)


COLUMNS = [("peft", "method", "s"), ("batch_size", "batch", "s"), ("epsilon", "epsilon", "s"),
           ("noise_multiplier", "sigma", "g"), ("images", "batches", "s"), ("reid", "re-id", "pct"),
           ("psnr", "PSNR dB", "db"), ("label_accuracy", "labels", "pct"),
           ("prototype_true_reid", "prototype re-id", "pct"), ("prototype_true_psnr", "prototype dB", "db"),
           ("chance", "chance", "pct"), ("accuracy", "accuracy (val)", "pct"),
           ("canary_epsilon_lower_bound", "canary eps lower bound", "g")]


def markdown_table(summary: dict[str, Any]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    lines = [head, sep]
    for r in summary["rows"]:
        lines.append("| " + " | ".join(_fmt(r.get(k), kind) for k, _, kind in COLUMNS) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, summary: dict[str, Any]) -> dict[str, str]:
    """audit.json, audit.md, audit.png, audit.html in ``out``."""
    (out / "audit.json").write_text(json.dumps(summary, indent=1))
    cfg = summary["config"]
    ft = cfg["finetune"]
    schedule = (f"Schedule: the client's {ft.get('steps')} DP-SGD steps, {ft.get('sampling')} sampling at expected "
                f"batch {ft.get('batch_size')} of the private digits, clipping C {ft.get('clip')}, delta "
                f"{cfg['delta']:g}, RDP accountant; the noise multiplier of each epsilon is calibrated for it.")
    md = "\n\n".join([f"# clipleak audit\n\n{schedule}", markdown_table(summary),
                      "\n".join(f"- {f}" for f in summary["findings"])]) + "\n"
    (out / "audit.md").write_text(md)
    chart = write_chart(summary, out / "audit.png")
    rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k), kind))}</td>" for k, _, kind in COLUMNS)
                        + "</tr>" for r in summary["rows"])
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>clipleak audit</title>',
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}</style></head><body>",
        "<h1>clipleak privacy audit</h1>", f"<p>{html.escape(schedule)}</p>",
        '<img src="audit.png" alt="re-identification and PSNR against epsilon, accuracy on a second axis">',
        "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in summary["findings"]) + "</ul>",
        "<table><tr>" + "".join(f"<th>{html.escape(c[1])}</th>" for c in COLUMNS) + "</tr>", rows_html, "</table>",
        "<p>Verdicts:</p><ul>" + "".join(
            f"<li>{html.escape(r.get('peft', r['method']))}, batch {r['batch_size']}, "
            f"epsilon {html.escape(r['epsilon'])}: "
            f"{html.escape(r['verdict'])}</li>" for r in summary["rows"]) + "</ul>",
        f"<pre>{html.escape(json.dumps(cfg, indent=1))}</pre>",
        '<p>All numbers: <a href="audit.json">audit.json</a>; cells: <a href="cells.json">cells.json</a>.</p>',
        "</body></html>"])
    (out / "audit.html").write_text(page + "\n", encoding="utf-8")
    return {"json": str(out / "audit.json"), "markdown": str(out / "audit.md"), "chart": str(chart),
            "html": str(out / "audit.html")}
