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
