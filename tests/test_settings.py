"""The composed settings (one PeftConfig, one DpSetting) and the flat forms written before them: fine-tuning
configs (``finetune.json``, audit cells, checkpoint keys) and federated recipes (``run.json``, the wire).

The old forms below are literals copied from what the flat configs wrote, so a converter that breaks fails here.
"""

from __future__ import annotations

import json
import math

import pytest

from clipleak.audit import AuditConfig
from clipleak.data import DataSpec, ImageSet, load_validation
from clipleak.errors import ClipleakError
from clipleak.fl import Recipe, RunSpec
from clipleak.peft import PeftConfig
from clipleak.privacy import DpSetting
from clipleak.training import ContrastiveConfig, FinetuneConfig, contrastive_dp, finetune, finetune_dp
from clipleak.training.finetune import same_training_key

# FinetuneConfig(method="coop", n_ctx=2, class_specific=True, peft_seed=3, steps=10, batch_size=5,
# dp="per-example", dp_site="text-features", clip=0.5, epsilon=3.0, delta=1e-6, accountant="prv", seed=7,
# canaries=4): its to_dict() and training_key() before the config was composed
OLD_DP = {"method": "coop", "steps": 10, "batch_size": 5, "sampling": "poisson", "optimizer": "adam", "lr": 0.001,
          "dp": "per-example", "dp_site": "text-features", "clip": 0.5, "noise_multiplier": None, "epsilon": 3.0,
          "delta": 1e-06, "accountant": "prv", "seed": 7, "n_ctx": 2, "class_specific": True, "peft_seed": 3,
          "checkpoint_every": 50, "eval_points": 5, "canaries": 4, "defense": None}
OLD_DP_KEY = {"method": "coop", "steps": 10, "batch_size": 5, "sampling": "poisson", "optimizer": "adam",
              "lr": 0.001, "dp": "per-example", "dp_site": "text-features", "clip": 0.5, "noise_multiplier": None,
              "epsilon": 3.0, "delta": 1e-06, "accountant": "prv", "seed": 7, "n_ctx": 2, "class_specific": True,
              "peft_seed": 3, "canaries": 4}
# FinetuneConfig(): the defaults, no DP
OLD_PLAIN = {"method": "adapter", "steps": 200, "batch_size": 25, "sampling": "poisson", "optimizer": "adam",
             "lr": 0.001, "dp": "none", "dp_site": "parameters", "clip": 0.1, "noise_multiplier": None,
             "epsilon": None, "delta": 1e-05, "accountant": "rdp", "seed": 0, "n_ctx": 4, "class_specific": False,
             "peft_seed": 0, "checkpoint_every": 50, "eval_points": 5, "canaries": 0, "defense": None}
OLD_PLAIN_KEY = {"method": "adapter", "steps": 200, "batch_size": 25, "sampling": "poisson", "optimizer": "adam",
                 "lr": 0.001, "dp": "none", "clip": 0.1, "noise_multiplier": None, "epsilon": None, "delta": 1e-05,
                 "accountant": "rdp", "seed": 0, "n_ctx": 4, "class_specific": False, "peft_seed": 0, "canaries": 0}
# Recipe(method="coop", n_ctx=2, class_specific=True, peft_seed=1, local_steps=2, batch_size=4, lr=0.05,
# dp={"mechanism": "per-example", "clip": 0.1, "noise_multiplier": 1.0, "delta": 1e-5}).to_json(), and Recipe()'s
OLD_RECIPE = ('{"arch": "tiny-32", "batch_size": 4, "class_specific": true, "dp": {"clip": 0.1, "delta": 1e-05, '
              '"mechanism": "per-example", "noise_multiplier": 1.0}, "extra": {}, "local_steps": 2, "lr": 0.05, '
              '"method": "coop", "n_ctx": 2, "peft_seed": 1, "weights": "tiny-mnist"}')
OLD_RECIPE_PLAIN = ('{"arch": "tiny-32", "batch_size": 1, "class_specific": false, "dp": null, "extra": {}, '
                    '"local_steps": 1, "lr": 0.1, "method": "adapter", "n_ctx": 4, "peft_seed": 0, '
                    '"weights": "tiny-mnist"}')


def _composed_dp() -> FinetuneConfig:
    return FinetuneConfig(peft=PeftConfig(method="coop", n_ctx=2, class_specific=True, init_seed=3), steps=10,
                          batch_size=5, seed=7, canaries=4,
                          dp=finetune_dp("per-example", site="text-features", clip=0.5, epsilon=3.0, delta=1e-6,
                                         accountant="prv"))


# -- fine-tuning configs --------------------------------------------------------------------------------------

def test_old_flat_finetune_config_loads_as_the_composed_one():
    cfg = FinetuneConfig.from_dict(OLD_DP)
    assert cfg == _composed_dp()
    assert cfg.peft == PeftConfig(method="coop", n_ctx=2, class_specific=True, init_seed=3)
    assert cfg.dp is not None and (cfg.dp.mechanism, cfg.dp.site, cfg.dp.clip, cfg.dp.epsilon, cfg.dp.delta,
                                   cfg.dp.accountant) == ("per-example", "text-features", 0.5, 3.0, 1e-6, "prv")
    assert FinetuneConfig.from_dict(OLD_PLAIN) == FinetuneConfig() and FinetuneConfig().dp is None
    assert FinetuneConfig().flat() == OLD_PLAIN and _composed_dp().flat() == OLD_DP


def test_composed_finetune_config_round_trips():
    for cfg in (_composed_dp(), FinetuneConfig(), FinetuneConfig(peft=PeftConfig("coop", template="a {} digit."))):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert "method" not in d and isinstance(d["peft"], dict)
        assert FinetuneConfig.from_dict(d) == cfg
    d = _composed_dp().to_dict()
    assert d["dp"]["mechanism"] == "per-example" and "sample_rate" not in d["dp"]  # the schedule sets it


def test_flat_finetune_config_is_validated_as_before():
    with pytest.raises(ClipleakError, match="unknown fine-tuning config keys: nope"):
        FinetuneConfig.from_dict({**OLD_PLAIN, "nope": 1})
    with pytest.raises(ClipleakError, match="takes dp 'none' or 'per-example', got 'per-batch'"):
        FinetuneConfig.from_dict({**OLD_PLAIN, "dp": "per-batch", "noise_multiplier": 1.0})
    with pytest.raises(ClipleakError, match="need dp='per-example'"):
        FinetuneConfig.from_dict({**OLD_PLAIN, "noise_multiplier": 1.0})
    with pytest.raises(ClipleakError, match="need dp='per-example'"):
        FinetuneConfig.from_dict({**OLD_PLAIN, "canaries": 3})
    with pytest.raises(ClipleakError, match="needs a noise multiplier or a target epsilon"):
        FinetuneConfig.from_dict({**OLD_PLAIN, "dp": "per-example"})
    with pytest.raises(ClipleakError, match="DP site is for CoOp"):
        FinetuneConfig.from_dict({**OLD_DP, "method": "adapter"})
    with pytest.raises(ClipleakError, match="unknown DP site"):
        FinetuneConfig.from_dict({**OLD_DP, "dp_site": "nowhere"})
    with pytest.raises(ClipleakError, match="fine-tuning trains coop or adapter, not 'full'"):
        FinetuneConfig.from_dict({**OLD_PLAIN, "method": "full"})


def test_composed_dp_setting_checks():
    with pytest.raises(ClipleakError, match="takes dp 'none' or 'per-example', got 'per-batch'"):
        FinetuneConfig(dp=DpSetting("per-batch", clip=1.0, noise_multiplier=1.0))
    with pytest.raises(ClipleakError, match="schedule sets the DP sample rate"):
        FinetuneConfig(dp=DpSetting("per-example", clip=1.0, noise_multiplier=1.0, delta=1e-5, sample_rate=0.1,
                                    steps=10))
    with pytest.raises(ClipleakError, match="contrastive fine-tuning takes dp 'per-batch' or 'none'"):
        ContrastiveConfig(dp=DpSetting("per-example", clip=1.0, noise_multiplier=1.0))
    # a plain noise-only setting is taken as one awaiting its schedule: no delta, so no epsilon
    cfg = FinetuneConfig(dp=DpSetting("per-example", clip=1.0, noise_multiplier=1.0), batch_size=5, steps=10)
    s = cfg.dp_setting(50)
    assert s is not None and s.noise_multiplier == 1.0 and s.epsilon is None
    # the setting awaiting its schedule refuses to be resolved before it has one, and takes no schedule
    waiting = DpSetting("per-example", clip=1.0, epsilon=3.0, delta=1e-5, awaiting_schedule=True)
    with pytest.raises(ClipleakError, match="awaits its training schedule"):
        waiting.resolve()
    with pytest.raises(ClipleakError, match="needs delta"):
        DpSetting("per-example", clip=1.0, epsilon=3.0, awaiting_schedule=True)
    with pytest.raises(ClipleakError, match="takes no sample rate or steps"):
        DpSetting("per-example", clip=1.0, noise_multiplier=1.0, sample_rate=0.1, awaiting_schedule=True)
    full = waiting.scheduled(0.1, 100).resolve()
    assert full == DpSetting("per-example", clip=1.0, epsilon=3.0, delta=1e-5, sample_rate=0.1, steps=100).resolve()
    c = ContrastiveConfig(dp=contrastive_dp(clip=1.0, epsilon=3.0), batch_size=5, steps=10).dp_setting(50)
    assert c is not None and c.mechanism == "per-batch" and c.noise_multiplier is not None


def test_training_key_is_the_flat_one():
    """A checkpoint written before the config was composed stores the flat key: the composed config of the
    same settings builds exactly that key, so the checkpoint resumes."""
    assert _composed_dp().training_key() == OLD_DP_KEY
    assert FinetuneConfig().training_key() == OLD_PLAIN_KEY
    assert FinetuneConfig.from_dict(OLD_DP).training_key() == OLD_DP_KEY
    # settings the flat form had no field for change the key (and only then)
    templ = FinetuneConfig(peft=PeftConfig(method="adapter", template="a {} digit."))
    assert templ.training_key() == {**OLD_PLAIN_KEY, "peft_template": "a {} digit."}
    # without DP, the flat DP fields (which did nothing) are not compared
    key = {"config": FinetuneConfig().training_key(), "arch": "tiny-32"}
    old = {"config": {**OLD_PLAIN_KEY, "clip": 0.5, "delta": 1e-6}, "arch": "tiny-32"}
    assert same_training_key(old, key) and not same_training_key({**old, "arch": "tiny-64"}, key)
    dp_key = {"config": _composed_dp().training_key()}
    assert not same_training_key({"config": {**OLD_DP_KEY, "clip": 0.25}}, dp_key)


@pytest.fixture(scope="module")
def sets() -> tuple[ImageSet, ImageSet]:
    v = load_validation(DataSpec.parse("mnist"), 32)
    cut = lambda a, b: ImageSet(v.images[a:b], v.labels[a:b], v.classnames, v.grayscale, v.source)  # noqa: E731
    return cut(0, 60), cut(60, 100)


def test_a_checkpoint_with_the_old_key_resumes(tmp_path, sets):
    """A run interrupted before the change (its checkpoint's key in the flat form) resumes with the composed
    config of the same settings; other settings are refused."""
    train, held = sets
    cfg = FinetuneConfig(peft=PeftConfig(method="adapter"), steps=4, batch_size=6, checkpoint_every=2,
                         dp=finetune_dp("per-example", clip=0.1, noise_multiplier=1.0))
    full = finetune(cfg, train, held, tmp_path / "full")
    assert finetune(cfg, train, held, tmp_path / "res", stop_after=3) == {"completed": False, "stopped_after": 3}
    state_file = tmp_path / "res" / "ckpt" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    old_key = {"method": "adapter", "steps": 4, "batch_size": 6, "sampling": "poisson", "optimizer": "adam",
               "lr": 0.001, "dp": "per-example", "clip": 0.1, "noise_multiplier": 1.0, "epsilon": None,
               "delta": 1e-05, "accountant": "rdp", "seed": 0, "n_ctx": 4, "class_specific": False, "peft_seed": 0,
               "canaries": 0}
    assert state["key"]["config"] == old_key  # what the flat config wrote
    state_file.write_text(json.dumps(state))
    done = finetune(cfg, train, held, tmp_path / "res", resume=True)
    assert done["resumed_from_step"] == 2 and done["accuracy"] == full["accuracy"]
    finetune(cfg, train, held, tmp_path / "other", stop_after=3)
    other = FinetuneConfig(peft=PeftConfig(method="adapter"), steps=4, batch_size=6, checkpoint_every=2,
                           dp=finetune_dp("per-example", clip=0.2, noise_multiplier=1.0))
    with pytest.raises(ClipleakError, match="different settings"):
        finetune(other, train, held, tmp_path / "other", resume=True)


def test_audit_fine_tuning_is_built_from_its_flat_options():
    """cells.json keeps the audit's own flat ``finetune`` options (a folder written before resumes); its points
    become composed configs with the same settings as before."""
    base = {"steps": 6, "batch_size": 25, "clip": 0.01, "lr": 1e-2, "sampling": "poisson"}
    cfg = AuditConfig(methods=["adapter", "coop"], epsilons=[math.inf, 3.0],
                      finetune={**base, "class_specific": True, "dp_site": "text-features"})
    assert cfg.to_dict()["finetune"] == {**base, "class_specific": True, "dp_site": "text-features"}
    plain = cfg.ft("coop", math.inf)
    assert plain.dp is None and plain.peft == PeftConfig(method="coop", class_specific=True)
    dp = cfg.ft("coop", 3.0, canaries=5)
    assert dp.dp is not None and (dp.dp.site, dp.dp.clip, dp.dp.epsilon, dp.dp.delta) == ("text-features", 0.01,
                                                                                          3.0, 1e-5)
    assert dp.canaries == 5
    flat = {"method": "coop", "steps": 6, "batch_size": 25, "sampling": "poisson", "optimizer": "adam", "lr": 0.01,
            "dp": "per-example", "dp_site": "text-features", "clip": 0.01, "noise_multiplier": None, "epsilon": 3.0,
            "delta": 1e-05, "accountant": "rdp", "seed": 0, "n_ctx": 4, "class_specific": True, "peft_seed": 0,
            "checkpoint_every": 50, "eval_points": 5, "canaries": 5, "defense": None}
    assert dp.flat() == flat  # the settings the flat config of this point had
    ad = cfg.ft("adapter", 3.0)
    assert ad.peft == PeftConfig(method="adapter") and ad.dp is not None and ad.dp.site == "parameters"


# -- federated recipes ----------------------------------------------------------------------------------------

def test_old_flat_recipe_loads_as_the_composed_one():
    r = Recipe.from_json(OLD_RECIPE)
    assert r.peft == PeftConfig(method="coop", n_ctx=2, class_specific=True, init_seed=1)
    assert (r.local_steps, r.batch_size, r.lr, r.weights) == (2, 4, 0.05, "tiny-mnist")
    assert r.dp == DpSetting("per-example", clip=0.1, noise_multiplier=1.0, delta=1e-5, awaiting_schedule=True)
    s = r.setting()
    assert s is not None and s.delta is None and s.noise_multiplier == 1.0  # delta is the server's
    assert Recipe.from_json(OLD_RECIPE_PLAIN) == Recipe()
    for rec in (r, Recipe()):
        assert Recipe.from_json(rec.to_json()) == rec
        assert "method" not in json.loads(rec.to_json())


def test_a_run_folder_with_the_old_recipe_is_the_same_run(tmp_path):
    recipe = Recipe(peft=PeftConfig(method="coop", n_ctx=2, class_specific=True, init_seed=1), local_steps=2,
                    batch_size=4, lr=0.05,
                    dp=DpSetting("per-example", clip=0.1, noise_multiplier=1.0, delta=1e-5, awaiting_schedule=True))
    spec = RunSpec(out=str(tmp_path), recipe=recipe)
    saved = json.loads(json.dumps(spec.to_dict()))
    assert spec.same_run(saved)
    old = {**saved, "recipe": json.loads(OLD_RECIPE)}  # run.json written before the recipe was composed
    assert spec.same_run(old)
    assert not spec.same_run({**old, "recipe": {**json.loads(OLD_RECIPE), "lr": 0.5}})
    assert RunSpec(**old).recipe == recipe  # a RunSpec read back from the old file


def test_recipe_checks():
    with pytest.raises(ClipleakError, match="federated runs train coop or adapter"):
        Recipe(peft=PeftConfig(method="full"))
    with pytest.raises(ClipleakError, match="give a noise multiplier"):
        Recipe.from_dict({"method": "adapter", "dp": {"mechanism": "per-example", "clip": 1.0, "epsilon": 3.0}})
    with pytest.raises(ClipleakError, match="unknown DP mechanism"):
        Recipe.from_json(OLD_RECIPE.replace('"per-example"', '"per-pixel"'))
