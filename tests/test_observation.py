from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clipleak.client import share
from clipleak.errors import ClipleakError
from clipleak.models import save_weights
from clipleak.peft import PeftConfig, build_victim, rebuild_victim
from clipleak.records import (
    Observation,
    Truth,
    latest_checkpoint,
    load_checkpoint,
    write_atomic,
    write_checkpoint,
    write_json_atomic,
)


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) + 1


@pytest.mark.parametrize("method", ["coop", "adapter", "full-visual"])
def test_observation_round_trip_is_bit_identical(tmp_path, tiny, digits, method):
    v = build_victim(tiny, digits, PeftConfig(method=method))
    x, y = _batch()
    obs = share(v, x, y, include_labels=True)
    p = obs.save(tmp_path / "obs")
    again = Observation.load(p)
    assert set(again.gradients) == set(obs.gradients) == set(v.trainable())
    for k in obs.gradients:
        assert torch.equal(again.gradients[k], obs.gradients[k])
    assert torch.equal(again.labels, y)
    meta = json.loads(p.with_suffix(".json").read_text())
    assert meta["arch"] == "tiny-32" and meta["batch_size"] == 2 and meta["image_size"] == 32
    assert meta["peft"]["method"] == method and meta["classnames"] == digits and meta["labels_included"]
    # the shared file holds gradients, PEFT state and (here) labels -- no image
    keys = set(load_file(str(p)))
    assert all(k.startswith(("grad/", "state/")) or k == "labels" for k in keys)


def test_labels_not_shared_unless_asked(tmp_path, tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="coop"))
    x, y = _batch(1)
    p = share(v, x, y[:1]).save(tmp_path / "o")
    assert "labels" not in load_file(str(p))
    assert Observation.load(p).labels is None


def test_rebuilt_victim_reproduces_gradient(tmp_path, digits):
    from clipleak.models import build_model

    clip = build_model("tiny-32", init_seed=3)
    w = tmp_path / "w.safetensors"
    save_weights(clip.model, w)
    clip = build_model("tiny-32", w)
    v = build_victim(clip, digits, PeftConfig(method="coop", init_seed=11))
    x, y = _batch()
    obs = share(v, x, y)
    obs.save(tmp_path / "o")
    v2 = rebuild_victim(Observation.load(tmp_path / "o.safetensors"))

    g2 = v2.gradient(x, y)
    for k in obs.gradients:
        assert torch.allclose(g2[k], obs.gradients[k], atol=1e-6)


def test_mismatched_sidecar_is_a_clear_error(tmp_path, tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="adapter"))
    x, y = _batch()
    p = share(v, x, y).save(tmp_path / "o")
    meta = json.loads(p.with_suffix(".json").read_text())
    meta["peft"]["adapter_reduction"] = 2  # gradient shapes no longer fit the model
    p.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ClipleakError, match="does not match"):
        rebuild_victim(Observation.load(p))
    meta["peft"]["adapter_reduction"] = 4
    meta["weights_sha256"] = "0" * 64
    meta["weights"] = None
    p.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ClipleakError, match="--weights"):
        rebuild_victim(Observation.load(p))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ClipleakError, match="not found"):
        Observation.load(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ClipleakError, match="not valid JSON"):
        Observation.load(tmp_path / "bad.safetensors")


def test_truth_round_trip(tmp_path):
    x, y = _batch(3)
    p = Truth(images=x, labels=y, meta={"seed": 1}).save(tmp_path / "t")
    t = Truth.load(p)
    assert torch.equal(t.images, x) and torch.equal(t.labels, y) and t.meta == {"seed": 1}


def test_observation_identifies_no_drawn_image(tmp_path):
    """What the client sends says which data set and split, never which images: two different draws give
    identical metadata, and neither the seed nor the private indices appear anywhere in it."""
    from clipleak.api import make_observation

    obs_a, truth_a = make_observation(peft=PeftConfig(method="adapter"), batch_size=2, seed=5)
    obs_b, truth_b = make_observation(peft=PeftConfig(method="adapter"), batch_size=2, seed=6)
    assert obs_a.meta == obs_b.meta
    assert truth_a.meta["private_indices"] != truth_b.meta["private_indices"]
    text = json.dumps(obs_a.meta)
    assert "seed\": 5" not in text and "private_indices" not in text and "indices" not in text
    assert set(obs_a.meta["data"]) == {"name", "split_seed", "private_fraction", "validation_fraction", "grayscale"}
    p = obs_a.save(tmp_path / "o")
    assert set(load_file(str(p))) <= {k for k in load_file(str(p)) if k.startswith(("grad/", "state/"))}
    assert truth_a.meta["seed"] == 5  # the draw is recorded on the client side only


def test_split_mismatch_is_refused(tmp_path):
    """A target whose card records another split than the observation's is refused, at share and attack time:
    its training images would be among the "private" ones."""
    from clipleak.api import attack_observation, make_observation
    from clipleak.cli import main
    from clipleak.models import build_model, card_path

    w = tmp_path / "t.safetensors"
    save_weights(build_model("tiny-32", init_seed=0).model, w)
    card_path(w).write_text(json.dumps({"data_spec": {"name": "mnist", "split_seed": 0, "private_fraction": 0.1,
                                                      "validation_fraction": 0.1}}))
    obs, _ = make_observation(weights=str(w), peft=PeftConfig(method="adapter"), split_seed=0)  # same split: fine
    with pytest.raises(ClipleakError, match="split"):
        make_observation(weights=str(w), peft=PeftConfig(method="adapter"), split_seed=1)
    assert main(["share", "--out", str(tmp_path / "o"), "--weights", str(w), "--method", "adapter",
                 "--split-seed", "1"]) == 2
    obs.meta["data"]["split_seed"] = 1  # an observation that claims another split
    with pytest.raises(ClipleakError, match="split"):
        attack_observation(obs, name="featmatch", iterations=0, decoder=None, prior="none")


# ------------------------------------------------------------------------------ atomic files, checkpoints


def test_atomic_write_keeps_the_old_file_on_failure_and_leaves_no_temp(tmp_path):
    target = tmp_path / "cells.json"
    write_json_atomic(target, {"n": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"n": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_fail)
    assert json.loads(target.read_text()) == {"n": 1}
    with pytest.raises(TypeError):  # not serialisable: nothing is written at all
        write_json_atomic(tmp_path / "other.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.json"]


def _weights(d):
    (d / "weights.bin").write_bytes(b"w")


def _read(d):
    return (d / "weights.bin").read_bytes()


def test_checkpoint_switch_survives_a_kill_and_leaves_no_temp(tmp_path):
    root = tmp_path / "ckpt"
    write_checkpoint(root, 3, {"step": 3}, _weights)

    def killed(d):
        (d / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(root, 6, {"step": 6}, killed)
    assert load_checkpoint(root, _read, hint="") == ({"step": 3}, b"w")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000003"]
    (root / ".tmp-step-0000006-x").mkdir()  # what a SIGKILL during a write leaves: removed by the next one
    (root / ".tmp-latest-x").write_text("step-0000006")
    write_checkpoint(root, 6, {"step": 6}, _weights)
    write_checkpoint(root, 6, {"step": 7}, _weights)  # the same step again (a stop at a checkpoint step)
    assert load_checkpoint(root, _read, hint="") == ({"step": 7}, b"w")
    d = latest_checkpoint(root)
    assert d is not None and sorted(p.name for p in root.iterdir()) == ["latest", d.name]
    assert load_checkpoint(tmp_path / "none", _read, hint="") is None


def test_damaged_checkpoint_is_one_line(tmp_path):
    root = tmp_path / "ckpt"
    d = write_checkpoint(root, 2, {"step": 2}, _weights)
    (d / "state.json").write_text('{"step": ')
    with pytest.raises(ClipleakError, match=r"checkpoint .*step-0000002 is damaged \(.*state\.json.*\); delete it"
                       ) as e:
        load_checkpoint(root, _read, hint="delete it to start over")
    assert "\n" not in str(e.value)
    (d / "state.json").write_text('{"step": 2}')
    (d / "weights.bin").unlink()
    with pytest.raises(ClipleakError, match="is damaged .*weights.bin"):
        load_checkpoint(root, _read, hint="delete it to start over")


def test_make_observation_takes_a_peft_config():
    from clipleak.api import make_observation

    default, _ = make_observation(batch_size=1, seed=4)  # PeftConfig(): CoOp with its defaults
    coop, _ = make_observation(peft=PeftConfig(method="coop"), batch_size=1, seed=4)
    assert default.meta["peft"] == coop.meta["peft"] == PeftConfig().to_dict()
    assert all(torch.equal(default.gradients[k], coop.gradients[k]) for k in default.gradients)
    full, _ = make_observation(peft=PeftConfig(method="coop", n_ctx=2, init_seed=3), batch_size=1, seed=4)
    assert (full.meta["peft"]["n_ctx"], full.meta["peft"]["init_seed"]) == (2, 3)
    assert not all(torch.equal(full.gradients[k], coop.gradients[k]) for k in full.gradients)
    with pytest.raises(TypeError, match="method"):  # the flat PEFT keywords are gone: one PeftConfig
        make_observation(peft=PeftConfig(method="coop"), method="adapter")


def test_digests_match_checks_and_names_both_digests():
    from clipleak.records import digests_match

    assert digests_match("a" * 64, "a" * 64, "{truth} {attacked}") is True
    assert digests_match(None, "b" * 64, "unused") is None  # a record made before digests: unchecked
    assert digests_match("a" * 64, None, "unused") is None
    with pytest.raises(ClipleakError, match=r"^truth bbbbbbbbbbbb, attacked aaaaaaaaaaaa$"):
        digests_match("a" * 64, "b" * 64, "truth {truth}, attacked {attacked}")
