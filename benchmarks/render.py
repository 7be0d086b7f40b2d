"""Render docs/results/*.md and the README's headline table from benchmarks/results/*.json.

    python benchmarks/render.py           # write them
    python benchmarks/render.py --check   # exit 1 when a rendered file differs from what is on disk
    python benchmarks/render.py --headline "malicious=CASE" --no-headline "mip=CASE"   # choose README rows
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipleak.report.results import render_all, set_headline

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--headline", action="append", default=[], metavar="NAME=CASE",
                    help="put the row CASE of results file NAME into the README's table (repeatable)")
    ap.add_argument("--no-headline", action="append", default=[], metavar="NAME=CASE",
                    help="take the row CASE of results file NAME out of the README's table (repeatable)")
    args = ap.parse_args()
    for items, on in ((args.headline, True), (args.no_headline, False)):
        for item in items:
            name, _, case = item.partition("=")
            set_headline(name, case, on, root=ROOT / "benchmarks" / "results")
    rendered = render_all(ROOT, write=not args.check)
    stale = [p for p, text in rendered.items() if not p.exists() or p.read_text() != text]
    for p in stale:
        print(f"out of date: {p.relative_to(ROOT)}")
    if not args.check:
        print(f"rendered {len(rendered)} files")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
