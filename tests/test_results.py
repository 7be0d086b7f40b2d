"""Intervals of known counts, results files with provenance, and the README's headline table as their rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipleak.errors import ClipleakError
from clipleak.evaluation.stats import (
    at_chance,
    bootstrap_mean,
    images_to_separate,
    pooled_rate,
    rate_interval,
    wilson,
)
from clipleak.report.results import (
    Cell,
    current_block,
    load_results,
    markdown_table,
    provenance,
    render_all,
    render_headline,
    replace_block,
    set_headline,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent


def test_wilson_interval_of_known_counts() -> None:
    # 7 of 16 and the examples (44% and 11% of 8 images, 70% of 16), to the printed digit
    iv = wilson(7, 16)
    assert (round(iv.low, 4), round(iv.high, 4)) == (0.2310, 0.6682)
    assert rate_interval(0.44, 8).pct() == "44% [18-74%] (n=8)"
    assert rate_interval(0.11, 8).pct() == "11% [2-46%] (n=8)"
    assert rate_interval(0.70, 16).pct() == "70% [46-87%] (n=16)"
    # the extremes stay inside [0, 1] and are not degenerate
    assert wilson(0, 10).low == 0.0 and 0.25 < wilson(0, 10).high < 0.35
    assert wilson(10, 10).high == 1.0 and 0.65 < wilson(10, 10).low < 0.75
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_pooled_rate_counts_images_not_batches() -> None:
    iv = pooled_rate([1.0, 0.5, 0.0], [4, 4, 2])  # 4 + 2 + 0 of 10 images
    assert iv.n == 10 and iv.value == pytest.approx(0.6)
    assert (iv.low, iv.high) == pytest.approx((wilson(6, 10).low, wilson(6, 10).high))


def test_at_chance_is_decided_by_the_interval() -> None:
    assert at_chance(rate_interval(0.25, 8), 0.1)  # 25% of 8: the interval reaches 10%
    assert not at_chance(rate_interval(0.25, 200), 0.1)  # the same rate on 200 images excludes it
    n = images_to_separate(0.25, 0.1)
    assert n is not None and not at_chance(rate_interval(0.25, n), 0.1) and at_chance(rate_interval(0.25, n - 1), 0.1)
    assert images_to_separate(0.1, 0.1) is None


def test_bootstrap_mean_is_seeded_and_brackets_the_mean() -> None:
    vals = [12.0, 14.0, 15.0, 19.0, 22.0, 13.5]
    a, b = bootstrap_mean(vals, seed=3), bootstrap_mean(vals, seed=3)
    assert a == b
    assert a.low < a.value < a.high and a.n == 6
    assert bootstrap_mean([5.0]).low == bootstrap_mean([5.0]).high == 5.0


def _fake_eval(b: int, reid: float, psnr: list[float]) -> dict:
    m = {"psnr": psnr, "ssim": [0.5] * b}
    return {"batch_size": b, "label_count_accuracy": 1.0, "reidentification": {"attack": reid, "prototype": 0.0},
            "methods": {"attack": m, "prototype": {"psnr": [10.0] * b, "ssim": [0.1] * b}}}


def test_cell_rows_pool_images_and_write_with_provenance(tmp_path: Path) -> None:
    cell = Cell.new()
    cell.add_evaluation(_fake_eval(4, 0.75, [20.0, 21.0, 19.0, 18.0]), {"attack": "", "prototype": "prototype_"},
                        seconds=2.0)
    cell.add_evaluation(_fake_eval(4, 0.25, [15.0, 16.0, 14.0, 13.0]), {"attack": "", "prototype": "prototype_"},
                        seconds=4.0)
    row = cell.row(case="x", headline=True)
    assert row["n_images"] == 8 and row["batches"] == 2
    assert row["reid"]["value"] == pytest.approx(0.5) and row["reid"]["n"] == 8
    assert row["prototype_reid"]["value"] == 0.0 and row["psnr"]["value"] == pytest.approx(17.0)
    assert row["seconds_per_batch"]["value"] == pytest.approx(3.0)
    prov = provenance(split="private", draw_seeds=[200, 201], images=8, threads=2, command=["bench"], repo=ROOT)
    assert {"commit", "date", "split", "draw_seeds", "images", "threads", "load_average_at_start", "torch",
            "device", "command"} <= prov.keys()
    path = write_results("t", [row], prov, title="T", columns=[("case", "case"), ("reid", "re-id")], root=tmp_path)
    assert json.loads(path.read_text())["provenance"]["draw_seeds"] == [200, 201]
    assert not list(tmp_path.glob(".*tmp*"))
    loaded = load_results(tmp_path)
    assert "50% [22-78] | 17.0 [" in render_headline(loaded)
    with pytest.raises(ClipleakError):
        write_results("empty", [], prov, title="T", columns=[], root=tmp_path)
    set_headline("t", "x", False, root=tmp_path)  # the README row is chosen in the file, nothing else changes
    assert render_headline(load_results(tmp_path)).count("\n") == render_headline({}).count("\n")
    assert json.loads(path.read_text())["rows"][0]["reid"] == row["reid"]
    set_headline("t", "x", root=tmp_path)
    assert "50% [22-78]" in render_headline(load_results(tmp_path))
    with pytest.raises(ClipleakError, match="cases: x"):
        set_headline("t", "y", root=tmp_path)


def test_markdown_table_formats_intervals() -> None:
    t = markdown_table(["a", "b"], [["x|y", {"value": 0.5, "low": 0.2, "high": 0.8, "n": 8, "kind": "rate"}]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 50% [20-80] |"]


def test_replace_block_keeps_the_rest() -> None:
    from clipleak.report.results import README_END, README_START

    text = f"head\n{README_START}\nold\n{README_END}\ntail\n"
    new = replace_block(text, "new table")
    assert new == f"head\n{README_START}\nnew table\n{README_END}\ntail\n" and current_block(new) == "new table"
    with pytest.raises(ClipleakError):
        replace_block("no markers", "x")


def test_readme_headline_table_is_the_rendering_of_the_results() -> None:
    rendered = render_all(ROOT, write=False)
    readme = ROOT / "README.md"
    assert current_block(readme.read_text()) == current_block(rendered[readme]), (
        "README's headline table differs from benchmarks/results/: run `python benchmarks/render.py`")
    for path, text in rendered.items():
        if path != readme:
            assert path.exists() and path.read_text() == text, f"{path} is stale: run python benchmarks/render.py"


def test_provenance_marks_code_changes_not_results_files(tmp_path: Path) -> None:
    """A run's commit is marked "+uncommitted" when tracked code differs from it, but not for results files and
    their rendered pages (a chain of benchmarks in one checkout writes them as it goes)."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for rel in ("src/a.py", "benchmarks/results/r.json", "docs/results/r.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")

    def commit() -> str:
        return provenance(split="private", draw_seeds=[0], images=1, threads=1, command=["b"], repo=tmp_path)["commit"]

    assert not commit().endswith("+uncommitted")
    (tmp_path / "benchmarks/results/r.json").write_text("1\n")
    (tmp_path / "docs/results/r.md").write_text("1\n")
    (tmp_path / "untracked.sh").write_text("1\n")
    assert not commit().endswith("+uncommitted")
    (tmp_path / "src/a.py").write_text("1\n")
    assert commit().endswith("+uncommitted")
