"""One way to write an HTML page: a title, sections of paragraphs, tables, images and lists, one style sheet.

Every page clipleak writes (the attack report, the audit page, the federated run's report) goes through
:func:`write_page`; the fragment helpers escape what they are given, so callers pass plain text.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..evaluation import Interval

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin-top:1.2em}
.verdict{font-size:1.15em;font-weight:600;padding:.8em 1em;border-radius:6px;border:2px solid}
.verdict.good{color:#135c1f;background:#e8f6ea;border-color:#2e9e44}
.verdict.bad{color:#8a1616;background:#fbeaea;border-color:#c83232}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.35em .8em;text-align:right}
th:first-child,td:first-child{text-align:left} tr.attack td{font-weight:600}
.note{color:#666;font-size:.9em} img{max-width:100%;image-rendering:pixelated}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em;border-radius:4px}
"""


def esc(x: Any) -> str:
    """``x`` as HTML text (quotes escaped too)."""
    return html.escape(str(x), quote=True)


def paragraph(text: str, cls: str | None = None) -> str:
    """A paragraph of plain text; ``cls`` e.g. ``"note"`` (small, grey) or ``"verdict good"``."""
    return f'<p class="{esc(cls)}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>"


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """A table of plain-text cells; ``row_classes`` gives each row a CSS class."""
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for n, row in enumerate(rows):
        cls = f' class="{esc(row_classes[n])}"' if row_classes is not None else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def image(src: str, alt: str) -> str:
    return f'<img src="{esc(src)}" alt="{esc(alt)}">'


def bullets(items: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def links(lead: str, targets: Sequence[tuple[str, str]], cls: str | None = "note") -> str:
    """``lead`` followed by links ``(text, href)``, comma-separated, in one paragraph."""
    inner = ", ".join(f'<a href="{esc(href)}">{esc(text)}</a>' for text, href in targets)
    open_tag = f'<p class="{esc(cls)}">' if cls else "<p>"
    return f"{open_tag}{esc(lead)} {inner}.</p>"


@dataclass
class Section:
    """A heading (``None``: none) and its HTML fragments, in order (build them with the helpers above)."""

    heading: str | None
    parts: list[str] = field(default_factory=list)
    level: int = 2


def render_page(title: str, sections: Iterable[Section]) -> str:
    """The whole page as text: ``title`` as the window title and the first heading, then the sections."""
    body = [f"<h1>{esc(title)}</h1>"]
    for s in sections:
        if s.heading is not None:
            body.append(f"<h{s.level}>{esc(s.heading)}</h{s.level}>")
        body.extend(s.parts)
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{esc(title)}</title>", f"<style>{CSS}</style></head><body>", *body,
                      "</body></html>"]) + "\n"


def write_page(path: str | Path, title: str, sections: Iterable[Section]) -> Path:
    """Write :func:`render_page` to ``path`` (UTF-8) and return the path."""
    p = Path(path)
    p.write_text(render_page(title, sections), encoding="utf-8")
    return p


def interval_text(iv: dict[str, Any] | None, kind: str = "pct") -> str:
    """An interval dict (``{value, low, high, n}``, :class:`clipleak.evaluation.Interval`) as text:
    ``44% [18-74%] (n=8)`` (``kind="pct"``) or ``16.1 [15.2-17.0] dB (n=8)`` (``"db"``); ``n/a`` for None."""
    if not iv:
        return "n/a"
    v = Interval(float(iv["value"]), float(iv["low"]), float(iv["high"]), int(iv["n"]))
    return v.db() if kind == "db" else v.pct()


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (it takes about a second, which a
    command stopped by a bad input should not pay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
