"""Update defenses without noise (pruning, quantisation, sign, clipping): each does what it states, the
observation records it, and share, train, the Flower client and the audit apply it (each test here fails
if the defense were skipped)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clipleak.client import share
from clipleak.errors import ClipleakError
from clipleak.fl.local import local_update
from clipleak.peft import PeftConfig, build_victim
from clipleak.privacy import Defense, DpSetting, apply_defense, parse_defense_sweep, prune_mask
from clipleak.records import Observation


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 25, generator=g), "b": torch.randn(25, generator=g) * 3.0,
            "ctx": torch.randn(4, 16, generator=g) * 0.01}


def _batch(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _nonzero(update: dict[str, torch.Tensor]) -> int:
    return int(sum(int((v != 0).sum()) for v in update.values()))


def _size(update: dict[str, torch.Tensor]) -> int:
    return int(sum(v.numel() for v in update.values()))


@pytest.fixture(scope="module", params=["coop", "adapter"])
def victim(request, tiny, digits):
    return build_victim(tiny, digits, PeftConfig(method=request.param))


# -- the defenses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.0, 0.1, 0.01, 0.001])
def test_pruning_keeps_the_stated_fraction_of_largest_entries(fraction):
    u = _update()
    d = _size(u)
    out = apply_defense(u, Defense("prune", fraction))
    k = math.ceil(fraction * d)
    assert _nonzero(out) == k
    kept = torch.cat([out[n].abs().flatten() for n in sorted(out)])
    dropped = torch.cat([u[n].abs().flatten()[out[n].flatten() == 0] for n in sorted(u)])
    if dropped.numel():
        assert float(kept[kept > 0].min()) >= float(dropped.max())  # the largest magnitudes over the whole update
    for n in u:  # kept entries are unchanged, the rest are zero
        assert torch.equal(out[n][out[n] != 0], u[n][out[n] != 0])


def test_pruning_breaks_ties_by_position():
    u = {"a": torch.ones(10), "b": torch.ones(5)}
    mask = prune_mask(u, 0.2)  # 3 of 15 equal magnitudes: the first three in name order
    assert mask["a"].tolist() == [True, True, True] + [False] * 7 and not bool(mask["b"].any())
    assert prune_mask(dict(reversed(list(u.items()))), 0.2)["a"].tolist() == mask["a"].tolist()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantisation_has_the_stated_levels_per_tensor(bits):
    u = _update()
    out = apply_defense(u, Defense.parse(f"quantize:{bits}"))
    for n, v in out.items():
        values = torch.unique(v)
        if bits == 1:  # sign: two values, +- the mean magnitude
            m = float(u[n].abs().mean())
            assert values.numel() == 2
            assert torch.allclose(values.abs(), torch.full((2,), m), rtol=1e-6)
            assert torch.equal(torch.sign(v), torch.sign(u[n]))
            continue
        levels = 2 ** bits
        assert values.numel() <= levels
        m = float(u[n].abs().max())
        step = 2 * m / (levels - 1)
        assert float((v - u[n]).abs().max()) <= step / 2 * (1 + 1e-5)  # nearest level
        grid = torch.round((values + m) / step)
        assert torch.allclose(values, grid * step - m, atol=1e-6 * m)  # on the evenly spaced grid over [-m, m]
    if bits > 1:  # evenly spread entries fill exactly 2^bits levels
        spread = apply_defense({"t": torch.linspace(-2.0, 2.0, 4000)}, Defense("quantize", bits))["t"]
        assert torch.unique(spread).numel() == 2 ** bits


def test_sign_has_two_magnitudes_and_keeps_the_l1_norm():
    u = _update()
    out = apply_defense(u, Defense.parse("quantize:sign"))
    assert Defense.parse("quantize:1") == Defense.parse("quantize:sign")
    for n, v in out.items():
        assert set(torch.unique(v).tolist()) == {-float(u[n].abs().mean()), float(u[n].abs().mean())}
        assert torch.isclose(v.abs().sum(), u[n].abs().sum(), rtol=1e-5)


@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
def test_clipping_without_noise_has_the_stated_norm(c):
    u = _update()
    norm = float(torch.linalg.vector_norm(torch.cat([v.flatten() for v in u.values()])))
    assert norm > 10.0
    out = apply_defense(u, Defense("clip", c))
    got = float(torch.linalg.vector_norm(torch.cat([v.flatten() for v in out.values()])))
    assert got == pytest.approx(c, rel=1e-5)
    for n in u:  # same direction: one factor for every tensor
        assert torch.allclose(out[n], u[n] * (got / norm), rtol=1e-5, atol=1e-9)
    small = apply_defense(u, Defense("clip", 10 * norm))
    assert all(torch.equal(small[n], u[n]) for n in u)


def test_no_defense_levels_leave_the_update_as_it_is():
    u = _update()
    for text in ("prune:1", "quantize:32", "clip:inf"):
        d = Defense.parse(text)
        assert d.is_identity and all(torch.equal(apply_defense(u, d)[n], u[n]) for n in u)
    assert not Defense.parse("prune:0.5").is_identity


def test_parse_and_refuse():
    assert Defense.parse("prune:0.1") == Defense("prune", 0.1) and Defense("prune", 0.1).spec == "prune:0.1"
    assert Defense.parse("quantize:8") == Defense("quantize", 8) and Defense.parse("clip:1.0").spec == "clip:1"
    for d in (Defense.parse("quantize:4"), Defense.parse("quantize:sign"), Defense.parse("clip:0.5")):
        assert Defense.parse(d.spec) == d and Defense.from_record(d.record()) == d
    for bad in ("prune:0", "prune:2", "quantize:0", "quantize:20", "quantize:x", "clip:-1", "clip:0", "scramble:1",
                "prune"):
        with pytest.raises(ClipleakError):
            Defense.parse(bad)
    assert parse_defense_sweep("prune:1,0.1,0.01") == ("prune", [1.0, 0.1, 0.01])
    assert parse_defense_sweep("quantize:32,8,sign") == ("quantize", [32.0, 8.0, 1.0])
    with pytest.raises(ClipleakError):
        parse_defense_sweep("prune:1,3")


# -- applied and recorded where the client shares --------------------------------------------------------


def test_share_applies_and_records_the_defense(victim, tmp_path):
    x, y = _batch()
    plain = share(victim, x, y)
    obs = share(victim, x, y, defense=Defense("prune", 0.01))
    assert _nonzero(obs.gradients) == math.ceil(0.01 * _size(plain.gradients)) < _nonzero(plain.gradients)
    assert obs.meta["defense"]["kind"] == "prune" and obs.meta["defense"]["parameter"] == 0.01
    assert obs.defense is not None and plain.defense is None and "defense" not in plain.meta
    back = Observation.load(obs.save(tmp_path / "obs"))
    assert Defense.from_record(back.defense) == Defense("prune", 0.01)
    # with DP too: the DP fields and the defense in one record, the defense applied after the noise
    dp = DpSetting("per-example", clip=1.0, noise_multiplier=1.0)
    both = share(victim, x, y, dp=dp, dp_seed=3, defense=Defense.parse("quantize:sign"))
    noisy = share(victim, x, y, dp=dp, dp_seed=3)
    assert both.meta["defense"]["mechanism"] == "per-example" and both.meta["defense"]["kind"] == "quantize"
    for n, v in both.gradients.items():
        assert torch.equal(v, torch.sign(noisy.gradients[n]) * noisy.gradients[n].abs().mean())


def test_the_schema_refuses_a_bad_defense_record(victim, tmp_path):
    x, y = _batch()
    p = share(victim, x, y, defense=Defense("clip", 0.5)).save(tmp_path / "obs")
    js = p.with_suffix(".json")
    meta = json.loads(js.read_text())
    meta["defense"]["kind"] = "scramble"
    js.write_text(json.dumps(meta))
    with pytest.raises(ClipleakError, match="defense.kind"):
        Observation.load(p)


def test_the_flower_client_defends_its_round_update(victim):
    x, y = _batch(4)
    start = {n: p.detach().clone() for n, p in victim.trainable().items()}
    res = local_update(victim, x, y, local_steps=2, batch_size=2, lr=0.1, seed=0, defense=Defense("prune", 0.05))
    update = {n: res.state[n] - start[n] for n in start}
    assert 0 < _nonzero(update) <= math.ceil(0.05 * _size(update))
    victim.load_peft_state(start)
    res = local_update(victim, x, y, local_steps=2, batch_size=2, lr=0.1, seed=0, defense=Defense("clip", 1e-4))
    norm = torch.linalg.vector_norm(torch.cat([(res.state[n] - start[n]).flatten() for n in start]))
    assert float(norm) == pytest.approx(1e-4, rel=1e-3)
    victim.load_peft_state(start)


def test_training_defends_every_step(tiny, digits):
    from clipleak.training.finetune import FinetuneConfig, FinetuneRun, encode

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(30, 3, 32, 32, generator=g), torch.randint(0, 10, (30,), generator=g)
    for method in ("adapter", "coop"):
        cfg = FinetuneConfig(peft=PeftConfig(method=method), steps=3, batch_size=10, sampling="fixed",
                             optimizer="sgd", lr=0.1, defense="prune:0.01")
        victim = build_victim(tiny, digits, cfg.peft)
        run = FinetuneRun(cfg, victim, encode(victim, images), labels, None)
        before = {n: p.detach().clone() for n, p in run.params.items()}
        run.step(0, None)  # SGD's first step moves exactly the entries of the shared (pruned) gradient
        moved = sum(int((run.params[n].detach() != before[n]).sum()) for n in before)
        d = sum(p.numel() for p in before.values())
        assert 0 < moved <= math.ceil(0.01 * d)
    with pytest.raises(ClipleakError):
        FinetuneConfig(defense="prune:7")


# -- the audit's defense axis ----------------------------------------------------------------------------


def test_audit_sweeps_a_defense(tmp_path, monkeypatch):
    from clipleak.audit import AuditConfig, run_audit
    from clipleak.audit import sweep as sweep_mod

    seen: dict[str, list[int]] = {}
    real = sweep_mod.share

    def spy(*a, **k):
        obs = real(*a, **k)
        spec = k["defense"].spec if k.get("defense") is not None else "none"
        seen.setdefault(spec, []).extend([_nonzero(obs.gradients), _size(obs.gradients)])
        return obs

    monkeypatch.setattr(sweep_mod, "share", spy)
    cfg = AuditConfig(defense="prune:1,0.01", methods=["adapter"], images=1, canaries=0,
                      finetune={"steps": 4, "batch_size": 25, "clip": 0.01, "lr": 1e-2, "sampling": "poisson"})
    assert cfg.points == [1.0, 0.01] and cfg.epsilons == [math.inf]
    res = run_audit(cfg, tmp_path)
    assert res["computed"] == 2 + 2  # accuracy and one observation per level, no canaries
    nonzero, size = seen["prune:0.01"]
    assert nonzero == math.ceil(0.01 * size) < seen["none"][0]
    cells = json.loads((tmp_path / "cells.json").read_text())["cells"]
    assert cells["obs|adapter|b1|prune0.01|0"]["defense"] == "prune:0.01"
    assert cells["obs|adapter|b1|prune1|0"]["defense"] is None
    ft = json.loads((tmp_path / "runs" / "acc-adapter-prune0.01" / "finetune.json").read_text())
    assert ft["defense"]["spec"] == "prune:0.01" and ft["privacy"] is None
    rows = {r["epsilon"]: r for r in res["rows"]}
    assert rows["1"]["no_defense"] and rows["0.01"]["defense"] == "prune:0.01" and rows["0.01"]["axis"] == "prune"
    assert rows["0.01"]["accuracy"] is not None and rows["0.01"]["reid_interval"]["n"] == 1
    md = (tmp_path / "audit.md").read_text()
    assert "prune (fraction kept)" in md and "sigma" not in md.split("\n\n")[2]
    assert (tmp_path / "audit.png").stat().st_size > 10_000
    assert run_audit(cfg, tmp_path)["computed"] == 0  # resumable
    with pytest.raises(ClipleakError, match="--defense"):
        AuditConfig(defense="prune:1,0.1", epsilons=[math.inf, 3.0])
    with pytest.raises(ClipleakError):
        AuditConfig(defense="prune:1,0")


def test_the_cli_passes_the_defense(tmp_path, monkeypatch, audit_calls):
    """`clipleak audit --defense ...` reaches AuditConfig (epsilons left out: no DP; with other epsilons:
    refused); `clipleak share --defense` writes a defended observation; `clipleak train --defense` reaches the
    fine-tuning config."""
    from typer.testing import CliRunner

    from clipleak import api
    from clipleak.cli import app

    seen = audit_calls
    r = CliRunner().invoke(app, ["audit", "--out", str(tmp_path / "a"), "--defense", "quantize:32,8,sign"])
    assert r.exit_code == 0, r.output
    assert seen[-1].defense == "quantize:32,8,sign" and seen[-1].epsilons == [math.inf]
    assert seen[-1].points == [32.0, 8.0, 1.0] and seen[-1].ft("adapter", 1.0).defense == "quantize:sign"
    r = CliRunner().invoke(app, ["audit", "--out", str(tmp_path / "a"), "--defense", "prune:1,0.1", "--epsilons",
                                 "inf,3"])
    assert isinstance(r.exception, ClipleakError) and "--defense" in str(r.exception)

    trained = []

    def fake_train(cfg, out, **kw):
        trained.append(cfg)
        raise ClipleakError("stopped before training")

    monkeypatch.setattr(api, "finetune_client", fake_train)
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "t"), "--defense", "clip:0.5"])
    assert "stopped before training" in str(r.exception) and trained[-1].defense == "clip:0.5"

    out = tmp_path / "obs"
    r = CliRunner().invoke(app, ["share", "--out", str(out), "--weights", "tiny-mnist", "--method", "adapter",
                                 "--batch-size", "2", "--defense", "prune:0.05"])
    assert r.exit_code == 0, r.output
    obs = Observation.load(out.with_suffix(".safetensors"))
    assert obs.meta["defense"]["spec"] == "prune:0.05"
    assert _nonzero(obs.gradients) == math.ceil(0.05 * _size(obs.gradients))
