"""The audit's table and verdicts: one row per (method, batch size, epsilon) with 95% intervals over the
images of the point, "at chance" decided by the interval, and the findings per method and batch size.

Rates (re-identification, label accuracy) pool the cells' per-batch rates over every attacked image
(:func:`clipleak.evaluation.pooled_rate`, Wilson); PSNR is a bootstrap mean over the images. ``n`` is the
number of images, not of re-identification draws (the draws of one image are not independent).

In a defense audit (``AuditConfig.defense``) the points are the defense's levels: a row's ``epsilon`` holds
the level's text (the axis value; ``axis`` and ``defense`` say what it is), and the findings and table speak
of the defense instead of epsilon, against the no-defense level (prune 1, quantize 32, clip inf).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..evaluation import Interval, at_chance, bootstrap_mean, images_to_separate, pooled_rate
from ..report.page import interval_text
from .cells import AuditConfig, eps_text, key_text


def mean_of(xs: list[float | None]) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    vals = [float(x) for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _pooled(cells: list[dict[str, Any]], key: str, batch: int) -> dict[str, Any] | None:
    """The rate ``key`` pooled over the cells' images, with its interval (None when no cell has it)."""
    have = [c for c in cells if c.get(key) is not None]
    if not have:
        return None
    return pooled_rate([float(c[key]) for c in have], [int(c.get("images", batch)) for c in have]).to_dict()


def _psnr(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean PSNR over the images with a bootstrap interval (a cell written without per-image values counts
    once, with its batch mean)."""
    values = [float(v) for c in cells for v in (c.get("psnr_images") or [c.get("psnr")]) if v is not None]
    return bootstrap_mean(values).to_dict() if values else None


def _row(cfg: AuditConfig, cells: dict[str, Any], method: str, b: int, eps: float) -> dict[str, Any]:
    obs = [cells.get(key_text("obs", method, b, eps, i, axis=cfg.axis)) for i in range(cfg.images)]
    done = [o for o in obs if o is not None]
    acc = cells.get(key_text("acc", method, 0, eps, 0, axis=cfg.axis)) or {}
    can = cells.get(key_text("canary", method, 0, eps, 0, axis=cfg.axis)) or {}
    reid = _pooled(done, "reid", b)
    psnr = _psnr(done)
    row: dict[str, Any] = {
        "method": method, "peft": cfg.label(method), "batch_size": b, "epsilon": eps_text(eps),
        "images": len(done), "n_images": sum(int(o.get("images", b)) for o in done),
        "draw_seeds": [o.get("draw_seed", i) for i, o in enumerate(obs) if o is not None],
        "noise_multiplier": done[0]["noise_multiplier"] if done else acc.get("noise_multiplier"),
        "reid": None if reid is None else reid["value"], "reid_interval": reid,
        "psnr": None if psnr is None else psnr["value"], "psnr_interval": psnr,
        "ssim": mean_of([o["ssim"] for o in done]),
        "label_accuracy_interval": _pooled(done, "label_accuracy", b),
        "prototype_reid": mean_of([o["prototype_reid"] for o in done]),
        "prototype_psnr": mean_of([o["prototype_psnr"] for o in done]),
        "prototype_true_reid_interval": _pooled(done, "prototype_true_reid", b),
        "prototype_true_psnr": mean_of([o["prototype_true_psnr"] for o in done]),
        "chance": cfg.chance,
        "attack_seconds_per_image": mean_of([o["attack_seconds"] for o in done]),
        "accuracy": acc.get("accuracy"), "accuracy_epsilon_spent": acc.get("epsilon"),
        "canary_epsilon_lower_bound": can.get("epsilon_lower_bound"),
        "canary_guess_accuracy": can.get("accuracy"),
    }
    if cfg.defense is not None:
        d = cfg.point_defense(eps)
        row.update({"axis": cfg.axis, "defense": None if d is None else d.spec, "no_defense": d is None,
                    "attack": cfg.attack})
    for key in ("label_accuracy", "prototype_true_reid"):
        iv = row[f"{key}_interval"]
        row[key] = None if iv is None else iv["value"]
    row["at_chance"] = None if reid is None else at_chance(Interval(**reid), cfg.chance)
    row["verdict"] = verdict(reid, cfg.chance)
    return row


def verdict(reid: dict[str, Any] | None, chance: float) -> str:
    """One line on a point: its re-identification with the interval, and whether the interval reaches chance."""
    if reid is None:
        return "no observation yet"
    head = f"re-identification {interval_text(reid)} vs chance {chance:.0%}: "
    if at_chance(Interval(**reid), chance):
        return head + "at chance (its 95% interval reaches chance): no evidence that the attack beats it"
    return head + "above chance (its 95% interval excludes chance): the images still leak"


def summarise(cfg: AuditConfig, cells: dict[str, Any]) -> dict[str, Any]:
    """One row per (method, batch size, epsilon) with intervals, the accuracy and the canary bound; the
    findings per method and batch size."""
    rows = [_row(cfg, cells, method, int(b), eps) for method in cfg.methods for b in cfg.batch_sizes
            for eps in cfg.points]
    return {"config": cfg.to_dict(), "chance": cfg.chance, "draw_seeds": cfg.draw_seeds(), "rows": rows,
            "verdict": verdicts(cfg, rows), "findings": findings(cfg, rows)}


def _eps_value(r: dict[str, Any]) -> float:
    return math.inf if r["epsilon"] == "inf" else float(r["epsilon"])


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def _axis(r: dict[str, Any]) -> str:
    """How a row's point is named in prose: ``epsilon``, or the defense's kind (``prune``, ...)."""
    return str(r.get("axis") or "epsilon")


def _paid(at: dict[str, Any], base: dict[str, Any] | None) -> str:
    acc, base_acc = at["accuracy"], (base or {}).get("accuracy")
    if acc is None or base_acc is None:
        return ""
    without = "without DP" if "axis" not in at else "without the defense"
    return (f" Validation accuracy at {_axis(at)} {at['epsilon']}: {acc:.1%} vs {base_acc:.1%} {without} "
            f"({(acc - base_acc) * 100:+.1f} points).")


def _separation(at: dict[str, Any], chance: float) -> str:
    """How many images the point at chance would need for its interval to exclude chance at its rate."""
    rate = at["reid_interval"]["value"]
    need = images_to_separate(rate, chance)
    if need is None:
        return (f" Its rate at {_axis(at)} {at['epsilon']} ({rate:.0%}) is at or near chance: more images would not "
                "lift its interval above chance.")
    return (f" At the same rate, {need} images per point (now {at['n_images']}) would make the interval at "
            f"{_axis(at)} {at['epsilon']} exclude chance.")


def finding(name: str, b: int, mine: list[dict[str, Any]], chance: float, base: dict[str, Any] | None) -> str:
    """The finding of one method and batch size from its rows (each with a re-identification interval):
    the smallest epsilon whose interval excludes chance, the largest whose interval reaches it, the images
    they rest on, and when their intervals overlap, how many images would separate the latter from chance."""
    excl = sorted((r for r in mine if not r["at_chance"]), key=_eps_value)
    near = sorted((r for r in mine if r["at_chance"]), key=_eps_value)
    n = sorted({r["n_images"] for r in mine})
    rests = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
    ax = _axis(mine[0])
    head = f"{name}, batch {b} ({rests} images per {ax}, chance {chance:.0%}): "
    if not near:
        s = excl[0]
        return (head + f"re-identification is above chance at every {ax} measured; its 95% interval excludes "
                f"chance down to the smallest, {ax} {s['epsilon']} ({interval_text(s['reid_interval'])}).")
    at = near[-1]
    text = (f"the largest {ax} whose 95% interval of re-identification reaches chance is {at['epsilon']} "
            f"({interval_text(at['reid_interval'])})")
    if not excl:
        return (head + f"re-identification is at chance at every {ax} measured; {text}." + _paid(at, base)
                + _separation(at, chance))
    s = excl[0]
    text = (f"the smallest {ax} whose 95% interval excludes chance is {s['epsilon']} "
            f"({interval_text(s['reid_interval'])}); {text}")
    if _eps_value(s) < _eps_value(at):
        text += f" (not monotone in {ax})"
    text += "."
    if _overlap(s["reid_interval"], at["reid_interval"]):
        text += f" The two intervals overlap.{_separation(at, chance)}"
    return head + text + _paid(at, base)


def _groups(cfg: AuditConfig, rows: list[dict[str, Any]]
            ) -> Iterator[tuple[str, int, list[dict[str, Any]], dict[str, Any] | None]]:
    """Per method and batch size with scored points: its label, the batch size, the scored rows and the row
    without DP or defense (None when the audit has none)."""
    for method in cfg.methods:
        for b in cfg.batch_sizes:
            mine = [r for r in rows if r["method"] == method and r["batch_size"] == int(b)]
            base = next((r for r in mine if r.get("no_defense", r["epsilon"] == "inf")), None)
            scored = [r for r in mine if r["reid_interval"] is not None]
            if scored:
                yield cfg.label(method), int(b), scored, base


def findings(cfg: AuditConfig, rows: list[dict[str, Any]]) -> list[str]:
    """One finding per method and batch size with observations (:func:`finding`)."""
    return [finding(name, b, scored, cfg.chance, base) for name, b, scored, base in _groups(cfg, rows)]


def _leaks(r: dict[str, Any]) -> bool:
    """A point leaks when its re-identification interval excludes chance and lies above the rate of the
    true class's prototype (an image that knows only the class)."""
    iv = r["reid_interval"]
    return not r["at_chance"] and iv["low"] > float(r.get("prototype_true_reid") or 0.0)


def overall(name: str, b: int, mine: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    """The verdict in words for one method and batch size: it leaks (down to which epsilon), there is no
    leakage beyond the class prototype, or the epsilon from which re-identification is at chance and the
    validation accuracy that costs (in a defense audit: the defense's level, against no defense)."""
    rows = sorted(mine, key=_eps_value, reverse=True)
    ax = _axis(rows[0])
    head = f"{name}, batch {b}: "
    leaking = [r for r in rows if _leaks(r)]
    if not leaking:
        top = rows[0]
        return (head + f"no leakage beyond the class prototype at any {ax} measured (at {ax} "
                f"{top['epsilon']}: re-identification {interval_text(top['reid_interval'])}, the true class's "
                f"prototype {top.get('prototype_true_reid') or 0:.0%}, chance {top['chance']:.0%}).")
    if len(leaking) == len(rows):
        low = rows[-1]
        return (head + f"leaks at every {ax} measured, down to {ax} {low['epsilon']} (re-identification "
                f"{interval_text(low['reid_interval'])}, chance {low['chance']:.0%}).")
    first = leaking[0]
    leak_text = (f"leaks (re-identification {interval_text(first['reid_interval'])} at {ax} {first['epsilon']}, "
                 f"chance {first['chance']:.0%})")
    safe = [r for r in rows if _eps_value(r) < _eps_value(leaking[-1])]
    if not safe:
        eps = ", ".join(r["epsilon"] for r in leaking)
        return head + f"{leak_text}; it still leaks at the smallest {ax} measured (leaking at {eps})."
    at = safe[0]
    text = (head + f"{leak_text}; re-identification is at chance or no better than the class prototype from "
            f"{ax} {at['epsilon']} down ({interval_text(at['reid_interval'])} there).")
    acc, base_acc = at.get("accuracy"), (base or {}).get("accuracy")
    if acc is not None and base_acc is not None:
        text += (f" That costs {(base_acc - acc) * 100:.1f} points of validation accuracy ({acc:.1%} vs "
                 f"{base_acc:.1%} {'without DP' if ax == 'epsilon' else 'without the defense'}).")
    return text


def verdicts(cfg: AuditConfig, rows: list[dict[str, Any]]) -> list[str]:
    """The verdict in words per method and batch size with observations (:func:`overall`)."""
    return [overall(name, b, scored, base) for name, b, scored, base in _groups(cfg, rows)]


def _fmt(r: dict[str, Any], key: str, kind: str) -> str:
    if kind in ("ipct", "idb"):
        iv = r.get(f"{key}_interval")
        if iv:
            return interval_text(iv, "db" if kind == "idb" else "pct")
        kind = kind[1:]
    v = r.get(key)
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
           ("noise_multiplier", "sigma", "g"), ("n_images", "images", "s"), ("reid", "re-id [95%]", "ipct"),
           ("psnr", "PSNR dB [95%]", "idb"), ("label_accuracy", "labels [95%]", "ipct"),
           ("prototype_true_reid", "prototype re-id [95%]", "ipct"), ("prototype_true_psnr", "prototype dB", "db"),
           ("chance", "chance", "pct"), ("accuracy", "accuracy (val)", "pct"),
           ("canary_epsilon_lower_bound", "canary eps lower bound", "g")]
"""The table's columns: (row key, heading, format); ``ipct`` / ``idb``: the key's interval as text."""


AXIS_HEADINGS = {"prune": "prune (fraction kept)", "quantize": "quantize (bits; 1 = sign)", "clip": "clip (norm C)"}
"""The point column's heading in a defense audit, per kind."""


def columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """:data:`COLUMNS`, in a defense audit with the point column named for the defense and no sigma or canary."""
    kind = (summary.get("rows") or [{}])[0].get("axis")
    if kind is None:
        return COLUMNS
    out = [(k, AXIS_HEADINGS.get(kind, kind), f) if k == "epsilon" else (k, h, f) for k, h, f in COLUMNS
           if k not in ("noise_multiplier", "canary_epsilon_lower_bound")]
    return [*out, ("attack", "attack", "s")]


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The table's cells as text, one list per row (:data:`COLUMNS`)."""
    return [[_fmt(r, k, kind) for k, _, kind in columns(summary)] for r in summary["rows"]]


def markdown_table(summary: dict[str, Any]) -> str:
    cols = columns(summary)
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "---|" * len(cols)
    return "\n".join([head, sep, *("| " + " | ".join(cells) + " |" for cells in table_rows(summary))])


def result_figures(r: dict[str, Any]) -> dict[str, Any]:
    """A summary row's figures as a results-file row holds them (``benchmarks/results``): re-identification,
    PSNR, labels and the true class's prototype with their intervals, the accuracy, and whether the point is
    at chance."""

    def iv(key: str, kind: str) -> dict[str, Any] | None:
        return None if r.get(key) is None else {**r[key], "kind": kind}

    return {"n_images": r["n_images"], "reid": iv("reid_interval", "rate"), "psnr": iv("psnr_interval", "mean"),
            "labels": iv("label_accuracy_interval", "rate"),
            "prototype_true_reid": iv("prototype_true_reid_interval", "rate"),
            "prototype_true_psnr": r.get("prototype_true_psnr"),
            "accuracy": None if r.get("accuracy") is None else f"{r['accuracy']:.1%}",
            "verdict": "at chance" if r.get("at_chance") else "above chance"}
