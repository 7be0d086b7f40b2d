"""`clipleak fl run --data folder:PATH`: a federation on the user's own images (issue 27)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from clipleak.cli import app
from clipleak.data import DataSpec
from clipleak.errors import ClipleakError


def test_fl_run_on_a_folder_records_its_split_and_refuses_another(tmp_path, image_folder):
    """Two clients, one round on a folder of images: the server's observations and the clients' truth files
    name the folder (by its absolute path), its split seed and its class names, and each client trained on one
    image of the folder's private split; a rerun on another split seed is refused before any round."""
    image_folder(tmp_path / "imgs")
    data = f"folder:{tmp_path / 'imgs'}"
    args = ["fl", "run", "--data", data, "--split-seed", "3", "--clients", "2", "--rounds", "1",
            "--weights", "random", "--batch-size", "1", "--client-size", "1", "--method", "adapter",
            "--engine", "inprocess",
            "--attack", "featmatch", "--decoder", "", "--iterations", "1", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"] == DataSpec.parse(data).name == f"folder:{(tmp_path / 'imgs').resolve()}"
    assert run["split_seed"] == 3
    updates = sorted((tmp_path / "run" / "rounds" / "round-001" / "updates").glob("*.json"))
    assert len(updates) == 2
    for p in updates:
        meta = json.loads(p.read_text())
        assert meta["data"]["name"] == run["data"] and meta["data"]["split_seed"] == 3
        assert meta["classnames"] == ["blue dot", "green bar", "red square"]
    clients = json.loads((tmp_path / "run" / "clients" / "clients.json").read_text())
    assert (clients["data"], clients["split_seed"], clients["part"]) == (run["data"], 3, "private")
    from safetensors import safe_open

    for p in (tmp_path / "run" / "clients").glob("node-*/round-001.truth.safetensors"):
        with safe_open(str(p), "pt") as fh:
            truth = json.loads(fh.metadata()["meta"])
        assert truth["data"]["name"] == run["data"] and truth["data"]["split_seed"] == 3
        assert len(truth["private_indices"]) == 1
    r = CliRunner().invoke(app, [a if a != "3" else "4" for a in args], terminal_width=200)
    assert isinstance(r.exception, ClipleakError) and "split_seed 3 (now 4)" in str(r.exception), r.output
    assert sorted(p.name for p in (tmp_path / "run" / "rounds").iterdir()) == ["round-001"]


def test_fl_run_checks_the_target_and_decoder_before_round_one(tmp_path, refusal, image_folder):
    """A target trained on another data set than the clients' folder, or a decoder for another target, is
    refused in one line with exit 2 before any round (no round folder written)."""
    image_folder(tmp_path / "imgs")
    base = ["fl", "run", "--data", f"folder:{tmp_path / 'imgs'}", "--clients", "2", "--rounds", "1",
            "--engine", "inprocess"]
    cases = [([], "trained on data set 'mnist'"),  # the default target, tiny-mnist
             (["--weights", "random", "--decoder", "auto"], "--decoder auto needs trained weights"),
             (["--weights", "random", "--decoder", "tiny-mnist-64-decoder"], "not a decoder for tiny-32")]
    for n, (extra, words) in enumerate(cases):
        out = tmp_path / f"out{n}"
        assert words in refusal([*base, *extra, "--out", str(out)]), extra
        assert not (out / "rounds").exists()
