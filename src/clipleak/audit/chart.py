"""The audit's outputs: the summary table (JSON + markdown, :mod:`.summary`), the one chart (PNG) with
95% error bars and the real chance line, and an HTML page (:mod:`clipleak.report.page`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..report.page import Section, bullets, image, links, paragraph, pre, pyplot, table, write_page

if TYPE_CHECKING:
    from matplotlib.figure import Figure
from .summary import AXIS_HEADINGS, columns, markdown_table, mean_of, table_rows


def _x(eps: str, finite: list[float]) -> float:
    top = max(finite) if finite else 1.0
    return top * 10 if eps == "inf" else float(eps)


BATCH_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (3, 1, 1, 1)))]
"""Marker and line style per batch size (in the order the audit lists them); colour is per method."""


def _interval_bars(ax: Any, xs: list[float], ivs: list[dict[str, Any] | None], colour: Any, gid: str) -> None:
    """Each point's 95% interval as an error bar (points without one are left out)."""
    have = [(x, iv) for x, iv in zip(xs, ivs, strict=True) if iv is not None]
    if not have:
        return
    ys = np.array([iv["value"] for _, iv in have])
    err = np.array([[iv["value"] - iv["low"] for _, iv in have], [iv["high"] - iv["value"] for _, iv in have]])
    bars = ax.errorbar([x for x, _ in have], ys, yerr=np.clip(err, 0, None), fmt="none", ecolor=colour,
                       elinewidth=1.0, capsize=3, alpha=0.8)
    for part in bars.lines[2]:
        part.set_gid(gid)


def _method_curves(ax: Any, acc_ax: Any, rows: list[dict[str, Any]], method: str, colour: Any, metric: str,
                   batches: list[int], finite: list[float]) -> None:
    """One method's curves in one panel: the attack per batch size with its interval bars and the class
    prototype's level, and the validation accuracy (once: it does not depend on the batch size)."""
    name = next(r.get("peft", method) for r in rows if r["method"] == method)
    for n, b in enumerate(batches):
        mine = sorted((r for r in rows if r["method"] == method and r["batch_size"] == b),
                      key=lambda r: _x(r["epsilon"], finite))
        if not mine:
            continue
        marker, ls = BATCH_STYLES[n % len(BATCH_STYLES)]
        xs = [_x(r["epsilon"], finite) for r in mine]
        ax.plot(xs, [np.nan if r[metric] is None else r[metric] for r in mine], marker=marker, ls=ls, color=colour,
                label=f"{name}, batch {b}: attack")
        _interval_bars(ax, xs, [r.get(f"{metric}_interval") for r in mine], colour, f"interval-{metric}")
        proto = mean_of([r[f"prototype_true_{metric}"] for r in mine])
        if proto is not None:
            which = f"{name}, batch {b}" if len(batches) > 1 else name
            ax.axhline(proto, color=colour, ls=ls, lw=0.8, alpha=0.5, label=f"{which}: class prototype (true label)")
    how = "DP fine-tuning" if "axis" not in rows[0] else "fine-tuning, the defense on every step"
    acc_rows = {r["epsilon"]: r["accuracy"] for r in rows if r["method"] == method}
    xs_acc = sorted(acc_rows, key=lambda e: _x(e, finite))
    acc_ax.plot([_x(e, finite) for e in xs_acc], [np.nan if acc_rows[e] is None else acc_rows[e] for e in xs_acc],
                marker="x", ls=":", color=colour, alpha=0.7, label=f"{name}: validation accuracy ({how})")


def chart_figure(summary: dict[str, Any]) -> Figure:
    """Re-identification (top) and PSNR (bottom) against epsilon (log x, infinity at the right), each point
    with its 95% interval as an error bar, the task accuracy on a second axis in both panels; chance
    (1 / reid_k) and the class prototype marked.

    Several batch sizes share the chart: colour says the PEFT method, marker and line style the batch
    size; the accuracy (which does not depend on the attacked batch size) is drawn once per method, and
    the class prototype once per method and batch size (its digits differ with the batches)."""
    rows = summary["rows"]
    k = int(summary["config"].get("reid_k", 10))
    chance = float(summary.get("chance", 1.0 / k))
    finite = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] != "inf"})
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 8.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    batches = sorted({int(r["batch_size"]) for r in rows})
    titles = (f"re-identification (K = {k}) [95%]", "PSNR (dB) [95%]")
    for panel, (ax, metric, label) in enumerate(zip(axes, ("reid", "psnr"), titles, strict=True)):
        acc_ax = ax.twinx()
        for m, method in enumerate(methods):
            _method_curves(ax, acc_ax, rows, method, colours[m % len(colours)], metric, batches, finite)
        if metric == "reid" and rows:
            ax.axhline(chance, color="black", ls=":", lw=1.5, label=f"chance (1/{k})", gid="chance")
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
    kind = rows[0].get("axis") if rows else None
    if kind is None:
        ticks = [*finite, _x("inf", finite)]
        labels = [f"{t:g}" for t in finite] + ["∞ (no DP)"]
        ax.set_xlabel("epsilon (delta and schedule in the table)")
    else:  # a defense audit: its levels, larger is weaker, the no-defense level named
        none = {r["epsilon"] for r in rows if r.get("no_defense")}
        has_inf = any(r["epsilon"] == "inf" for r in rows)
        ticks = [*finite, *([_x("inf", finite)] if has_inf else [])]
        labels = [f"{t:g}" + (" (none)" if f"{t:g}" in none else "") for t in finite] + (["∞ (none)"] if has_inf
                                                                                          else [])
        ax.set_xlabel(f"{AXIS_HEADINGS.get(kind, kind)}: larger is weaker (no DP)")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    cfg = summary["config"]
    sizes = " / ".join(str(b) for b in batches)
    fig.suptitle(f"clipleak audit: {cfg['attack']} on {cfg['images']} private batches of {sizes} {noun(cfg)}(s) per "
                 "point\n"
                 "bars: 95% intervals over the images of each point")
    fig.tight_layout()
    return fig


def write_chart(summary: dict[str, Any], path: Path) -> Path:
    """Save :func:`chart_figure` to ``path``."""
    fig = chart_figure(summary)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def noun(cfg: dict[str, Any]) -> str:
    """What the audited images are called on the page: "digit" for the MNIST sets, "image" for the user's."""
    return "digit" if str(cfg.get("data", "mnist")) in ("mnist", "digits") else "image"


def _schedule(cfg: dict[str, Any]) -> str:
    ft = cfg["finetune"]
    what = f"private {noun(cfg)}s"
    if cfg.get("defense"):
        return (f"Defense audit ({cfg['defense']}, no DP): the attacked observations are the plain gradient with "
                f"the defense applied (recorded in them; attack {cfg['attack']}); accuracy after the client's "
                f"{ft.get('steps')} steps, {ft.get('sampling')} sampling at expected batch {ft.get('batch_size')} "
                f"of the {what}, the defense applied to every step's gradient.")
    return (f"Schedule: the client's {ft.get('steps')} DP-SGD steps, {ft.get('sampling')} sampling at expected "
            f"batch {ft.get('batch_size')} of the {what}, clipping C {ft.get('clip')}, delta "
            f"{cfg['delta']:g}, RDP accountant; the noise multiplier of each epsilon is calibrated for it.")


def _draws(summary: dict[str, Any]) -> str:
    seeds = summary.get("draw_seeds") or []
    span = f"{seeds[0]}..{seeds[-1]}" if seeds else "none"
    cfg = summary["config"]
    return (f"Private {noun(cfg)}s drawn with seeds {span} (--draw-seed {cfg.get('draw_seed', 0)}); "
            "intervals are 95% over the images of each point (Wilson for rates, bootstrap for PSNR).")


def write_outputs(out: Path, summary: dict[str, Any]) -> dict[str, str]:
    """audit.json, audit.md, audit.png, audit.html in ``out``."""
    (out / "audit.json").write_text(json.dumps(summary, indent=1))
    cfg = summary["config"]
    schedule = _schedule(cfg)
    verdict = summary.get("verdict") or []
    md = "\n\n".join([f"# clipleak audit\n\n{schedule}\n\n{_draws(summary)}",
                      "\n".join(f"**Verdict.** {v}" for v in verdict), markdown_table(summary),
                      "\n".join(f"- {f}" for f in summary["findings"])]) + "\n"
    (out / "audit.md").write_text(md)
    chart = write_chart(summary, out / "audit.png")
    verdicts = [f"{r.get('peft', r['method'])}, batch {r['batch_size']}, {r.get('axis', 'epsilon')} {r['epsilon']}: "
                f"{r['verdict']}"
                for r in summary["rows"]]
    page = write_page(out / "audit.html", "clipleak privacy audit", [
        Section(None, [*(paragraph(f"Verdict: {v}") for v in verdict), paragraph(schedule),
                       paragraph(_draws(summary), "note"),
                       image("audit.png", "re-identification and PSNR against epsilon with 95% error bars, accuracy "
                                          "on a second axis"),
                       bullets(summary["findings"])]),
        Section("Table", [table([c[1] for c in columns(summary)], table_rows(summary))]),
        Section("Verdicts", [bullets(verdicts)]),
        Section("Configuration", [pre(json.dumps(cfg, indent=1)),
                                  links("All numbers:", [("audit.json", "audit.json"), ("cells", "cells.json")])]),
    ])
    return {"json": str(out / "audit.json"), "markdown": str(out / "audit.md"), "chart": str(chart),
            "html": str(page)}
