"""Attack mechanics on the tiny model (random init: the optimiser, not leakage, is under test)."""

from __future__ import annotations

import pytest
import torch

from clipleak.attacks import IGConfig, gradient_matching_term, run_attack
from clipleak.client import share
from clipleak.engine import EngineConfig, PixelImages, State, Term, optimise
from clipleak.errors import ClipleakError
from clipleak.peft import PeftConfig, build_victim


def _obs(tiny, digits, method, n=1, labels=True, seed=0):
    v = build_victim(tiny, digits, PeftConfig(method=method))
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    y = (torch.arange(n) * 3 + 2) % 10
    return v, x, y, share(v, x, y, include_labels=labels)


def test_gradient_term_is_zero_at_the_truth(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, "coop", n=2)
    term = gradient_matching_term(v, obs)
    at_truth = float(term.fn(State(images=x, labels=y, iteration=0, iterations=1)).detach())
    noise = torch.rand_like(x)
    elsewhere = float(term.fn(State(images=noise, labels=y, iteration=0, iterations=1)).detach())
    assert at_truth < 1e-5 < elsewhere


@pytest.mark.parametrize("method", ["coop", "full-visual"])
def test_ig_drives_the_gradient_loss_down(tiny, digits, method):
    v, x, y, obs = _obs(tiny, digits, method)
    rec = run_attack("ig", obs, v, IGConfig(iterations=80, restarts=1, seed=0))
    g = rec.history["gradient"]
    assert len(g) == 80
    assert g[-1] < g[0] / 5, (g[0], g[-1])  # measured: ~50x (coop), ~15x (full-visual)
    assert rec.images.shape == x.shape
    assert rec.images.min() >= 0 and rec.images.max() <= 1
    assert torch.equal(rec.labels, y) and rec.label_source == "observation"


def test_label_inference_when_labels_are_not_shared(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, "adapter", labels=False, seed=1)
    rec = run_attack("ig", obs, v, IGConfig(iterations=60, restarts=1))
    assert rec.label_source.startswith("inferred")
    assert torch.equal(rec.labels, y)


def test_known_labels_required_when_asked(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, "coop", labels=False)
    with pytest.raises(ClipleakError, match="does not include labels"):
        run_attack("ig", obs, v, IGConfig(iterations=1, restarts=1, labels="known"))


def test_grayscale_parametrisation_has_identical_channels(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, "coop")
    rec = run_attack("ig", obs, v, IGConfig(iterations=5, restarts=1, grayscale=True))
    assert torch.equal(rec.images[:, 0], rec.images[:, 1]) and torch.equal(rec.images[:, 1], rec.images[:, 2])


def test_engine_keeps_best_restart_and_resumes(tmp_path):
    target = torch.full((1, 3, 8, 8), 0.3)

    def fn(s: State) -> torch.Tensor:
        return (s.images - target).pow(2).mean()

    cfg = EngineConfig(iterations=30, restarts=3, lr=0.05, signed=False, decay="none", seed=4)
    kw = dict(batch=1, num_classes=2, known_labels=torch.tensor([0]))
    full = optimise(PixelImages(8, init="rand"), [Term("mse", fn)], cfg, **kw)
    assert full.restart_losses[full.best_restart] == min(full.restart_losses)
    assert len(full.restart_losses) == 3
    # interrupted after one restart, then resumed: same result
    ck = tmp_path / "ck"
    optimise(PixelImages(8, init="rand"), [Term("mse", fn)],
             EngineConfig(**{**cfg.__dict__, "restarts": 1}), checkpoint=ck, **kw)
    resumed = optimise(PixelImages(8, init="rand"), [Term("mse", fn)], cfg, checkpoint=ck, **kw)
    assert resumed.restart_losses == pytest.approx(full.restart_losses)
    assert torch.equal(resumed.images, full.images)
    # one folder per save, the newest named by `latest`; no temporary file left behind
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-0000003"]
    assert sorted(p.name for p in (ck / "step-0000003").iterdir()) == ["restarts.safetensors", "state.json"]


def test_engine_damaged_checkpoint_is_one_line(tmp_path):
    cfg = EngineConfig(iterations=3, restarts=1, lr=0.05, signed=False, decay="none")
    kw = dict(batch=1, num_classes=2, known_labels=torch.tensor([0]))
    terms = [Term("mse", lambda s: s.images.pow(2).mean())]
    ck = tmp_path / "ck"
    optimise(PixelImages(8), terms, cfg, checkpoint=ck, **kw)
    state = ck / "step-0000001" / "state.json"
    state.write_text(state.read_text()[:25])  # truncated, as a kill during an in-place write would leave it
    with pytest.raises(ClipleakError, match=r"step-0000001 is damaged .*state\.json.*--no-resume") as e:
        optimise(PixelImages(8), terms, cfg, checkpoint=ck, **kw)
    assert "\n" not in str(e.value)


def test_unknown_attack(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, "coop")
    with pytest.raises(ClipleakError, match="unknown attack"):
        run_attack("nope", obs, v)


def test_registry_is_complete_on_import_and_refuses_a_second_registration():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import clipleak.attacks as a; print(sorted(a.ATTACKS))"],
                         capture_output=True, text=True, check=True)
    for name in ("ig", "featmatch", "mip", "dlg", "idlg", "gradvit", "closed-form", "projection"):
        assert f"'{name}'" in out.stdout, out.stdout
    from clipleak.attacks import IGConfig, register

    with pytest.raises(ClipleakError, match="registered twice"):
        register("ig", IGConfig, "a second ig")(lambda *a: None)
