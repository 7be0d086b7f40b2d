"""Reliability of the CLI and the files: exit codes a script can trust, inputs checked before any work, one
schema check for observation / truth / reconstruction files, atomic saves, a clean screen, and a run killed
at random points that always resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from clipleak import api
from clipleak.api import make_observation
from clipleak.cli import main, quiet_warnings
from clipleak.errors import ClipleakError
from clipleak.peft import PeftConfig
from clipleak.records import Observation, Reconstruction, Truth


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A random-init tiny-32 CoOp observation of 2 digits (labels included) and its truth, on disk."""
    d = tmp_path_factory.mktemp("pair")
    obs, truth = make_observation(peft=PeftConfig(method="coop"), batch_size=2, seed=1, include_labels=True)
    return obs.save(d / "obs"), truth.save(d / "obs.truth")


def _edited(pair: tuple[Path, Path], tmp_path: Path, **changes: object) -> Path:
    """A copy of the observation whose sidecar has ``changes`` (a value None removes the key)."""
    src = pair[0]
    dst = tmp_path / "edited.safetensors"
    dst.write_bytes(src.read_bytes())
    meta = json.loads(src.with_suffix(".json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    dst.with_suffix(".json").write_text(json.dumps(meta))
    return dst


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), err
    text = " ".join(err.split())
    for w in words:
        assert w in text, (w, err)


# 1. exit codes

def test_interrupted_attack_exits_130_with_the_resume_line(pair, tmp_path, monkeypatch, capsys):
    def stop(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "attack_observation", stop)
    out = tmp_path / "rec"
    assert main(["attack", str(pair[0]), "--out", str(out), "--iterations", "2"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted:" in err and "rerun the same command to resume" in err
    assert str(out / "checkpoint") in err
    assert main(["attack", str(pair[0]), "--out", str(out), "--no-resume"]) == 130
    assert "nothing was kept" in capsys.readouterr().err


def test_interrupted_train_and_pretrain_name_the_rerun(tmp_path, monkeypatch, capsys):
    import clipleak.training

    def stop(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "finetune_client", stop)
    monkeypatch.setattr(clipleak.training, "pretrain", stop)
    assert main(["train", "--out", str(tmp_path / "ft"), "--steps", "2"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "--resume" in err and str(tmp_path / "ft") in err
    assert main(["pretrain", "--out", str(tmp_path / "t.safetensors"), "--steps", "2"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "--resume" in err and "t.ckpt" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nothing.safetensors")
    assert main(["attack", missing, "--out", str(tmp_path / "r")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", "attack", missing, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "observation file not found" in err


def test_finished_command_exits_0(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "10"]) == 0


# 2. one schema check for the files

@pytest.mark.parametrize("changes, field", [
    ({"batch_size": "one"}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -1}, "batch_size"),
    ({"batch_size": 3}, "batch_size"),  # the stored labels are 2
    ({"kind": None}, "kind"),
    ({"kind": "gradients"}, "kind"),
    ({"param_shapes": {"prompt.ctx": [4, 64]}}, "param_shapes"),
    ({"param_shapes": {"prompt.other": [4, 128]}}, "param_shapes"),
    ({"classnames": ["zero", "one"]}, "classnames"),  # the stored labels name classes beyond two
    ({"classnames": "zero,one"}, "classnames"),
    ({"image_size": "32"}, "image_size"),
    ({"peft": {"method": "coop", "n_ctx": 8, "class_specific": False}}, "n_ctx"),
])
def test_edited_observation_is_one_line_naming_file_and_field(pair, tmp_path, changes, field, capsys):
    if field == "classnames" and isinstance(changes["classnames"], list):
        labels = Observation.load(pair[0]).labels
        assert labels is not None and int(labels.max()) >= 2  # the draw holds a digit above one
    path = _edited(pair, tmp_path, **changes)
    with pytest.raises(ClipleakError) as e:
        Observation.load(path)
    assert field in str(e.value) and "edited.json" in str(e.value)
    _one_line_error(main(["attack", str(path), "--out", str(tmp_path / "r"), "--iterations", "1"]),
                    capsys.readouterr().err, field)


def test_class_specific_context_must_match_the_class_names(tmp_path):
    obs, _ = make_observation(peft=PeftConfig(method="coop", class_specific=True), batch_size=1)
    p = obs.save(tmp_path / "cs")
    meta = json.loads(p.with_suffix(".json").read_text())
    meta["classnames"] = meta["classnames"][:9]
    p.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ClipleakError, match="classnames"):
        Observation.load(p)


def test_truth_and_reconstruction_files_are_checked(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "bad.truth.safetensors"
    save_file({"images": torch.rand(2, 3, 8, 8), "labels": torch.tensor([1])}, str(p))
    with pytest.raises(ClipleakError, match="labels"):
        Truth.load(p)
    save_file({"images": torch.rand(2, 8, 8), "labels": torch.tensor([1, 2])}, str(p))
    with pytest.raises(ClipleakError, match="images"):
        Truth.load(p)
    rec = Reconstruction(images=torch.rand(2, 3, 8, 8), labels=torch.tensor([1, 2]), label_source="x", attack="ig")
    d = rec.save(tmp_path / "rec")
    (d / "reconstruction.json").write_text('{"attack": "ig", "label_source": 3}')
    with pytest.raises(ClipleakError, match="label_source"):
        Reconstruction.load(d)
    (d / "reconstruction.json").write_text('{"attack": "ig", "lab')
    with pytest.raises(ClipleakError, match="not valid JSON"):
        Reconstruction.load(d)


def test_truth_of_another_observation_is_refused(pair, tmp_path):
    obs = Observation.load(pair[0])
    other_obs, other_truth = make_observation(peft=PeftConfig(method="coop"), batch_size=2, seed=5, include_labels=True)
    truth = Truth.load(pair[1])
    assert truth.meta["observation_digest"] == obs.digest() != other_obs.digest()
    rec = Reconstruction(images=truth.images.clone(), labels=truth.labels.clone(), label_source="test",
                         attack="oracle", meta={"observation": obs.meta, "observation_digest": obs.digest()})
    with pytest.raises(ClipleakError, match="another observation"):
        api.evaluate_reconstruction(rec, other_truth, tmp_path / "report", with_lpips=False)
    assert api.truth_matches(rec, truth) is True
    old = Truth(images=truth.images, labels=truth.labels, meta={})
    assert api.truth_matches(rec, old) is None  # made before digests: scored, unchecked (a note in the CLI)


def test_interrupted_observation_save_never_leaves_a_pair_that_loads(pair, tmp_path, monkeypatch):
    import clipleak.records.observation as observation

    p = tmp_path / "o.safetensors"
    p.write_bytes(pair[0].read_bytes())
    p.with_suffix(".json").write_text(pair[0].with_suffix(".json").read_text())
    other, _ = make_observation(peft=PeftConfig(method="coop"), batch_size=1, seed=9)

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(observation, "write_text_atomic", killed)  # killed after the tensors, before the .json
    with pytest.raises(KeyboardInterrupt):
        other.save(p)
    with pytest.raises(ClipleakError, match="sidecar not found"):
        Observation.load(p)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp-")]


# 3. inputs checked before work

@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "-1"], ["--lr"]),
    (["--tv", "-1"], ["--tv"]),
    (["--iterations", "1000000000"], ["--iterations"]),
    (["--iterations", "-1"], ["--iterations"]),
    (["--restarts", "0"], ["--restarts"]),
    (["--restarts", "100000"], ["--restarts"]),
    (["--weights", "tiny-mnist"], ["random init", "--weights"]),
    (["--attack", "mip"], ["decoder"]),
    (["--attack", "featmatch", "--decoder", "tiny-mnist-decoder"], ["tiny-mnist-decoder", "random init"]),
])
def test_bad_attack_options_fail_before_any_work(pair, tmp_path, args, words, capsys):
    t0 = time.perf_counter()
    code = main(["attack", str(pair[0]), "--out", str(tmp_path / "r"), *args])
    _one_line_error(code, capsys.readouterr().err, *words)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("k", ["0", "1", "100000"])
def test_evaluate_reid_k_is_checked(pair, tmp_path, k, capsys):
    rec = Reconstruction(images=torch.rand(2, 3, 32, 32), labels=torch.tensor([1, 2]), label_source="x",
                         attack="ig")
    d = rec.save(tmp_path / "rec")
    _one_line_error(main(["evaluate", str(d), "--truth", str(pair[1]), "--reid-k", k]), capsys.readouterr().err,
                    "--reid-k")


def test_reconstruction_without_its_observation_is_one_line(pair, tmp_path, capsys):
    d = Reconstruction(images=torch.rand(2, 3, 32, 32), labels=torch.tensor([1, 2]), label_source="x",
                       attack="ig").save(tmp_path / "rec")
    _one_line_error(main(["evaluate", str(d), "--truth", str(pair[1])]), capsys.readouterr().err,
                    "meta.observation")


def test_training_options_are_checked_first(tmp_path, capsys):
    _one_line_error(main(["train", "--out", str(tmp_path / "ft"), "--threads", "0"]), capsys.readouterr().err,
                    "--threads")
    _one_line_error(main(["train", "--out", str(tmp_path / "ft"), "--lr", "nan"]), capsys.readouterr().err, "--lr")
    _one_line_error(main(["pretrain", "--out", str(tmp_path / "t.safetensors"), "--threads", "0"]),
                    capsys.readouterr().err, "--threads")
    assert not (tmp_path / "ft").exists()



HEAVY_MODULES = ("open_clip", "timm", "torchvision", "torchmetrics", "matplotlib.pyplot", "scipy.stats",
                 "scipy.optimize")


@pytest.fixture(scope="module")
def weights_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An observation made with a tiny-32 weights file, that file, and another tiny-32 weights file."""
    from clipleak.models import build_model, save_weights

    d = tmp_path_factory.mktemp("weights")
    mine, other = d / "mine.safetensors", d / "other.safetensors"
    save_weights(build_model("tiny-32", init_seed=0).model, mine)
    save_weights(build_model("tiny-32", init_seed=1).model, other)
    obs, _ = make_observation(weights=str(mine), peft=PeftConfig(method="coop"), batch_size=1, seed=0)
    return obs.save(d / "obs"), mine, other


@pytest.mark.parametrize("extra, words", [
    (["--attack", "mip"], ["needs a feature-to-image decoder"]),
    (["--attack", "mip", "--decoder", "missing.safetensors"], ["prior file not found", "missing.safetensors"]),
    (["--attack", "featmatch", "--decoder", "tiny-mnist-decoder"], ["decoder was trained for target weights"]),
    (["--attack", "ig", "--weights", "OTHER"], ["are not the ones the observation was made with"]),
])
def test_missing_prior_or_mismatched_weights_stop_before_the_heavy_imports(weights_pair, tmp_path, extra, words):
    """Issue 26's "under 5 s": a missing decoder or mismatched weights is refused before open_clip (with timm and
    torchvision), torchmetrics, matplotlib or scipy is imported, and before any model is built; a fresh process
    reports which of them it imported."""
    obs, mine, other = weights_pair
    extra = [str(other) if a == "OTHER" else a for a in extra]  # a second --weights replaces the first
    args = ["attack", str(obs), "--weights", str(mine), *extra, "--out", str(tmp_path / "r")]
    script = ("import sys, json\nfrom clipleak.cli import main\n"
              f"code = main({args!r})\n"
              f"print(json.dumps([code, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    _one_line_error(code, proc.stderr, *words)
    assert heavy == [], f"imported before the error: {heavy}"

@pytest.mark.parametrize("cmd", [
    ["attack", "{obs}", "--out", "{file}"],
    ["evaluate", "{rec}", "--truth", "{truth}", "--out", "{file}"],
    ["train", "--out", "{file}"],
    ["demo", "--out", "{file}"],
    ["share", "--out", "{file}/obs"],
    ["pretrain", "--out", "{file}/t.safetensors"],
    ["prior", "train", "--kind", "vae", "--out", "{file}/p.safetensors"],
    ["attack", "{obs}", "--out", "/proc/clipleak-test/rec"],
    ["share", "--out", "/proc/clipleak-test/obs"],
])
def test_unwritable_out_is_refused_before_any_work(pair, tmp_path, cmd, capsys):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    rec = Reconstruction(images=torch.rand(2, 3, 32, 32), labels=torch.tensor([1, 2]), label_source="x",
                         attack="ig").save(tmp_path / "rec")
    args = [a.format(obs=pair[0], file=file, rec=rec, truth=pair[1]) for a in cmd]
    t0 = time.perf_counter()
    _one_line_error(main(args), capsys.readouterr().err, "--out")
    assert time.perf_counter() - t0 < 5
    assert file.read_text() == "keep me"


def test_share_accepts_none_and_random_as_random_init(tmp_path, capsys):
    assert main(["share", "--out", str(tmp_path / "o"), "--weights", "none"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["weights_sha256"] == "random-init:0"
    capsys.readouterr()
    assert main(["share", "--help"]) == 0
    assert "none or random" in " ".join(capsys.readouterr().out.replace("│", " ").split())


# 4. a clean screen

def test_torch_jit_script_deprecation_is_silenced_and_nothing_else():
    def f(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        torch.jit.script(f)
        warnings.warn("a warning the user can act on", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning the user can act on"]


def test_damaged_attack_checkpoint_is_one_line_with_a_way_on(pair, tmp_path, capsys):
    out = tmp_path / "rec"
    args = ["attack", str(pair[0]), "--out", str(out), "--iterations", "1", "--restarts", "2"]
    assert main(args) == 0
    capsys.readouterr()
    state = next((out / "checkpoint").glob("step-*")) / "state.json"
    good = state.read_text()
    state.write_text(good[: len(good) // 2])  # truncated
    _one_line_error(main(args), capsys.readouterr().err, "damaged", "--no-resume")
    state.write_text(json.dumps({**json.loads(good), "restarts": [{"history": {}}, {}]}))  # not the writer's layout
    _one_line_error(main(args), capsys.readouterr().err, "damaged", "--no-resume")
    assert main([*args, "--no-resume"]) == 0


# 5. killed at random points, resumed to the uninterrupted result

CLI = "import sys; from clipleak.cli import main; sys.exit(main(sys.argv[1:]))"


def test_sigint_to_a_running_attack_exits_130_and_the_rerun_finishes(pair, tmp_path):
    out = tmp_path / "rec"
    cmd = [*_attack_cmd(pair[0], out)[:-4], "--restarts", "50", "--seed", "3"]
    # SIGINT back to its default in the child: a job started in the background by a shell without job control
    # (as CI runners may) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.perf_counter()
    while not (out / "checkpoint" / "latest").is_file() and proc.poll() is None and time.perf_counter() - t0 < 300:
        time.sleep(0.2)  # the first restart is in the checkpoint: the run is at work
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = " ".join(err.split())
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted:" in err and "rerun the same command to resume" in err
    assert not (out / "reconstruction.json").exists()


def _attack_cmd(obs: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", CLI, "attack", str(obs), "--out", str(out), "--attack", "ig", "--iterations", "30",
            "--restarts", "4", "--seed", "3"]


def _run(cmd: list[str], out: Path, kill_at: float | None = None) -> dict[str, float]:
    """Run ``cmd`` (SIGKILL at ``kill_at`` seconds after the start, if given); returns when each checkpoint
    (``step-NNNNNNN``: restarts finished) appeared; with ``kill_at``, ``"killed"``: the restarts the kill
    left in the checkpoint (-1: the run finished first)."""
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0, seen = time.perf_counter(), {}
    latest = out / "checkpoint" / "latest"
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if latest.is_file():
            seen.setdefault(latest.read_text().strip(), now)
        if kill_at is not None and now >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            seen["killed"] = float(latest.read_text().strip()[5:]) if latest.is_file() else 0.0
            return seen
        time.sleep(0.02)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    if kill_at is not None:  # it finished before the kill came
        seen["killed"] = -1.0
    return seen


def _kill_and_resume(pair: tuple[Path, Path], tmp_path: Path, trials: int) -> None:
    """``trials`` times: a fresh attack killed (SIGKILL) at a random moment while its restarts run, then rerun
    to the end; every rerun must give exactly the uninterrupted run's reconstruction."""
    obs = pair[0]
    times = _run(_attack_cmd(obs, tmp_path / "whole"), tmp_path / "whole")
    first, last = times["step-0000001"], times["step-0000004"]
    step = (last - first) / 3
    window = (first - step, last + step / 2)  # from the first restart's start to just after the last one's end
    a = Reconstruction.load(tmp_path / "whole")
    rng, left = random.Random(trials), []
    for t in range(trials):
        out = tmp_path / f"killed-{t}"
        left.append(_run(_attack_cmd(obs, out), out, kill_at=rng.uniform(*window))["killed"])
        _run(_attack_cmd(obs, out), out)
        b = Reconstruction.load(out)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), (t, left)
        assert a.history == b.history
        assert a.meta["restart_losses"] == b.meta["restart_losses"]
        assert a.meta["best_restart"] == b.meta["best_restart"]
    if trials >= 20:  # the kills came at several stages, at least two of them between restarts
        assert len(set(left) & {1.0, 2.0, 3.0}) >= 2 and len(set(left)) >= 3, left


def test_attack_killed_and_resumed_gives_the_uninterrupted_result(pair, tmp_path):
    _kill_and_resume(pair, tmp_path, 1)


@pytest.mark.slow
def test_attack_killed_20_times_resumes_to_the_same_result(pair, tmp_path):
    _kill_and_resume(pair, tmp_path, 20)


def test_audit_and_fl_refuse_bad_input_before_any_work(tmp_path: Path) -> None:
    """An absurd --images, negative --canaries, an unknown --attack, an --out that is a file, and a damaged
    cells.json are each one line and exit 2, before a cell is computed or a round is trained."""
    import time

    from clipleak.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        ["audit", "--out", str(tmp_path / "a1"), "--images", "1000000000", "--methods", "adapter", "--epsilons",
         "inf", "--canaries", "0"],
        ["audit", "--out", str(tmp_path / "a2"), "--canaries", "-1", "--methods", "adapter", "--epsilons", "inf"],
        ["audit", "--out", str(tmp_path / "a3"), "--attack", "foo", "--methods", "adapter", "--epsilons", "inf"],
        ["audit", "--out", str(afile), "--methods", "adapter", "--epsilons", "inf"],
        ["fl", "run", "--out", str(tmp_path / "f1"), "--attack", "foo", "--clients", "2", "--rounds", "1"],
        ["fl", "run", "--out", str(afile), "--clients", "2", "--rounds", "1"],
    ]
    for argv in cases:
        t0 = time.perf_counter()
        assert main(argv) == 2, argv
        assert time.perf_counter() - t0 < 5, argv
        assert not (tmp_path / "a1" / "cells.json").exists()
    damaged = tmp_path / "a4"
    damaged.mkdir()
    for text in ("{\"config\": {", "[]"):
        (damaged / "cells.json").write_text(text)
        assert main(["audit", "--out", str(damaged), "--methods", "adapter", "--epsilons", "inf", "--images", "1",
                     "--canaries", "0"]) == 2
