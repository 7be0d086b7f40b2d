"""End to end through the CLI and the public API: share -> attack -> evaluate -> report."""

from __future__ import annotations

import json

import pytest
import torch

from clipleak import client
from clipleak.api import attack_observation, evaluate_reconstruction, make_observation
from clipleak.cli import main
from clipleak.peft import PeftConfig
from clipleak.records import Reconstruction, Truth


@pytest.mark.parametrize("cmd", ["share", "attack", "evaluate", "demo", "models"])
def test_every_command_has_help_with_an_example(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"clipleak {cmd}" in out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    obs = d / "obs"
    assert main(["share", "--out", str(obs), "--method", "coop", "--batch-size", "2", "--seed", "3"]) == 0
    rec = d / "rec"
    assert main(["attack", str(obs) + ".safetensors", "--out", str(rec), "--iterations", "4",
                 "--restarts", "1"]) == 0
    return d, obs, rec


def test_end_to_end_files(run):
    d, obs, rec = run
    assert (d / "obs.json").is_file() and (d / "obs.truth.safetensors").is_file()
    assert main(["evaluate", str(rec), "--truth", str(d / "obs.truth.safetensors")]) == 0
    for f in ("report.html", "metrics.json", "comparison.png", "loss.png"):
        assert (rec / f).is_file(), f
    m = json.loads((rec / "metrics.json").read_text())
    assert set(m["methods"]) >= {"attack", "blank", "prototype"}
    assert m["verdict"]["text"] in (rec / "report.html").read_text()


def test_truth_and_reconstruction_name_their_observation(run):
    from clipleak.records import Observation

    d, obs, rec = run
    digest = Observation.load(str(obs) + ".safetensors").digest()
    assert Reconstruction.load(rec).meta["observation_digest"] == digest
    assert Truth.load(d / "obs.truth.safetensors").meta["observation_digest"] == digest


def test_truth_as_reconstruction_beats_baselines_and_noise_does_not(run, tmp_path):
    d, obs, rec_dir = run
    from clipleak.records import Truth

    truth = Truth.load(d / "obs.truth.safetensors")
    rec = Reconstruction.load(rec_dir)
    perfect = Reconstruction(images=truth.images.clone(), labels=truth.labels.clone(), label_source="test",
                             attack="oracle", meta=rec.meta)
    _, ev = evaluate_reconstruction(perfect, truth, tmp_path / "perfect")
    assert ev["methods"]["attack"]["psnr_mean"] == 100.0
    assert ev["verdict"]["beat_prototype"] and ev["verdict"]["beat_blank"]
    assert "beat both" in ev["verdict"]["text"]
    noise = Reconstruction(images=torch.rand(truth.images.shape, generator=torch.Generator().manual_seed(0)),
                           labels=truth.labels.clone(), label_source="test", attack="noise", meta=rec.meta)
    _, ev = evaluate_reconstruction(noise, truth, tmp_path / "noise")
    assert not ev["verdict"]["beat_prototype"]
    assert "NOT" in ev["verdict"]["text"]


def test_attacker_cannot_reach_private_images(run, monkeypatch):
    d, obs, _ = run

    def forbidden(*a, **k):
        raise AssertionError("attack code touched the private split")

    monkeypatch.setattr(client, "load_private", forbidden)
    monkeypatch.setattr(client, "sample_batch", forbidden)
    rec = attack_observation(str(obs) + ".safetensors", iterations=2, restarts=1)
    assert rec.images.shape[0] == 2


def test_api_observation_matches_request():
    obs, truth = make_observation(peft=PeftConfig(method="adapter"), batch_size=3, classes=[4], seed=1,
                                  include_labels=True)
    assert obs.batch_size == 3 and torch.equal(obs.labels, torch.tensor([4, 4, 4]))
    assert torch.equal(truth.labels, obs.labels)
    assert obs.meta["data"]["name"] == "mnist" and obs.meta["data"]["grayscale"] is True


def test_share_distinct_classes(tmp_path):
    assert main(["share", "--out", str(tmp_path / "o"), "--method", "adapter", "--batch-size", "8",
                 "--distinct-classes", "--seed", "5"]) == 0
    labels = Truth.load(tmp_path / "o.truth.safetensors").labels
    assert labels.numel() == 8 and len(set(labels.tolist())) == 8


def test_bad_inputs_exit_2(tmp_path, run, capsys):
    d, obs, rec = run
    assert main(["attack", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    # corrupt image in a folder data set
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
    from PIL import Image

    for i, cls in enumerate(("cat", "dog")):
        for j in range(3):
            Image.new("RGB", (20, 20), (40 * i + j, 0, 0)).save(tmp_path / "imgs" / cls / f"ok{j}.png")
    (tmp_path / "imgs" / "cat" / "a.png").write_bytes(b"not an image")
    assert main(["share", "--out", str(tmp_path / "o"), "--data", f"folder:{tmp_path / 'imgs'}"]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err
    # an observation whose JSON does not match the model
    meta = json.loads((d / "obs.json").read_text())
    meta["peft"]["n_ctx"] = 8
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    (tmp_path / "bad.safetensors").write_bytes((d / "obs.safetensors").read_bytes())
    assert main(["attack", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "r"),
                 "--iterations", "1", "--restarts", "1"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["evaluate", str(rec), "--truth", str(tmp_path / "nothing.safetensors")]) == 2
    assert main(["share", "--out", str(tmp_path / "o"), "--method", "lora"]) == 2


def test_demo_random_init_contrast_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--weights", "random", "--attack", "ig", "--prior", "tv",
                 "--iterations", "3"]) == 0
    err = capsys.readouterr().err
    assert "Report:" in err and (tmp_path / "demo" / "report" / "report.html").is_file()
    m = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert m["diagnostics"]["same_class_gradient_cosine"] > 0.9  # random init: the update barely depends on x


def test_help_paragraphs_wrap_to_the_terminal(monkeypatch):
    """Every command's help is its docstring with the paragraphs' hard line breaks removed, so that an
    80-column console wraps them evenly; and every command shows an example."""
    import typer.main

    from clipleak.cli import app

    group = typer.main.get_command(app)
    names = []

    def walk(cmd, prefix=""):
        for name, sub in getattr(cmd, "commands", {}).items():
            if getattr(sub, "commands", None):
                walk(sub, prefix + name + " ")
            else:
                names.append(prefix + name)
                text = sub.help or ""
                assert "Example: clipleak" in text, name
                for para in text.split("\n\n"):
                    assert "\n" not in para, (name, para)

    walk(group)
    assert {"share", "attack", "evaluate", "demo", "pretrain", "prior train", "models"} <= set(names)
    monkeypatch.setenv("COLUMNS", "80")
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["attack", "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_prior_train_decoder_at_a_working_side(tmp_path):
    """`prior train --kind decoder --work-size`: the decoder's convolutions work at that side (its card says so)
    and it still makes full-size images."""
    from clipleak.cli import main
    from clipleak.priors import load_prior

    out = tmp_path / "d.safetensors"
    assert main(["prior", "train", "--kind", "decoder", "--weights", "tiny-mnist", "--steps", "2", "--work-size", "16",
                 "--out", str(out)]) == 0
    dec = load_prior(out)
    assert dec.work_size == 16 and dec.image_size == 32
