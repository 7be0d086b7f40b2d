"""The privacy audit: strong noise brings the strongest cheap attack to chance, weak noise does not; the
report prints the defense; the audit resumes without recomputing and writes its chart; intervals and the
verdict they decide; the draw seed picks the digits; the canary bound."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clipleak import api
from clipleak.audit import AuditConfig, canary_audit, epsilon_lower_bound, run_audit, summarise
from clipleak.client import load_private
from clipleak.data import DataSpec, load_public
from clipleak.evaluation import evaluate
from clipleak.peft import PeftConfig

DIGITS = range(4)


def _reid(sigma: float) -> float:
    spec = DataSpec.parse("mnist")
    private, protos = load_private(spec, 32), load_public(spec, 32).prototypes()
    rates = []
    for seed in DIGITS:
        obs, truth = api.make_observation(weights="tiny-mnist", peft=PeftConfig(method="adapter"), seed=seed,
                                          dp_seed=seed,
                                          dp={"mechanism": "per-example", "clip": 0.01, "noise_multiplier": sigma})
        rec = api.attack_observation(obs, name="featmatch", decoder="tiny-mnist-decoder", iterations=0)
        rates.append(evaluate(rec, truth, protos, with_lpips=False, reid_pool=private)["reidentification"]["attack"])
    return sum(rates) / len(rates)


def test_weak_noise_still_leaks_strong_noise_does_not():
    """Trained artifacts, adapter, batch 1, 4 private digits, decoder attack (chance 10%)."""
    assert _reid(1e-3) >= 0.7  # sigma C = 1e-5: the update still gives the digit away
    assert _reid(10.0) <= 0.1 + 0.15  # sigma C = 0.1: not much better than chance


def test_report_prints_the_defense(tmp_path):
    obs, truth = api.make_observation(weights="tiny-mnist", peft=PeftConfig(method="adapter"), seed=0, dp_seed=0,
                                      dp={"mechanism": "per-example", "clip": 0.01, "noise_multiplier": 2.0})
    rec = api.attack_observation(obs, name="featmatch", decoder="tiny-mnist-decoder", iterations=0)
    report, ev = api.evaluate_reconstruction(rec, truth, tmp_path / "r", with_lpips=False)
    assert ev["defense"]["mechanism"] == "per-example" and ev["defense"]["noise_multiplier"] == 2.0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["defense"]["clip"] == 0.01 and metrics["config"]["defense"]["noise_multiplier"] == 2.0
    assert "Defense: per-example DP" in report.read_text()


def _floor_case(method: str, batch: int, sigma: float, mechanism: str = "per-example", clip: float = 0.01):
    obs, _ = api.make_observation(weights="tiny-mnist", peft=PeftConfig(method=method), seed=1, dp_seed=1,
                                  batch_size=batch,
                                  dp={"mechanism": mechanism, "clip": clip, "noise_multiplier": sigma})
    return obs


def test_fits_read_the_noise_scale():
    """The fits read the defense: the expected noise residual is s sqrt(d) / |g| with s = sigma C / B
    (per-example) or sigma C (per-batch); on a strongly noised update (noise 10x the clipped signal) it
    predicts the observed norm to 2% (a wrong B, i.e. s off by 2x, would miss by ~100%); with no clipping
    active the adapter batch fit stops there, reports the floor, and its residual sits at it (4 unknowns
    cannot explain 8,192 noise numbers); at a negligible noise the fit goes below 1e-3 as before."""
    from clipleak.recover.noise import floor_note, noise_std, relative_noise_floor

    obs = _floor_case("adapter", 2, 100.0)
    g = torch.cat([v.reshape(-1) for v in obs.gradients.values()]).double()
    assert noise_std(obs) == 100.0 * 0.01 / 2
    assert abs(relative_noise_floor(obs, g.numel(), float(g.norm())) - 1.0) < 0.02
    assert "almost no signal" in floor_note(1.1, 0.99, obs)  # a floor ~1: reaching it proves nothing
    assert "down to its noise" in floor_note(0.45, 0.4, obs) and "stays above" in floor_note(0.9, 0.4, obs)
    assert noise_std(_floor_case("adapter", 1, 3.0, "per-batch")) == 3.0 * 0.01
    undefended, _ = api.make_observation(weights="tiny-mnist", peft=PeftConfig(method="adapter"), seed=1)
    assert noise_std(undefended) is None
    # C = 1 clips nothing here (per-example adapter gradients have norm ~0.01), so the fit's model holds
    # exactly and only the noise is left: sigma C / B = 5e-5 per coordinate, about 0.4 of the update's norm
    rec = api.attack_observation(_floor_case("adapter", 2, 1e-4, clip=1.0), name="featmatch",
                                 decoder="tiny-mnist-decoder", iterations=0)
    fr = rec.meta["feature_recovery"]
    floor = fr["expected_noise_residual"]
    assert floor is not None and 0.05 < floor < 0.9
    assert 0.9 * floor <= fr["relative_residual"] <= 1.5 * floor
    assert any("expected from the DP noise" in n for n in fr["notes"])
    weak = api.attack_observation(_floor_case("adapter", 2, 1e-9, clip=1.0), name="featmatch",
                                  decoder="tiny-mnist-decoder", iterations=0).meta["feature_recovery"]
    assert weak["expected_noise_residual"] < 1e-4 and weak["relative_residual"] < 1e-3
    # CoOp, batch 1 (gradient norm ~0.2, C = 1 clips nothing): the fit in the rank(J) reduced coordinates
    # stops at the floor instead of iterating towards 1e-8
    coop = api.attack_observation(_floor_case("coop", 1, 3e-3, clip=1.0), name="featmatch",
                                  decoder="tiny-mnist-decoder", iterations=0).meta["feature_recovery"]
    floor = coop["expected_noise_residual"]
    assert floor is not None and 0.05 < floor < 0.9
    assert 0.5 * floor <= coop["relative_residual"] <= 1.5 * floor, (coop["relative_residual"], floor)


def test_adapter_fit_models_the_clipping():
    """A clipped, noise-free DP-SGD update (C below both per-example norms): the adapter model with the
    client's clipping explains it at the true features (relative residual ~1e-6) where the unclipped model
    is off by several times the update's norm, and the attack's fit, which reads C off the defense, goes
    below 1e-3 with the true features."""
    import torch.nn.functional as F

    from clipleak import artifacts
    from clipleak.peft import rebuild_victim
    from clipleak.recover.adapter import AdapterGradientModel, adapter_target
    from clipleak.recover.noise import modelled_clip

    obs, truth = api.make_observation(weights="tiny-mnist", peft=PeftConfig(method="adapter"), seed=1, dp_seed=1,
                                      batch_size=2,
                                      dp={"mechanism": "per-example", "clip": 0.002, "noise_multiplier": 0.0})
    assert modelled_clip(obs) == 0.002
    victim = rebuild_victim(obs, artifacts.resolve_path("tiny-mnist"))
    with torch.no_grad():
        true = F.normalize(victim.raw_image_features(truth.images), dim=-1)
    target = adapter_target(obs)

    def resid(clip):
        return float((AdapterGradientModel(victim, clip).gradient(true, truth.labels) - target).norm() / target.norm())

    assert resid(0.002) < 1e-4 and resid(None) > 0.5
    rec = api.attack_observation(obs, name="featmatch", decoder="tiny-mnist-decoder", iterations=0)
    assert rec.meta["feature_recovery"]["relative_residual"] < 1e-3
    cos = (F.normalize(rec.features.float(), dim=-1) @ true.t()).max(dim=0).values
    assert float(cos.min()) > 0.999
    per_batch, _ = api.make_observation(weights="tiny-mnist", peft=PeftConfig(method="adapter"), seed=1, dp_seed=1,
                                        batch_size=2,
                                        dp={"mechanism": "per-batch", "clip": 0.002, "noise_multiplier": 0.0})
    assert modelled_clip(per_batch) is None


def test_audit_resumes_and_writes_its_chart(tmp_path):
    cfg = AuditConfig(epsilons=[math.inf, 1.0], methods=["adapter"], images=2, canaries=40,
                      finetune={"steps": 6, "batch_size": 25, "clip": 0.01, "lr": 1e-2, "sampling": "poisson"})
    first = run_audit(cfg, tmp_path)
    assert first["computed"] == 2 + 1 + 2 * 2  # accuracy x2, canary x1 (finite epsilon), observations 2 x 2
    rows = {r["epsilon"]: r for r in first["rows"]}
    assert rows["inf"]["reid"] > rows["1"]["reid"]
    assert rows["1"]["noise_multiplier"] > 1 and rows["1"]["accuracy"] is not None
    assert rows["1"]["canary_epsilon_lower_bound"] is not None
    assert "chance" in rows["1"]["verdict"]
    assert rows["1"]["reid_interval"]["n"] == 2 and rows["1"]["psnr_interval"]["n"] == 2
    assert rows["inf"]["draw_seeds"] == [0, 1]
    chart = tmp_path / "audit.png"
    assert chart.is_file() and chart.stat().st_size > 10_000
    assert (tmp_path / "audit.html").is_file() and "| adapter |" in (tmp_path / "audit.md").read_text()
    second = run_audit(cfg, tmp_path)
    assert second["computed"] == 0 and second["rows"] == first["rows"]


def test_audit_coop_options(tmp_path):
    """Class-specific CoOp context, the MIP attack and the text-features DP site reach the audit's cells."""
    from clipleak.audit import AuditContext
    from clipleak.errors import ClipleakError

    base = {"steps": 2, "batch_size": 25, "clip": 0.01, "lr": 1e-2, "sampling": "poisson"}
    both = AuditConfig(epsilons=[3.0], methods=["adapter", "coop"],
                       finetune={**base, "class_specific": True, "dp_site": "text-features"})
    coop, adapter = both.ft("coop", 3.0), both.ft("adapter", 3.0)
    assert coop.peft.class_specific and coop.dp is not None and coop.dp.site == "text-features"
    assert not adapter.peft.class_specific and adapter.dp is not None and adapter.dp.site == "parameters"
    assert both.ft("coop", math.inf).dp is None
    assert both.label("coop") == "coop class-specific, DP at the text-features" and both.label("adapter") == "adapter"
    with pytest.raises(ClipleakError):
        AuditConfig(methods=["coop"], finetune={**base, "dp_site": "nowhere"})

    cfg = AuditConfig(epsilons=[math.inf], methods=["coop"], batch_sizes=[1], attack="mip", images=1, canaries=0,
                      finetune={**base, "class_specific": True})
    ctx = AuditContext(cfg, None)
    assert ctx.victims["coop"].trainable()["prompt.ctx"].shape[0] == 10  # one context per class
    res = run_audit(cfg, tmp_path)
    assert res["computed"] == 2
    row = res["rows"][0]
    assert row["peft"] == "coop class-specific" and row["reid"] is not None and row["accuracy"] is not None
    assert "| coop class-specific |" in (tmp_path / "audit.md").read_text()


def test_audit_cli_passes_the_coop_options(tmp_path, audit_calls):
    """`clipleak audit --class-specific --dp-site text-features --attack mip` reaches AuditConfig; without them
    the settings are the ones audits were written with (so their folders stay resumable)."""
    from typer.testing import CliRunner

    from clipleak.cli import app

    seen = audit_calls
    args = ["audit", "--out", str(tmp_path), "--methods", "coop", "--epsilons", "inf,3"]
    r = CliRunner().invoke(app, [*args, "--class-specific", "--dp-site", "text-features", "--attack", "mip"])
    assert r.exit_code == 0, r.output
    assert seen[-1].attack == "mip" and seen[-1].finetune["class_specific"] is True
    dp = seen[-1].ft("coop", 3.0).dp
    assert dp is not None and dp.site == "text-features"
    assert CliRunner().invoke(app, args).exit_code == 0
    assert set(seen[-1].finetune) == {"steps", "batch_size", "clip", "lr", "sampling"}


def test_canary_bound():
    assert epsilon_lower_bound(200, 100) == 0.0  # coin flipping proves nothing
    lb = epsilon_lower_bound(200, 200)
    assert 2.5 < lb < 5  # all 200 right: p >= 0.985 at 95% confidence, eps >= ln(p / (1 - p))
    scores = [float(i) for i in range(100)]
    res = canary_audit(scores, [i >= 50 for i in range(100)])
    assert res["correct"] == res["guesses"] == 20 and res["epsilon_lower_bound"] > 0
    torch.manual_seed(0)
    noise = canary_audit(torch.randn(1000).tolist(), (torch.rand(1000) < 0.5).tolist())
    assert noise["epsilon_lower_bound"] < 0.5


def _hand_made_cells(cfg, hits):
    """Observation cells of batch 1 where image i of epsilon e is re-identified (rate 1) for i < hits[e],
    missed (rate 0) otherwise; PSNR 10 + i dB; the accuracy cells."""
    from clipleak.audit.cells import key_text

    cells = {}
    for eps, k in hits.items():
        cells[key_text("acc", "adapter", 0, eps, 0)] = {"accuracy": 0.9 if math.isinf(eps) else 0.5}
        for i in range(cfg.images):
            r = 1.0 if i < k else 0.0
            cells[key_text("obs", "adapter", 1, eps, i)] = {
                "draw_seed": cfg.draw_seed + i, "images": 1, "reid": r, "psnr": 10.0 + i, "psnr_images": [10.0 + i],
                "ssim": 0.5, "label_accuracy": 1.0, "prototype_reid": 0.1, "prototype_psnr": 9.0,
                "prototype_true_reid": 0.1, "prototype_true_psnr": 9.0, "chance": 0.1, "noise_multiplier": None,
                "attack_seconds": 0.1}
    return cells


def test_audit_verdict_from_known_counts():
    """8 images per epsilon: 8/8 at inf, 3/8 at 1e5 (Wilson 14-69%: excludes chance 10%), 1/8 at 3 (2-47%:
    reaches it). The finding names 1e5 and 3, the 8 images, that the two intervals overlap, and the 554
    images that a 12.5% rate needs for its interval to exclude 10%."""
    from clipleak.audit import findings, markdown_table, summarise

    cfg = AuditConfig(epsilons=[math.inf, 1e5, 3.0], methods=["adapter"], images=8, canaries=0)
    summary = summarise(cfg, _hand_made_cells(cfg, {math.inf: 8, 1e5: 3, 3.0: 1}))
    rows = {r["epsilon"]: r for r in summary["rows"]}
    three = rows["100000"]["reid_interval"]
    assert three["value"] == 0.375 and three["n"] == 8
    assert three["low"] == pytest.approx(0.1368, abs=1e-4) and three["high"] == pytest.approx(0.6943, abs=1e-4)
    one = rows["3"]["reid_interval"]
    assert one["low"] == pytest.approx(0.0224, abs=1e-4) and one["high"] == pytest.approx(0.4709, abs=1e-4)
    assert rows["inf"]["reid_interval"]["low"] == pytest.approx(0.6756, abs=1e-4)
    assert [rows[e]["at_chance"] for e in ("inf", "100000", "3")] == [False, False, True]
    assert "above chance" in rows["100000"]["verdict"] and "at chance" in rows["3"]["verdict"]
    assert rows["3"]["psnr_interval"]["value"] == 13.5 and rows["3"]["psnr_interval"]["n"] == 8
    (text,) = summary["findings"]
    assert "8 images per epsilon" in text and "chance 10%" in text
    assert "smallest epsilon whose 95% interval excludes chance is 100000 (38% [14-69%] (n=8))" in text
    assert "the largest epsilon whose 95% interval of re-identification reaches chance is 3 (12% [2-47%] (n=8))" in text
    assert "intervals overlap" in text and "554 images per point (now 8)" in text
    assert "50.0% vs 90.0% without DP (-40.0 points)" in text
    md = markdown_table(summary)
    assert "38% [14-69%] (n=8)" in md and "12% [2-47%] (n=8)" in md and "re-id [95%]" in md

    # above chance everywhere; at chance everywhere (more images would not help at a rate below chance)
    assert "above chance at every epsilon" in findings(cfg, summarise(
        cfg, _hand_made_cells(cfg, {math.inf: 8, 1e5: 8, 3.0: 3}))["rows"])[0]
    flat = findings(cfg, summarise(cfg, _hand_made_cells(cfg, {math.inf: 0, 1e5: 0, 3.0: 0}))["rows"])[0]
    assert "at chance at every epsilon" in flat and "would not lift" in flat

    # chance is 1/reid_k: with 4 candidates, 3/8 (14-69%) reaches 25%
    four = AuditConfig(epsilons=[math.inf, 1e5, 3.0], methods=["adapter"], images=8, canaries=0, reid_k=4)
    rows4 = {r["epsilon"]: r for r in summarise(four, _hand_made_cells(four, {math.inf: 8, 1e5: 3, 3.0: 1}))["rows"]}
    assert rows4["100000"]["chance"] == 0.25 and rows4["100000"]["at_chance"]


def test_audit_chart_draws_intervals_and_the_real_chance(tmp_path):
    from clipleak.audit import chart_figure, summarise, write_outputs

    cfg = AuditConfig(epsilons=[math.inf, 1e5, 3.0], methods=["adapter"], images=8, canaries=0, reid_k=5)
    summary = summarise(cfg, _hand_made_cells(cfg, {math.inf: 8, 1e5: 3, 3.0: 1}))
    fig = chart_figure(summary)
    reid_ax, psnr_ax = fig.axes[:2]  # the twin accuracy axes come after the two panels
    (chance,) = [ln for ln in reid_ax.get_lines() if ln.get_gid() == "chance"]
    assert list(chance.get_ydata()) == [0.2, 0.2] and chance.get_label() == "chance (1/5)"
    bars = [c for c in reid_ax.collections if c.get_gid() == "interval-reid"]
    spans = sorted((float(seg[:, 1].min()), float(seg[:, 1].max())) for c in bars for seg in c.get_segments())
    expected = sorted((r["reid_interval"]["low"], r["reid_interval"]["high"]) for r in summary["rows"])
    assert len(spans) == len(expected)
    assert [v for span in spans for v in span] == pytest.approx([v for span in expected for v in span])
    assert [c for c in psnr_ax.collections if c.get_gid() == "interval-psnr"]
    assert "K = 5" in reid_ax.get_ylabel()
    files = write_outputs(tmp_path, summary)
    page = (tmp_path / "audit.html").read_text()
    assert "38% [14-69%] (n=8)" in page and "Private digits drawn with seeds 0..7" in page
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["rows"][1]["reid_interval"]["low"] == pytest.approx(0.1368, abs=1e-4)
    assert files["chart"].endswith("audit.png")


def test_audit_draw_seed_picks_other_digits(tmp_path, capsys):
    """`clipleak audit --draw-seed 1000` attacks other private digits than the default, says so in its cells
    and summary, and a folder of one draw seed refuses another (one line, exit 2)."""
    from typer.testing import CliRunner

    from clipleak.cli import app, main

    args = ["audit", "--methods", "adapter", "--epsilons", "inf", "--images", "2", "--canaries", "0",
            "--steps", "2"]
    runner = CliRunner()
    drawn = {}
    for seed in (0, 1000):
        out = tmp_path / f"draw{seed}"
        extra = [] if seed == 0 else ["--draw-seed", str(seed)]
        r = runner.invoke(app, [*args, "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        cells = json.loads((out / "cells.json").read_text())
        assert cells["config"]["draw_seed"] == seed
        obs = [cells["cells"][f"obs|adapter|b1|epsinf|{i}"] for i in range(2)]
        assert [o["draw_seed"] for o in obs] == [seed, seed + 1]
        drawn[seed] = [o["private_indices"] for o in obs]
        assert json.loads((out / "audit.json").read_text())["draw_seeds"] == [seed, seed + 1]
    assert drawn[0] != drawn[1000]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "draw1000")]) == 2
    err = capsys.readouterr().err
    assert "draw seed 1000, not 0" in err and len(err.strip().splitlines()) == 1


def test_audit_folder_from_before_draw_seeds_resumes(tmp_path):
    """A cells.json written before the draw seed was a setting (it drew seeds 0..images-1) still resumes."""
    cfg = AuditConfig(epsilons=[math.inf], methods=["adapter"], images=1, canaries=0)
    old = cfg.to_dict()
    old.pop("draw_seed")
    cells = _hand_made_cells(cfg, {math.inf: 1})
    (tmp_path / "cells.json").write_text(json.dumps({"config": old, "cells": cells}))
    res = run_audit(cfg, tmp_path)
    assert res["computed"] == 0 and res["rows"][0]["reid"] == 1.0
    with pytest.raises(Exception, match="draw seed 0, not 3"):
        run_audit(AuditConfig(epsilons=[math.inf], methods=["adapter"], images=1, canaries=0, draw_seed=3), tmp_path)


def _mnist_as_folder(root):
    """Every MNIST digit the ``mnist`` source holds, as a PNG in ``root/<k>_<name>/<index>.png``: folders in
    label order (class names given with ``classnames``), files in the source's order."""
    import numpy as np
    from PIL import Image

    from clipleak.data import DIGIT_NAMES
    from clipleak.data.sources import mnist_raw

    x, y = mnist_raw()
    for k, name in enumerate(DIGIT_NAMES):
        (root / f"{k}_{name}").mkdir(parents=True)
    for i, (row, label) in enumerate(zip(x, y, strict=True)):
        pixels = np.asarray(row, dtype=np.float64).reshape(28, 28).astype(np.uint8)
        Image.fromarray(pixels, "L").save(root / f"{label}_{DIGIT_NAMES[label]}" / f"{i:04d}.png")
    return list(DIGIT_NAMES)


def _untimed(rows):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_audit_folder_of_the_same_digits_gives_the_same_table(tmp_path):
    """`--data folder:` holding the mnist source's digits (byte-identical PNGs, labels in the same order, the
    same class names) is the same data set: same split, same private draws, the shipped decoder under
    `--decoder auto`, the same table as `--data mnist` on tiny-mnist. The folder and its split are recorded;
    a resume with another split is refused."""
    from clipleak.audit import markdown_table
    from clipleak.errors import ClipleakError

    names = _mnist_as_folder(tmp_path / "digits")
    base = {"epsilons": [math.inf], "methods": ["adapter"], "images": 2, "canaries": 0,
            "finetune": {"steps": 2, "batch_size": 25, "clip": 0.01, "lr": 1e-2, "sampling": "poisson"}}
    ref = run_audit(AuditConfig(**base), tmp_path / "mnist")
    folder = AuditConfig(**base, data=f"folder:{tmp_path / 'digits'}", classnames=names, decoder="auto")
    mine = run_audit(folder, tmp_path / "folder")
    assert mine["computed"] == ref["computed"] == 3
    assert _untimed(mine["rows"]) == _untimed(ref["rows"])
    assert markdown_table(mine) == markdown_table(ref)
    assert mine["rows"][0]["reid"] is not None and mine["verdict"] == ref["verdict"]
    # the page names the user's images as images, the mnist source's as digits
    assert "Private images drawn" in (tmp_path / "folder" / "audit.md").read_text()
    assert "Private digits drawn" in (tmp_path / "mnist" / "audit.md").read_text()
    saved = json.loads((tmp_path / "folder" / "cells.json").read_text())
    assert saved["config"]["data"] == f"folder:{tmp_path / 'digits'}" and saved["config"]["split_seed"] == 0
    assert saved["split"]["same_images_as"] == "mnist" and saved["split"]["private"] == 500
    assert [saved["cells"][f"obs|adapter|b1|epsinf|{i}"]["private_indices"] for i in range(2)] == \
        [c["private_indices"] for c in (json.loads((tmp_path / "mnist" / "cells.json").read_text())["cells"][
            f"obs|adapter|b1|epsinf|{i}"] for i in range(2))]
    with pytest.raises(ClipleakError, match="split seed 0, not .* split seed 1"):
        run_audit(AuditConfig(**base, data=folder.data, classnames=names, decoder="auto", split_seed=1),
                  tmp_path / "folder")
    # a folder whose images changed since its cells were computed: refused before any cell
    saved["split"]["private"] = 499
    del saved["cells"]["obs|adapter|b1|epsinf|1"]
    (tmp_path / "folder" / "cells.json").write_text(json.dumps(saved))
    with pytest.raises(ClipleakError, match="another split"):
        run_audit(folder, tmp_path / "folder")


def test_audit_checks_its_inputs_before_any_work(tmp_path, refusal):
    """Bad weights, data with one class, class names that do not fit, a decoder for another architecture: one
    line each, exit 2, and no cell computed."""
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    (tmp_path / "one" / "only" / "a.png").write_bytes(b"")
    args = ["audit", "--methods", "adapter", "--epsilons", "inf", "--images", "1", "--canaries", "0", "--steps", "1"]
    cases = [
        (["--weights", str(tmp_path / "missing.pt")], "missing.pt"),
        (["--data", f"folder:{tmp_path / 'one'}"], "class"),
        (["--classnames", "a,b"], "2 class names given"),
        (["--decoder", "tiny-mnist-64-decoder"], "not a decoder for tiny-32"),
        (["--prompt-template", "no slot"], "{}"),
    ]
    for n, (extra, words) in enumerate(cases):
        out = tmp_path / f"out{n}"
        assert words in refusal([*args, *extra, "--out", str(out)]), extra
        assert not (out / "cells.json").is_file()


def test_audit_verdict_in_words():
    """The verdict names a leak and the epsilon from which re-identification is at chance with the accuracy it
    costs; no leakage beyond the class prototype when no point beats it."""
    cfg = AuditConfig(epsilons=[math.inf, 1e5, 3.0], methods=["adapter"], images=8, canaries=0)
    (text,) = summarise(cfg, _hand_made_cells(cfg, {math.inf: 8, 1e5: 3, 3.0: 1}))["verdict"]
    assert "leaks" in text and "from epsilon 3 down" in text and "costs 40.0 points" in text
    (flat,) = summarise(cfg, _hand_made_cells(cfg, {math.inf: 0, 1e5: 0, 3.0: 0}))["verdict"]
    assert "no leakage beyond the class prototype" in flat
    (always,) = summarise(cfg, _hand_made_cells(cfg, {math.inf: 8, 1e5: 8, 3.0: 8}))["verdict"]
    assert "leaks at every epsilon measured, down to epsilon 3" in always


@pytest.mark.slow
def test_one_command_audit_on_a_folder_with_a_local_vit_b_32(tmp_path, image_folder):
    """`clipleak audit --arch ViT-B-32 --weights FILE --data folder:PATH --device cpu` end to end: a random-init
    ViT-B-32 saved by open_clip as a state dict, 3 classes of 30 small images, the decoder trained from the
    folder's public split within a few seconds and cached (a rerun reuses it), one observation per point."""
    import open_clip
    from typer.testing import CliRunner

    from clipleak.cli import app

    weights = tmp_path / "vitb32.pt"
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
    image_folder(tmp_path / "imgs")
    args = ["audit", "--arch", "ViT-B-32", "--weights", str(weights), "--data", f"folder:{tmp_path / 'imgs'}",
            "--methods", "adapter", "--epsilons", "inf,1", "--images", "1", "--canaries", "0", "--steps", "2",
            "--batch-size", "4", "--reid-k", "3", "--decoder-seconds", "3", "--device", "cpu", "--threads", "1"]
    env = {"CLIPLEAK_CACHE": str(tmp_path / "cache")}
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")], env=env)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert [row["epsilon"] for row in summary["rows"]] == ["inf", "1"]
    assert all(row["reid"] is not None and row["accuracy"] is not None for row in summary["rows"])
    assert summary["verdict"] and "adapter, batch 1" in summary["verdict"][0]
    cells = json.loads((tmp_path / "a" / "cells.json").read_text())
    assert cells["split"]["classnames"] == ["blue dot", "green bar", "red square"]
    decoders = list((tmp_path / "cache" / "audit-decoders").glob("*.safetensors"))
    assert len(decoders) == 1
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")], env=env)
    assert r.exit_code == 0, r.output
    assert "training one" not in r.output and list((tmp_path / "cache" / "audit-decoders").glob("*.safetensors")) \
        == decoders
    assert json.loads((tmp_path / "b" / "audit.json").read_text())["rows"][0]["reid"] is not None


def test_audit_on_two_ray_workers_gives_the_serial_table_and_resumes(tmp_path):
    """`--workers 2` (a local Ray): the same table as a serial run; a folder with cells missing resumes on the
    workers and computes only those."""
    import shutil

    cfg = AuditConfig(epsilons=[math.inf, 1.0], methods=["adapter"], images=2, canaries=0,
                      finetune={"steps": 2, "batch_size": 25, "clip": 0.01, "lr": 1e-2, "sampling": "poisson"})
    serial = run_audit(cfg, tmp_path / "serial", threads=1)
    shutil.copytree(tmp_path / "serial", tmp_path / "resumed")
    on_ray = run_audit(cfg, tmp_path / "ray", threads=1, workers=2)
    assert on_ray["computed"] == serial["computed"] == 6
    assert _untimed(on_ray["rows"]) == _untimed(serial["rows"])
    cells = json.loads((tmp_path / "resumed" / "cells.json").read_text())
    for key in ("obs|adapter|b1|eps1|1", "acc|adapter|eps1"):
        del cells["cells"][key]
    (tmp_path / "resumed" / "cells.json").write_text(json.dumps(cells))
    resumed = run_audit(cfg, tmp_path / "resumed", threads=1, workers=2)
    assert resumed["computed"] == 2 and _untimed(resumed["rows"]) == _untimed(serial["rows"])


def test_audit_decoder_killed_while_training_continues_from_its_checkpoint(tmp_path, short_run, monkeypatch):
    """An audit killed while its automatic decoder trains: the rerun continues that training (the target's
    features of the public images are not computed again, the schedule goes on from the checkpoint)."""
    import clipleak.training.priors as tp
    from clipleak.audit.decoder import auto_decoder, decoder_path
    from clipleak.models import build_model

    monkeypatch.setenv("CLIPLEAK_CACHE", str(tmp_path / "cache"))
    import functools

    import clipleak.audit.decoder as ad

    monkeypatch.setattr(ad, "PriorCheckpoints", functools.partial(tp.PriorCheckpoints, every=3))
    clip = build_model("tiny-32", short_run[0])
    spec = DataSpec()
    public = load_public(spec, 32)

    def kill(event):
        if event.phase == "run" and event.step >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        auto_decoder(clip, str(short_run[0]), spec, public, seconds=600.0, progress=kill)
    path = decoder_path(clip, public, 600.0)
    ckpt = path.with_name(path.stem + ".ckpt")
    assert (ckpt / "features.safetensors").is_file() and (ckpt / "latest").is_file() and not path.exists()

    def no_features(*a, **k):
        raise AssertionError("the resumed decoder training recomputed the target's features")

    monkeypatch.setattr(tp, "image_features", no_features)
    monkeypatch.setattr(tp, "prior_quality", lambda *a, **k: {})  # the quality check runs the target: not here
    seen: list[int] = []

    def stop_soon(event):  # the rest of the 600 s schedule is not needed: a second kill after a few more steps
        if event.phase == "run":
            seen.append(event.step)
            if event.step >= 8:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        auto_decoder(clip, str(short_run[0]), spec, public, seconds=600.0, progress=stop_soon)
    assert seen[0] == 4  # continued after the checkpoint of step 3
