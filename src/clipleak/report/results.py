"""Figures as data: benchmark rows with their provenance, and the tables rendered from them.

A benchmark writes one JSON file under ``benchmarks/results/`` (``write_results``): its rows and the
provenance of the run that measured them (commit, date, split, draw seeds, images, threads, load average at
start, torch version, device, the command). ``render_all`` turns every results file into
``docs/results/<name>.md`` and the README's headline table (between two marker lines) into text; the test
suite fails when the README's table is not its rendering, so a figure in the README cannot drift from the
run that produced it.

``markdown_table`` is the one table printer every benchmark uses.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ClipleakError
from ..records import write_text_atomic

SCHEMA = 1
README_START = ("<!-- headline:start (rendered from benchmarks/results/ by `python benchmarks/render.py`; "
                "do not edit) -->")
README_END = "<!-- headline:end -->"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


RESULTS_PATHS = (":(top,exclude)benchmarks/results", ":(top,exclude)docs/results")
"""What the "+uncommitted" mark of a run's commit leaves out of ``git status``."""


def provenance(*, split: str, draw_seeds: Sequence[int], images: int, threads: int, device: str = "cpu",
               command: Sequence[str] | None = None, repo: str | Path = ".") -> dict[str, Any]:
    """What a reader needs to trust (or rerun) a row: taken at the start of the run."""
    import torch

    root = Path(repo)
    commit = _git(root, "rev-parse", "--short=12", "HEAD")
    # results files and their rendered pages do not change what a run computes: a chain of benchmarks in one
    # checkout writes them as it goes, and the later runs are still on the commit
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *RESULTS_PATHS)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "commit": (commit or "unknown") + ("+uncommitted" if dirty else ""),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "split": split,
        "draw_seeds": [int(s) for s in draw_seeds],
        "images": int(images),
        "threads": int(threads),
        "load_average_at_start": None if load is None else round(load, 2),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "command": shlex.join(command if command is not None else ["python", *sys.argv]),
    }


def write_results(name: str, rows: list[dict[str, Any]], prov: dict[str, Any], *, title: str,
                  columns: Sequence[tuple[str, str]], notes: str = "",
                  root: str | Path = "benchmarks/results") -> Path:
    """Store a benchmark's rows. ``columns`` are (key, header) pairs in display order; ``notes`` a paragraph
    shown under the rendered table."""
    if not rows:
        raise ClipleakError(f"results {name!r}: no rows to write")
    doc = {"schema": SCHEMA, "name": name, "title": title, "notes": notes,
           "columns": [list(c) for c in columns], "provenance": prov, "rows": rows}
    return write_text_atomic(Path(root) / f"{name}.json", json.dumps(doc, indent=2) + "\n")


def set_headline(name: str, case: str, on: bool = True, *, root: str | Path = "benchmarks/results") -> Path:
    """Choose whether the row of results file ``name`` whose ``case`` is ``case`` appears in the README's headline
    table (a presentation choice, kept in the file so that the rendering stays a pure function of the files).
    Only the flag changes; an unknown file or case is refused with the cases there are."""
    path = Path(root) / f"{name}.json"
    if not path.is_file():
        raise ClipleakError(f"no results file {path}")
    doc = json.loads(path.read_text())
    hits = [r for r in doc["rows"] if r.get("case") == case]
    if not hits:
        cases = "; ".join(str(r.get("case")) for r in doc["rows"])
        raise ClipleakError(f"{path}: no row with case {case!r} (cases: {cases})")
    for r in hits:
        r["headline"] = bool(on)
    return write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


@dataclass(frozen=True)
class ResultsFile:
    name: str
    title: str
    notes: str
    columns: list[tuple[str, str]]
    provenance: dict[str, Any]
    rows: list[dict[str, Any]]


def load_results(root: str | Path = "benchmarks/results") -> dict[str, ResultsFile]:
    out: dict[str, ResultsFile] = {}
    for path in sorted(Path(root).glob("*.json")):
        try:
            d = json.loads(path.read_text())
            out[d["name"]] = ResultsFile(d["name"], d["title"], d.get("notes", ""),
                                         [(k, h) for k, h in d["columns"]], d["provenance"], d["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ClipleakError(f"{path}: not a clipleak results file ({e})") from e
    return out


# ---- formatting ---------------------------------------------------------------------------------------------


def fmt_rate(iv: dict[str, Any] | None) -> str:
    """``44% [18-74]`` from an interval dict ``{value, low, high, n}``."""
    if not iv:
        return ""
    return f"{iv['value']:.0%} [{iv['low'] * 100:.0f}-{iv['high'] * 100:.0f}]"


def fmt_mean(iv: dict[str, Any] | None, digits: int = 1) -> str:
    """``16.1 [15.2-17.0]`` from an interval dict."""
    if not iv:
        return ""
    return f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}-{iv['high']:.{digits}f}]"


def fmt_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict) and {"value", "low", "high"} <= value.keys():
        if value.get("kind", "rate") == "rate":
            return fmt_rate(value)
        return fmt_mean(value, 2 if abs(value["value"]) <= 1.0 else 1)  # SSIM, cosines: 2 digits; dB, s: 1
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through ``fmt_cell``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(rf: ResultsFile) -> str:
    return markdown_table([h for _, h in rf.columns], [[r.get(k) for k, _ in rf.columns] for r in rf.rows])


def _provenance_lines(p: dict[str, Any]) -> list[str]:
    seeds = p.get("draw_seeds") or []
    seed_text = (f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1))
                 else ", ".join(map(str, seeds)))
    return [
        f"- command: `{p.get('command')}`",
        f"- split: {p.get('split')}; draw seeds {seed_text}; {p.get('images')} images per cell",
        f"- commit {p.get('commit')}, {p.get('date')}; torch {p.get('torch')} on {p.get('device')}, "
        f"{p.get('threads')} thread(s) of {p.get('cpus')} cores, load average {p.get('load_average_at_start')} "
        "at start (seconds are upper bounds when the load was above the thread count)",
    ]


def render_doc(rf: ResultsFile) -> str:
    parts = [f"# {rf.title}", "", "Rendered from `benchmarks/results/" + rf.name + ".json` by "
             "`python benchmarks/render.py`; do not edit by hand.", "", results_table(rf), ""]
    if rf.notes:
        parts += [rf.notes, ""]
    parts += ["Provenance:", "", *_provenance_lines(rf.provenance), ""]
    return "\n".join(parts)


HEADLINE_HEADERS = ["case", "n (split)", "re-identified [95% CI]", "PSNR dB (prototype)", "labels",
                    "command and provenance"]
HEADLINE_ORDER = ("mip", "mip-coop", "mip_shared_b4", "gradvit", "mip224-adapter", "mip224-coop", "mip224-projection",
                  "audit-adapter", "defense-prune", "defense-quantize", "fl_secagg", "malicious")
"""Results files in the order their headline rows appear; files not named here follow in name order."""


def headline_rows(results: dict[str, ResultsFile]) -> list[list[str]]:
    """The README's headline rows: every results row marked ``headline: true``, files in ``HEADLINE_ORDER``."""
    out: list[list[str]] = []
    rank = {name: i for i, name in enumerate(HEADLINE_ORDER)}
    for rf in sorted(results.values(), key=lambda f: (rank.get(f.name, len(rank)), f.name)):
        for r in rf.rows:
            if not r.get("headline"):
                continue
            proto = r.get("prototype_psnr")
            psnr = r.get("psnr")
            psnr_text = "" if psnr is None else fmt_mean(psnr) if isinstance(psnr, dict) else f"{psnr:.1f}"
            if proto is not None:
                proto_v = proto["value"] if isinstance(proto, dict) else proto
                psnr_text += f" ({proto_v:.1f})"
            out.append([
                str(r.get("case", "")),
                f"{r.get('n_images', '')} ({rf.provenance.get('split', '')})",
                fmt_rate(r.get("reid")),
                psnr_text,
                fmt_rate(r.get("labels")),
                f"[{rf.name}](docs/results/{rf.name}.md)",
            ])
    return out


def render_headline(results: dict[str, ResultsFile]) -> str:
    rows = headline_rows(results)
    if not rows:
        return "(no headline results yet: run the benchmarks, then `python benchmarks/render.py`)"
    return markdown_table(HEADLINE_HEADERS, rows)


def replace_block(text: str, block: str) -> str:
    """``text`` with what stands between the README markers replaced by ``block``."""
    if README_START not in text or README_END not in text:
        raise ClipleakError("README has no headline markers")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{block}\n{README_END}{tail}"


def current_block(text: str) -> str:
    if README_START not in text or README_END not in text:
        raise ClipleakError("README has no headline markers")
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip("\n")


def render_all(repo: str | Path = ".", *, write: bool = True) -> dict[Path, str]:
    """Render docs/results/*.md and the README's headline table from benchmarks/results/; return
    path -> text (written when ``write``)."""
    root = Path(repo)
    results = load_results(root / "benchmarks" / "results")
    out: dict[Path, str] = {root / "docs" / "results" / f"{name}.md": render_doc(rf) for name, rf in results.items()}
    index = ["# Results", "", "Every table here is rendered from a file in `benchmarks/results/` (rows and the "
             "provenance of the run that measured them) by `python benchmarks/render.py`.", ""]
    index += [f"- [{rf.title}]({name}.md): {rf.provenance.get('split')} split, "
              f"{rf.provenance.get('date', '')[:10]}, commit {rf.provenance.get('commit')}"
              for name, rf in results.items()]
    out[root / "docs" / "results" / "README.md"] = "\n".join(index) + "\n"
    readme = root / "README.md"
    out[readme] = replace_block(readme.read_text(), render_headline(results))
    if write:
        for path, text in out.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return out


# ---- accumulating a benchmark cell --------------------------------------------------------------------------


@dataclass
class Cell:
    """Per-image figures of one benchmark cell (many batches of one setting), turned into a row with
    intervals: rates pooled over the images (Wilson), means bootstrapped over the images."""

    sizes: list[int]
    rates: dict[str, list[float]]
    values: dict[str, list[float]]

    @classmethod
    def new(cls) -> Cell:
        return cls([], {}, {})

    def add_evaluation(self, ev: dict[str, Any], methods: dict[str, str], **seconds: float) -> None:
        """One batch as ``evaluation.evaluate`` scored it. ``methods`` maps a scored method (``attack``,
        ``prototype``, ``public-nn``) to the prefix of its keys in the row (``""``, ``prototype_``, ...);
        ``seconds`` adds per-batch timings (``seconds=12.3``)."""
        self.sizes.append(int(ev["batch_size"]))
        for method, prefix in methods.items():
            reid = (ev.get("reidentification") or {}).get(method)
            if reid is not None:
                self.rates.setdefault(f"{prefix}reid", []).append(float(reid))
            for key in ("psnr", "ssim"):
                vals = [float(v) for v in ev["methods"][method][key] if v is not None]
                self.values.setdefault(f"{prefix}{key}", []).extend(vals)
        self.rates.setdefault("labels", []).append(float(ev["label_count_accuracy"]))
        cos = (ev.get("feature_recovery") or {}).get("cosine_to_truth")
        if cos:
            self.values.setdefault("feature_cosine", []).extend(float(c) for c in cos if c is not None)
        for key, sec in seconds.items():
            self.values.setdefault(f"{key}_per_batch", []).append(float(sec))

    @property
    def n_images(self) -> int:
        return int(sum(self.sizes))

    def row(self, **extra: Any) -> dict[str, Any]:
        from ..evaluation.stats import bootstrap_mean, pooled_rate

        out: dict[str, Any] = {"n_images": self.n_images, "batches": len(self.sizes)}
        for k, rs in self.rates.items():
            if len(rs) == len(self.sizes):
                out[k] = {**pooled_rate(rs, self.sizes).to_dict(), "kind": "rate"}
        for k, vs in self.values.items():
            if vs:
                out[k] = {**bootstrap_mean(vs).to_dict(), "kind": "mean"}
        out.update(extra)
        return out
