"""Write an evaluation as a self-contained report folder.

``write_report`` puts into ``out_dir``:

* ``metrics.json``: the evaluation dict from :func:`clipleak.evaluation.evaluate` plus ``"config"``;
* ``truth.png``, ``reconstruction.png``, ``prototype.png``: image grids (paired order), upscaled with
  nearest-neighbour so that every image is at least 128 pixels;
* ``comparison.png``: truth / reconstruction / prototype rows, one labelled column per image;
* ``loss.png``: the attack's loss history on a log scale (only when there is a history), with the loss
  schedule's switches (``meta["schedule"]``) marked as dashed vertical lines;
* ``report.html`` (:mod:`.page`): verdict, metrics table with 95% intervals and the "at chance" decision
  they support, label accuracy, images, loss curve and run config, with inline CSS and images referenced
  by relative file names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..evaluation import METHOD_LABELS, Interval, at_chance, rate_interval
from ..records import Reconstruction, Truth
from .page import Section, esc, image, interval_text, links, paragraph, pre, pyplot, table, write_page

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MIN_TILE = 128
"""Each image in a grid is upscaled (nearest) to at least this many pixels on its shorter side."""
GRID_COLS = 8
"""Images per row in the grids and per block in ``comparison.png``."""


# -------------------------------------------------------------------------------------------- images


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8."""
    arr = img.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
    return (arr * 255.0 + 0.5).astype(np.uint8)


def _scale_factor(h: int, w: int) -> int:
    return max(1, math.ceil(MIN_TILE / max(1, min(h, w))))


def save_grid(images: torch.Tensor, path: str | Path, cols: int = GRID_COLS, pad: int = 4) -> Path:
    """Save ``(N, 3, H, W)`` images in [0, 1] as a grid PNG, upscaled with nearest-neighbour."""
    n, _, h, w = images.shape
    f = _scale_factor(h, w)
    th, tw = h * f, w * f
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * tw + (cols + 1) * pad, rows * th + (rows + 1) * pad), (200, 200, 200))
    for i in range(n):
        tile = Image.fromarray(_to_uint8(images[i])).resize((tw, th), Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        canvas.paste(tile, (pad + c * (tw + pad), pad + r * (th + pad)))
    p = Path(path)
    canvas.save(p)
    return p


def _classname(classnames: list[str], k: int) -> str:
    return classnames[k] if 0 <= k < len(classnames) else str(k)


def save_comparison(
    rows: list[tuple[str, torch.Tensor, list[str]]], path: str | Path, cols: int = GRID_COLS
) -> Path:
    """Side-by-side figure: one row per ``(row name, images (N,3,H,W), per-image captions)``.

    Batches wider than ``cols`` wrap into blocks of ``len(rows)`` rows.
    """
    n = rows[0][1].shape[0]
    cols = max(1, min(cols, n))
    blocks = math.ceil(n / cols)
    nrows = blocks * len(rows)
    plt = pyplot()
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols + 0.9, 2.15 * nrows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    for i in range(n):
        blk, c = divmod(i, cols)
        for j, (name, imgs, captions) in enumerate(rows):
            ax = axes[blk * len(rows) + j, c]
            ax.imshow(_to_uint8(imgs[i]), interpolation="nearest")
            ax.set_title(captions[i], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=10, fontweight="bold")
    for i in range(n, blocks * cols):
        blk, c = divmod(i, cols)
        for j in range(len(rows)):
            axes[blk * len(rows) + j, c].set_visible(False)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    plt.close(fig)
    return p


def schedule_switches(meta: dict[str, Any] | None) -> list[tuple[int, str]]:
    """The loss-schedule switches a reconstruction's ``meta["schedule"]`` records, as (iteration, label).

    ``meta["schedule"]`` maps each term to ``{"weight", "switch_iteration", "before", "after"}`` (the
    gradient-matching presets write it; ``before``/``after`` are the weight multipliers either side of the
    switch). Terms switching at the same iteration share one label, e.g. ``"bn_prior, patch, l2 on;
    gradient x0.5 at iteration 150"``. No schedule, or no term that switches: ``[]``.
    """
    sched = (meta or {}).get("schedule") or {}
    on: dict[int, list[str]] = {}
    other: dict[int, list[str]] = {}
    for name, s in sched.items():
        it = s.get("switch_iteration") if isinstance(s, dict) else None
        if it is None:
            continue
        before, after = s.get("before"), s.get("after")
        if before is not None and after is not None and before == after:
            continue  # a term the switch leaves alone
        on.setdefault(int(it), [])
        other.setdefault(int(it), [])
        if before is None or after is None:
            other[int(it)].append(f"{name} switched")
        elif before == 0:
            on[int(it)].append(name)
        elif after == 0:
            other[int(it)].append(f"{name} off")
        else:
            other[int(it)].append(f"{name} x{after / before:g}")
    out = []
    for it in sorted(on):
        parts = ([", ".join(on[it]) + " on"] if on[it] else []) + other[it]
        out.append((it, f"{'; '.join(parts)} at iteration {it}"))
    return out


def loss_figure(history: dict[str, list[float]],
                switches: list[tuple[int, str]] | None = None) -> Figure | None:
    """The loss-curve figure :func:`save_loss` writes; None when there is no history.

    A term logged for fewer iterations than the longest one (a scheduled term is not evaluated while its
    weight is 0, so it is logged only from its switch on) is drawn against its last iterations. Each
    ``(iteration, label)`` of ``switches`` is a dashed vertical line with its label.
    """
    series = {k: np.asarray(v, dtype=float) for k, v in history.items() if len(v) > 0}
    if not series:
        return None
    n = max(len(v) for v in series.values())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    positive = False
    for name, vals in series.items():
        shown = np.where(vals > 0, vals, np.nan)  # a log axis cannot show values <= 0
        positive = positive or bool(np.isfinite(shown).any())
        ax.plot(np.arange(n - len(vals), n), shown, label=name, linewidth=1.2)
    if positive:
        ax.set_yscale("log")
    for it, label in switches or []:
        ax.axvline(it, color="0.3", linestyle="--", linewidth=1.0, gid="schedule-switch")
        ax.text(it, 1.01, label, transform=ax.get_xaxis_transform(), va="bottom",
                ha="left" if it < n / 2 else "right", fontsize=8, color="0.2", gid="schedule-label")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (log scale)" if positive else "loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_loss(history: dict[str, list[float]], path: str | Path,
              switches: list[tuple[int, str]] | None = None) -> Path | None:
    """Plot each loss term over iterations on a log y-axis, schedule switches marked (see
    :func:`loss_figure`); None (nothing written) when empty."""
    fig = loss_figure(history, switches)
    if fig is None:
        return None
    p = Path(path)
    fig.savefig(p)
    pyplot().close(fig)
    return p


# ---------------------------------------------------------------------------------------------- html

def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _reid_decision(ev: dict[str, Any]) -> str | None:
    """Whether the attack's re-identification is at chance, decided by its 95% interval (None without one)."""
    reid = ev.get("reidentification") or {}
    iv = (reid.get("interval") or {}).get("attack")
    if not iv or reid.get("attack") is None:
        return None
    chance = float(reid["chance"])
    where = ("at chance: its 95% interval reaches" if at_chance(Interval(**iv), chance)
             else "above chance: its 95% interval excludes")
    return f"Re-identification of the attack {interval_text(iv)}: {where} chance ({chance:.0%})."


def _metrics_table(ev: dict[str, Any]) -> str:
    reid = ev.get("reidentification")
    head = ["method", "PSNR (dB) ↑ [95% interval]", "SSIM ↑", "LPIPS ↓"]
    if reid is not None:
        head.append(f"re-identification ↑ [95% interval] (k={reid['k']}, chance {reid['chance']:.0%})")
    rows = []
    for m, s in ev["methods"].items():
        psnr = interval_text(s["psnr_interval"], "db") if s.get("psnr_interval") else _num(s["psnr_mean"], ".2f")
        cells = [METHOD_LABELS.get(m, m), psnr, _num(s["ssim_mean"], ".3f"), _num(s["lpips_mean"], ".3f")]
        if reid is not None:
            iv = (reid.get("interval") or {}).get(m)
            cells.append("—" if m not in reid else interval_text(iv) if iv else _num(reid.get(m), ".0%"))
        rows.append(cells)
    out = [table(head, rows, row_classes=list(ev["methods"]))]
    notes = []
    if not ev["lpips"]["available"]:
        notes.append(ev["lpips"]["note"])
    decision = _reid_decision(ev)
    if decision:
        notes.append(decision)
    if reid is not None and reid.get("note"):
        notes.append("Re-identification: " + reid["note"] + "; its interval counts images, not draws.")
    notes.append("Means over the batch with 95% intervals (Wilson for rates, a bootstrap over the images for "
                 "PSNR; n = images); per-image values are in metrics.json.")
    diag = ev.get("diagnostics") or {}
    if diag.get("warning"):
        notes.insert(0, "Warning: " + diag["warning"])
    if diag.get("same_class_gradient_cosine") is not None:
        notes.append(f"Leakage signal: mean cosine between the shared gradients of different public images of "
                     f"the same class = {diag['same_class_gradient_cosine']:.3f} (1.0 = the update does not "
                     "depend on the image).")
    out += [paragraph(n, "note") for n in notes]
    return "\n".join(out)


def _to_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False)


def _jsonable(obj: Any) -> Any:
    """Recursively turn ``obj`` into strict JSON (non-finite floats -> None, unknown types -> str)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _jsonable(obj.item())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return str(obj)


def _recovery_section(ev: dict[str, Any]) -> list[Section]:
    """What the update gave away before any image search: features and their cosine to the truth's."""
    rec = ev.get("feature_recovery")
    if not rec:
        return []
    text = []
    if rec.get("cosine_to_truth_mean") is not None:
        text.append(f"Recovered image features vs the true images' features (paired): mean cosine "
                    f"<b>{rec['cosine_to_truth_mean']:.4f}</b> (per image: "
                    f"{', '.join(f'{c:.4f}' for c in rec['cosine_to_truth'])}). ")
    if rec.get("images_separated") is not None:
        text.append(f"Separated {rec['images_separated']} of {rec['batch_size']} images; relative residual "
                    f"of the fit {rec.get('relative_residual', 0):.1e}. ")
    return [Section("Feature recovery", ["<p>" + "".join(text) + "</p>",
                                         *(paragraph(n, "note") for n in rec.get("notes", []))])]


def defense_text(defense: dict[str, Any] | None) -> str:
    """One line on the observation's DP defense (``meta["defense"]``), or that there was none."""
    if not defense:
        return "Defense: none (the observation is the plain gradient)."
    update = f" Update defense: {defense['applied']}." if defense.get("kind") else ""
    if defense.get("mechanism") is None:
        return update.strip()
    eps = defense.get("epsilon")
    spent = (f"epsilon {eps:.3g} at delta {defense.get('delta'):g} ({defense.get('accountant')}, "
             f"{defense.get('steps')} steps at sample rate {defense.get('sample_rate'):g})") if eps is not None \
        else "no epsilon (no schedule given)"
    return (f"Defense: {defense.get('mechanism')} DP, clipping norm C {defense.get('clip'):g} "
            f"({defense.get('clipping')}), noise multiplier {defense.get('noise_multiplier'):.4g}, {spent}.{update}")


@dataclass
class _Paired:
    """A batch in the evaluation's paired order: column ``i`` is ``truth[i]``, the reconstruction
    ``recon[pairing[i]]`` and the prototype of that reconstruction's label."""

    truth: torch.Tensor
    recon: torch.Tensor
    prototype: torch.Tensor
    truth_labels: list[int]
    recon_labels: list[int]

    @classmethod
    def of(cls, recon: Reconstruction, truth: Truth, ev: dict[str, Any], prototypes: torch.Tensor) -> _Paired:
        perm = torch.as_tensor(ev.get("pairing", list(range(truth.images.shape[0]))), dtype=torch.long)
        r_lab = [int(v) for v in torch.as_tensor(recon.labels).reshape(-1).long()[perm].tolist()]
        return cls(truth=truth.images.detach().cpu().float(), recon=recon.images.detach().cpu().float()[perm],
                   prototype=prototypes.detach().cpu().float()[torch.as_tensor(r_lab, dtype=torch.long)],
                   truth_labels=[int(v) for v in torch.as_tensor(truth.labels).reshape(-1).long().tolist()],
                   recon_labels=r_lab)


def _write_figures(d: Path, pb: _Paired, ev: dict[str, Any], recon: Reconstruction,
                   classnames: list[str]) -> tuple[Path | None, list[tuple[int, str]]]:
    """The grids, ``comparison.png`` and ``loss.png`` (a stale curve removed); the loss path and switches."""
    save_grid(pb.truth, d / "truth.png")
    save_grid(pb.recon, d / "reconstruction.png")
    save_grid(pb.prototype, d / "prototype.png")

    def db(m: str, i: int) -> str:
        v = ev["methods"][m]["psnr"][i]
        return "n/a" if v is None else f"{v:.1f} dB"

    n, t_lab, r_lab = pb.truth.shape[0], pb.truth_labels, pb.recon_labels
    names_t = [_classname(classnames, t_lab[i]) for i in range(n)]
    names_r = [_classname(classnames, r_lab[i]) for i in range(n)]
    save_comparison([
        ("truth", pb.truth, [f"#{i} {names_t[i]}" for i in range(n)]),
        ("reconstruction", pb.recon, [f"{names_r[i]}{'' if r_lab[i] == t_lab[i] else ' (wrong)'} · "
                                      f"{db('attack', i)}" for i in range(n)]),
        ("prototype", pb.prototype, [f"{names_r[i]} · {db('prototype', i)}" for i in range(n)]),
    ], d / "comparison.png")
    switches = schedule_switches(recon.meta)
    loss = save_loss(recon.history, d / "loss.png", switches)
    if loss is None and (d / "loss.png").exists():
        (d / "loss.png").unlink()  # a stale curve from an earlier run would be misleading
    return loss, switches


def _labels_section(pb: _Paired, ev: dict[str, Any], recon: Reconstruction, classnames: list[str]) -> Section:
    """Label accuracy after pairing and order-free, with their intervals, and the per-image label table."""
    t_lab, r_lab = pb.truth_labels, pb.recon_labels
    n = len(t_lab)
    n_ok = sum(int(a == b) for a, b in zip(r_lab, t_lab, strict=True))
    paired = interval_text(rate_interval(ev["label_accuracy"], n).to_dict()) if n else "n/a"
    count_iv = ev.get("label_count_interval")
    count = interval_text(count_iv) if count_iv else f"{ev['label_count_accuracy']:.0%}"
    text = (f"<p>Label accuracy: <b>{esc(paired)}</b> ({n_ok} of {n} after pairing; labels from "
            f"{esc(recon.label_source)}). Ignoring order, {esc(count)} of the batch's labels were recovered "
            "(multiset overlap), which does not depend on how images were paired. "
            "The prototype baseline uses the reconstruction's labels.</p>")
    rows = [[f"#{i}", _classname(classnames, t_lab[i]), _classname(classnames, r_lab[i]),
             "✓" if t_lab[i] == r_lab[i] else "✗"] for i in range(n)]
    return Section("Labels", [text, table(["image", "true class", "reconstruction's class", ""], rows)])


def _images_sections(loss: Path | None, switches: list[tuple[int, str]]) -> list[Section]:
    images = Section("Images", [
        paragraph("Columns in paired order (Hungarian matching on PSNR); captions give the class name and the "
                  "PSNR to the true image.", "note"),
        image("comparison.png", "truth, reconstruction and class prototype side by side"),
        links("Full grids:", [("truth.png", "truth.png"), ("reconstruction.png", "reconstruction.png"),
                              ("prototype.png", "prototype.png")])])
    curve = Section("Loss curve", [image("loss.png", "attack loss over iterations (log scale)") if loss is not None
                                   else paragraph("No loss history was recorded.", "note")])
    if loss is not None and switches:
        curve.parts.append(paragraph(f"Loss schedule (dashed lines): {'; '.join(lab for _, lab in switches)}. "
                                     "Terms that are off before a switch are not evaluated, so their curves start "
                                     "there.", "note"))
    return [images, curve]


def write_report(
    out_dir: str | Path,
    recon: Reconstruction,
    truth: Truth,
    evaluation: dict[str, Any],
    prototypes: torch.Tensor,
    classnames: list[str],
    config: dict[str, Any] | None = None,
) -> Path:
    """Write the report folder (see module docs) and return the path of ``report.html``.

    Images are shown in the evaluation's paired order (:class:`_Paired`).
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    ev = evaluation
    cfg = dict(config) if config is not None else {}
    (d / "metrics.json").write_text(_to_json({**ev, "config": cfg}) + "\n")

    pb = _Paired.of(recon, truth, ev, prototypes)
    loss, switches = _write_figures(d, pb, ev, recon, classnames)
    v = ev["verdict"]
    good = bool(v["beat_blank"] and v["beat_prototype"])
    # the caller's config normally already holds the reconstruction's meta (attack config, observation)
    run_cfg = cfg if cfg else {"attack": recon.attack, "label_source": recon.label_source, "meta": recon.meta}
    head = Section(None, [
        paragraph(f"{pb.truth.shape[0]} image(s) of {ev['image_size'][0]}×{ev['image_size'][1]} px; "
                  f"labels from: {recon.label_source}", "note"),
        paragraph(v["text"], f"verdict {'good' if good else 'bad'}"),
        paragraph(defense_text(ev.get("defense")), "note")])
    return write_page(d / "report.html", f"clipleak report: {recon.attack}", [
        head, Section("Metrics", [_metrics_table(ev)]), *_recovery_section(ev),
        _labels_section(pb, ev, recon, classnames), *_images_sections(loss, switches),
        Section("Run configuration", [f"<p>Attack: <b>{esc(recon.attack)}</b></p>", pre(_to_json(run_cfg)),
                                      links("All numbers:", [("metrics.json", "metrics.json")])])])
