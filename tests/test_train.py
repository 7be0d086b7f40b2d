"""DP fine-tuning (`clipleak train`): DP-SGD with no noise and no clipping is plain training, epsilon spent is
the accountant's, resuming is exact, Dp-CLIP contrastive fine-tuning records its privacy, the CLI has help."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clipleak.data import DataSpec, ImageSet, load_validation
from clipleak.errors import ClipleakError
from clipleak.peft import PeftConfig
from clipleak.privacy import DpSetting, epsilon
from clipleak.training import (
    ContrastiveConfig,
    FinetuneConfig,
    contrastive_dp,
    contrastive_finetune,
    finetune,
    finetune_dp,
)


@pytest.fixture(scope="module")
def sets() -> tuple[ImageSet, ImageSet]:
    """Small train / held-out sets cut from the validation split (mechanics only; random-init target)."""
    v = load_validation(DataSpec.parse("mnist"), 32)
    cut = lambda a, b: ImageSet(v.images[a:b], v.labels[a:b], v.classnames, v.grayscale, v.source)  # noqa: E731
    return cut(0, 60), cut(60, 100)


def _peft(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "peft.safetensors"))


@pytest.mark.parametrize("method,sampling", [("adapter", "poisson"), ("adapter", "fixed"), ("coop", "fixed")])
def test_dp_without_noise_or_clipping_is_plain_training(tmp_path, sets, method, sampling):
    train, held = sets
    base = dict(peft=PeftConfig(method=method), steps=4, batch_size=8, sampling=sampling, lr=1e-2,
                checkpoint_every=100)
    plain = finetune(FinetuneConfig(**base), train, held, tmp_path / "plain")
    dp = finetune(FinetuneConfig(**base, dp=finetune_dp("per-example", clip=1e9, noise_multiplier=0.0)), train, held,
                  tmp_path / "dp")
    a, b = _peft(tmp_path / "plain"), _peft(tmp_path / "dp")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert plain["privacy"] is None and dp["privacy"]["epsilon_spent"] is None  # sigma 0: no epsilon
    # and the training moved the parameters at all
    init = finetune(FinetuneConfig(**{**base, "steps": 1, "lr": 1e-12}), train, held, tmp_path / "init")
    assert init["completed"]
    assert any(not torch.allclose(a[k], _peft(tmp_path / "init")[k]) for k in a)


def test_epsilon_spent_matches_the_accountant(tmp_path, sets):
    train, held = sets
    cfg = FinetuneConfig(peft=PeftConfig(method="adapter"), steps=10, batch_size=6,
                         dp=finetune_dp("per-example", clip=0.1, noise_multiplier=1.3, delta=1e-5), eval_points=2)
    res = finetune(cfg, train, held, tmp_path / "ft")
    pv = res["privacy"]
    q = 6 / 60
    assert res["schedule"]["sample_rate"] == pytest.approx(q)
    assert pv["epsilon_spent"] == pytest.approx(epsilon(pv["noise_multiplier"], q, 10, 1e-5))
    assert pv["epsilon_spent"] == pytest.approx(pv["epsilon"])  # the whole schedule was run
    mid = res["eval_curve"][0]
    assert mid["step"] == 5 and mid["epsilon"] == pytest.approx(epsilon(pv["noise_multiplier"], q, 5, 1e-5))
    saved = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert saved["privacy"]["epsilon_spent"] == pv["epsilon_spent"] and "Poisson" in saved["schedule"]["sampling_note"]


def test_resume_is_exact(tmp_path, sets):
    train, held = sets
    cfg = FinetuneConfig(peft=PeftConfig(method="adapter"), steps=8, batch_size=6,
                         dp=finetune_dp("per-example", clip=0.1, noise_multiplier=1.0), checkpoint_every=3, canaries=20)
    full = finetune(cfg, train, held, tmp_path / "full")
    part = finetune(cfg, train, held, tmp_path / "res", stop_after=5)
    assert part == {"completed": False, "stopped_after": 5}
    done = finetune(cfg, train, held, tmp_path / "res", resume=True)
    assert done["resumed_from_step"] == 3
    a, b = _peft(tmp_path / "full"), _peft(tmp_path / "res")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert done["canaries"]["scores"] == full["canaries"]["scores"]
    assert not (tmp_path / "res" / "ckpt").exists()  # removed once the run is done


def test_damaged_checkpoint_is_a_clear_error(tmp_path, sets):
    train, held = sets
    cfg = FinetuneConfig(peft=PeftConfig(method="adapter"), steps=4, batch_size=6, checkpoint_every=2)
    finetune(cfg, train, held, tmp_path / "res", stop_after=3)
    ckpt = tmp_path / "res" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-0000002"]  # no temporary file left
    state = ckpt / "step-0000002" / "state.json"
    state.write_text(state.read_text()[:30])
    with pytest.raises(ClipleakError, match=r"step-0000002 is damaged .*state\.json.*without --resume"):
        finetune(cfg, train, held, tmp_path / "res", resume=True)


def test_bad_settings_are_refused():
    from clipleak.errors import ClipleakError

    with pytest.raises(ClipleakError):
        FinetuneConfig(peft=PeftConfig(method="full"))
    with pytest.raises(ClipleakError):
        FinetuneConfig(dp=finetune_dp("per-example"))  # neither sigma nor epsilon
    with pytest.raises(ClipleakError):
        FinetuneConfig(dp=finetune_dp("per-batch", noise_multiplier=1.0))
    with pytest.raises(ClipleakError):  # the same, given as a DpSetting
        FinetuneConfig(dp=DpSetting("per-batch", clip=1.0, noise_multiplier=1.0))


def test_contrastive_dp_clip_records_privacy(tmp_path, sets):
    train, _ = sets
    cfg = ContrastiveConfig(steps=2, batch_size=8, dp=contrastive_dp("per-batch", clip=1.0, epsilon=50.0))
    card = contrastive_finetune(cfg, train, tmp_path / "m.safetensors", weights=None)
    pv = card["privacy"]
    assert pv["mechanism"] == "per-batch" and pv["sensitivity"] == pytest.approx(2.0)
    assert pv["epsilon_at_steps_done"] == pytest.approx(epsilon(pv["noise_multiplier"] / 2, 8 / 60, 2, 1e-5))
    assert card["data"]["kind"] == "image set" and card["zero_shot"] is not None


def test_train_cli_help_has_an_example():
    from typer.testing import CliRunner

    from clipleak.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert out.exit_code == 0 and "Example: clipleak train" in out.output


def test_text_feature_site_in_training(tmp_path, sets):
    """CoOp DP training at the text-features site: sigma 0 with no clipping is plain training, each example's
    clipped text-feature gradient has norm <= C, and the epsilon spent is the accountant's."""
    from clipleak.errors import ClipleakError
    from clipleak.models import build_model
    from clipleak.peft import PeftConfig, build_victim
    from clipleak.privacy import clipped_sum, text_feature_gradients_from_raw
    from clipleak.training.finetune import encode

    train, held = sets
    base = dict(peft=PeftConfig(method="coop"), steps=3, batch_size=8, sampling="fixed", lr=1e-2,
                checkpoint_every=100)
    finetune(FinetuneConfig(**base), train, held, tmp_path / "plain")
    site = finetune(FinetuneConfig(**base, dp=finetune_dp("per-example", site="text-features", clip=1e9,
                                                          noise_multiplier=0.0)),
                    train, held, tmp_path / "site")
    a, b = _peft(tmp_path / "plain"), _peft(tmp_path / "site")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert site["privacy"]["site"] == "text-features"

    # the clipping the trainer applies: per-example text-feature gradient norms <= C, and some were clipped
    victim = build_victim(build_model("tiny-32", None), list(train.classnames), PeftConfig(method="coop"))
    raw = encode(victim, train.images[:16])
    per = text_feature_gradients_from_raw(victim, raw, train.labels[:16])
    norms = torch.linalg.vector_norm(per.flatten(1), dim=1)
    c = float(norms.median())
    summed, f = clipped_sum(per, c)
    clipped = torch.linalg.vector_norm((f.view(-1, 1, 1) * per).flatten(1), dim=1)
    assert float(clipped.max()) <= c * (1 + 1e-6) and bool((f < 1).any()) and bool((f == 1).any())
    assert torch.allclose(summed, (f.view(-1, 1, 1) * per).sum(0), atol=1e-7)

    noisy = finetune(FinetuneConfig(**{**base, "sampling": "poisson"}, canaries=10,
                                    dp=finetune_dp("per-example", site="text-features", clip=0.01,
                                                   noise_multiplier=1.1)), train, held, tmp_path / "noisy")
    pv = noisy["privacy"]
    assert pv["epsilon_spent"] == pytest.approx(epsilon(1.1, 8 / 60, 3, 1e-5))
    assert noisy["canaries"]["space"].startswith("text features")
    assert not all(torch.allclose(a[k], _peft(tmp_path / "noisy")[k]) for k in a)  # the noise moved it
    with pytest.raises(ClipleakError):
        FinetuneConfig(peft=PeftConfig(method="adapter"),
                       dp=finetune_dp("per-example", site="text-features", noise_multiplier=1.0))
    with pytest.raises(ClipleakError):
        FinetuneConfig(peft=PeftConfig(method="coop"), dp=finetune_dp("none", site="text-features"))


def test_configs_compose_the_one_peft_config_and_dp_setting():
    peft = PeftConfig(method="coop", n_ctx=2, class_specific=True, init_seed=3)
    cfg = FinetuneConfig(peft=peft, steps=10, batch_size=5,
                         dp=DpSetting("per-example", clip=0.5, noise_multiplier=1.0, delta=1e-5,
                                      awaiting_schedule=True))
    assert cfg.peft == PeftConfig(method="coop", n_ctx=2, class_specific=True, init_seed=3)
    s = cfg.dp_setting(50)
    assert s is not None and (s.mechanism, s.clip, s.sample_rate, s.steps) == ("per-example", 0.5, 0.1, 10)
    assert s.epsilon is not None and s.epsilon > 0
    assert FinetuneConfig(peft=PeftConfig(method="adapter")).dp_setting(50) is None
    c = ContrastiveConfig(steps=10, batch_size=5, dp=contrastive_dp(clip=1.0, noise_multiplier=2.0)).dp_setting(50)
    assert c is not None and (c.mechanism, c.sample_rate) == ("per-batch", 0.1)
    with pytest.raises(ClipleakError, match="larger than"):
        ContrastiveConfig(steps=10, batch_size=60, dp=contrastive_dp(clip=1.0, noise_multiplier=2.0)).dp_setting(50)
