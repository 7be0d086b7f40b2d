"""The report folder: files, verdict, method rows, escaping and a metrics.json that round-trips."""

from __future__ import annotations

import json

import torch
from PIL import Image

from clipleak.evaluation import evaluate
from clipleak.records import Reconstruction, Truth
from clipleak.report import MIN_TILE, write_report


def _case(n: int = 4, size: int = 32, good: bool = True):
    g = torch.Generator().manual_seed(0)
    protos = torch.zeros(4, 3, size, size)
    for c in range(4):
        protos[c, :, 4 + 3 * c : 12 + 3 * c, 8:24] = 0.9
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 0, 3, 1, 2][:n])
    truth = (protos[labels] + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    shuffle = torch.roll(torch.arange(n), 1)
    if good:
        imgs = (truth[shuffle] + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    else:
        imgs = torch.rand(n, 3, size, size, generator=g)
    history = {"gradient_match": [1.0 / (i + 1) for i in range(50)], "total_variation": [0.0] + [0.1] * 49}
    rec = Reconstruction(imgs, labels[shuffle].clone(), "observation", "inverting_gradients",
                         history=history, meta={"observation": {"arch": "tiny-32", "note": "<b>x</b>"}})
    return rec, Truth(truth, labels), protos


def test_write_report_files_and_content(tmp_path) -> None:
    rec, truth, protos = _case()
    ev = evaluate(rec, truth, protos, with_lpips=False)
    config = {"attack": rec.attack, "observation": rec.meta["observation"]}
    classnames = ["zero", "one", "two", "<three>"]
    out = write_report(tmp_path / "rep", rec, truth, ev, protos, classnames, config)
    assert out == tmp_path / "rep" / "report.html"
    for name in ("metrics.json", "truth.png", "reconstruction.png", "prototype.png", "comparison.png",
                 "loss.png", "report.html"):
        assert (tmp_path / "rep" / name).is_file(), name

    with open(tmp_path / "rep" / "metrics.json") as f:
        js = json.load(f)
    assert js.pop("config") == config
    assert js == json.loads(json.dumps(ev))

    page = out.read_text(encoding="utf-8")
    assert ev["verdict"]["text"] in page  # plain text, nothing to escape
    assert 'class="verdict good"' in page
    for row in ("attack reconstruction", "blank image (baseline)", "class prototype (baseline)"):
        assert row in page
    assert "LPIPS not computed" in page
    assert "&lt;three&gt;" in page and "<three>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert 'src="comparison.png"' in page and 'src="loss.png"' in page
    assert "Label accuracy" in page

    with Image.open(tmp_path / "rep" / "truth.png") as im:
        assert im.height >= MIN_TILE and im.width >= 3 * MIN_TILE


def test_write_report_bad_attack_is_red_and_without_loss(tmp_path) -> None:
    rec, truth, protos = _case(n=10, good=False)
    rec.history = {}
    (tmp_path / "loss.png").write_bytes(b"stale")
    ev = evaluate(rec, truth, protos, with_lpips=False)
    assert not ev["verdict"]["beat_prototype"]
    out = write_report(tmp_path, rec, truth, ev, protos, [], None)
    page = out.read_text(encoding="utf-8")
    assert 'class="verdict bad"' in page and "did NOT beat" in page
    assert not (tmp_path / "loss.png").exists()
    assert "No loss history" in page
    assert (tmp_path / "comparison.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["config"] == {}


def test_loss_curve_marks_the_schedule_switch(tmp_path) -> None:
    from clipleak.report import loss_figure, schedule_switches

    rec, truth, protos = _case()
    # gradvit-style meta: the priors off until iteration 20, then on while the gradient weight halves
    rec.meta["schedule"] = {
        "gradient": {"weight": 1.0, "switch_iteration": 20, "before": 1.0, "after": 0.5},
        "tv": {"weight": 1e-4, "switch_iteration": 20, "before": 1.0, "after": 1.0},
        "bn_prior": {"weight": 0.1, "switch_iteration": 20, "before": 0.0, "after": 1.0},
        "patch": {"weight": 1e-4, "switch_iteration": 20, "before": 0.0, "after": 1.0},
    }
    rec.history = {"gradient": [1.0 / (i + 1) for i in range(50)], "bn_prior": [0.5] * 30}
    switches = schedule_switches(rec.meta)
    assert switches == [(20, "bn_prior, patch on; gradient x0.5 at iteration 20")]
    assert schedule_switches({}) == [] and schedule_switches(None) == []
    assert schedule_switches({"schedule": {"gradient": {"weight": 1.0, "switch_iteration": None}}}) == []

    fig = loss_figure(rec.history, switches)
    assert fig is not None
    ax = fig.axes[0]
    vlines = [ln for ln in ax.get_lines() if ln.get_gid() == "schedule-switch"]
    assert len(vlines) == 1 and list(vlines[0].get_xdata()) == [20, 20]
    assert [t.get_text().strip() for t in ax.texts] == [switches[0][1]]
    bn = next(ln for ln in ax.get_lines() if ln.get_label() == "bn_prior")
    assert bn.get_xdata()[0] == 20 and bn.get_xdata()[-1] == 49  # logged from the switch on, drawn there

    ev = evaluate(rec, truth, protos, with_lpips=False)
    page = write_report(tmp_path, rec, truth, ev, protos, [], None).read_text(encoding="utf-8")
    assert "Loss schedule (dashed lines): bn_prior, patch on; gradient x0.5 at iteration 20" in page
    assert (tmp_path / "loss.png").is_file()

    # no schedule: no marker, no schedule note
    fig = loss_figure({"gradient": [1.0, 0.5]}, schedule_switches({}))
    assert fig is not None and not fig.axes[0].texts
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "schedule-switch"]
    rec.meta.pop("schedule")
    page = write_report(tmp_path / "plain", rec, truth, ev, protos, [], None).read_text(encoding="utf-8")
    assert "Loss schedule" not in page and 'src="loss.png"' in page


def test_report_shows_intervals_and_decides_chance_by_them(tmp_path) -> None:
    """PSNR, labels and re-identification carry their 95% intervals; a known count gives the known interval
    (3 of 4 images: Wilson 30-95%, above chance 10%; 1 of 4: 5-70%, at chance)."""
    from clipleak.evaluation import wilson

    rec, truth, protos = _case()
    ev = evaluate(rec, truth, protos, with_lpips=False)
    assert ev["methods"]["attack"]["psnr_interval"]["n"] == 4
    for hits, decision in ((3, "above chance: its 95% interval excludes chance (10%)"),
                           (1, "at chance: its 95% interval reaches chance (10%)")):
        ev["reidentification"] = {"k": 10, "draws": 20, "seed": 0, "chance": 0.1, "attack": hits / 4,
                                  "prototype": 0.0, "blank": 0.0, "note": "",
                                  "interval": {m: wilson(hits if m == "attack" else 0, 4).to_dict()
                                               for m in ("attack", "prototype", "blank")}}
        page = write_report(tmp_path / str(hits), rec, truth, ev, protos, [], None).read_text(encoding="utf-8")
        text = wilson(hits, 4).pct()
        assert text == ("75% [30-95%] (n=4)" if hits == 3 else "25% [5-70%] (n=4)")
        assert f"<td>{text}</td>" in page and f"Re-identification of the attack {text}: {decision}" in page
    psnr = ev["methods"]["attack"]["psnr_interval"]
    assert f"{psnr['value']:.1f} [{psnr['low']:.1f}-{psnr['high']:.1f}] dB (n=4)" in page
    count = ev["label_count_interval"]
    assert count["n"] == 4 and f"Ignoring order, {count['value']:.0%} [" in page


def test_page_helper_escapes_and_orders_sections(tmp_path) -> None:
    from clipleak.report.page import Section, bullets, image, paragraph, table, write_page

    path = write_page(tmp_path / "p.html", "a <title>", [
        Section(None, [paragraph("intro & more", "note")]),
        Section("Rows", [table(["h<1>", "h2"], [["a<b", 1]], row_classes=["attack"]), bullets(["x>y"])]),
        Section("Pictures", [image("a b.png", 'say "hi"')], level=3)])
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("a &lt;title&gt;") == 2
    assert '<p class="note">intro &amp; more</p>' in page and "<th>h&lt;1&gt;</th>" in page
    assert '<tr class="attack"><td>a&lt;b</td><td>1</td></tr>' in page and "<li>x&gt;y</li>" in page
    assert page.index("<h2>Rows</h2>") < page.index("<h3>Pictures</h3>")
    assert '<img src="a b.png" alt="say &quot;hi&quot;">' in page
