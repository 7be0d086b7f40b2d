"""--device: one spelling check before any work, one resolution, and the share -> attack -> evaluate path on
every device this machine has (the CPU always; CUDA and MPS when present, so a GPU session runs the same tests
there)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from clipleak.api import attack_observation, evaluate_reconstruction, make_observation
from clipleak.cli import main
from clipleak.devices import check_device_spec, describe, resolve_device
from clipleak.errors import ClipleakError
from clipleak.peft import PeftConfig
from clipleak.records import Observation, Reconstruction


def _available() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    backend = getattr(torch.backends, "mps", None)
    if backend is not None and backend.is_available():
        found.append("mps")
    return found


DEVICES = _available()


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device this machine offers, resolved."""
    return resolve_device(request.param)


@pytest.mark.parametrize("spec, expected", [("auto", "auto"), (None, "auto"), ("", "auto"), ("CPU", "cpu"),
                                            (" cuda ", "cuda"), ("cuda:1", "cuda:1"), ("mps", "mps")])
def test_spellings_accepted(spec, expected):
    assert check_device_spec(spec) == expected


@pytest.mark.parametrize("spec", ["cdua", "gpu", "cuda:", "cuda:x", "cuda0", "tpu", "cpu:0"])
def test_typos_refused_in_one_line(spec):
    with pytest.raises(ClipleakError) as e:
        check_device_spec(spec)
    assert spec in str(e.value) and "\n" not in str(e.value)


def test_spelling_check_needs_no_torch():
    code = ("import sys; from clipleak.devices import check_device_spec\n"
            "try:\n    check_device_spec('cdua')\nexcept Exception:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if "cuda" in DEVICES else ("mps" if "mps" in DEVICES else "cpu")
    assert resolve_device("auto").type == expected
    assert describe(torch.device("cpu")) == "cpu"


COMPUTING = {
    "share": ["share", "--out", "{d}/obs"],
    "attack": ["attack", "{d}/obs.safetensors", "--out", "{d}/rec"],
    "evaluate": ["evaluate", "{d}/rec", "--truth", "{d}/obs.truth.safetensors"],
    "demo": ["demo", "--out", "{d}/demo"],
    "pretrain": ["pretrain", "--out", "{d}/t.safetensors"],
    "prior train": ["prior", "train", "--kind", "vae", "--out", "{d}/p.safetensors"],
    "train": ["train", "--out", "{d}/ft"],
    "fl run": ["fl", "run", "--out", "{d}/fl"],
}


@pytest.mark.parametrize("command", sorted(COMPUTING))
def test_every_computing_command_refuses_a_typo_first(command, tmp_path, capsys):
    args = [a.format(d=tmp_path) for a in COMPUTING[command]]
    assert main([*args, "--device", "cdua"]) == 2
    err = capsys.readouterr()
    lines = [ln for ln in (err.out + err.err).splitlines() if ln.strip()]
    assert len(lines) == 1 and "cdua" in lines[0], lines
    assert not any(tmp_path.iterdir()), "nothing is written before the device is checked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_what_there_is(tmp_path, capsys):
    assert main(["share", "--out", str(tmp_path / "obs"), "--device", "cuda"]) == 2
    err = capsys.readouterr()
    lines = [ln for ln in (err.out + err.err).splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "available: cpu" in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_cli_share_attack_evaluate_on_cpu(tmp_path):
    obs, rec = tmp_path / "obs", tmp_path / "rec"
    assert main(["share", "--out", str(obs), "--method", "adapter", "--batch-size", "2", "--device", "cpu"]) == 0
    assert main(["attack", str(obs) + ".safetensors", "--out", str(rec), "--iterations", "2", "--restarts", "1",
                 "--device", "cpu"]) == 0
    assert main(["evaluate", str(rec), "--truth", str(tmp_path / "obs.truth.safetensors"), "--device", "cpu"]) == 0
    assert (rec / "metrics.json").is_file()


def _all_cpu(tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


@pytest.mark.parametrize("method", ["adapter", "coop", "full-visual"])
def test_share_attack_evaluate_on_every_device(device, method, tmp_path):
    obs, truth = make_observation(peft=PeftConfig(method=method), batch_size=2, seed=1, device=device)
    assert _all_cpu([*obs.gradients.values(), *obs.peft_state.values(), truth.images]), "records hold CPU tensors"
    assert all(torch.isfinite(g).all() for g in obs.gradients.values())
    path = obs.save(tmp_path / "obs")
    assert _all_cpu(Observation.load(path).gradients.values())
    rec = attack_observation(path, name="ig", iterations=2, restarts=2, device=device)
    assert rec.images.device.type == "cpu" and rec.images.shape == truth.images.shape
    assert torch.isfinite(rec.images).all()
    rec.save(tmp_path / "rec")
    _, ev = evaluate_reconstruction(Reconstruction.load(tmp_path / "rec"), truth, tmp_path / "report",
                                    with_lpips=False, device=device)
    assert ev["reidentification"]["attack"] is not None and 0.0 <= ev["reidentification"]["attack"] <= 1.0


def test_dp_share_on_every_device(device):
    dp = {"mechanism": "per-example", "clip": 1.0, "noise_multiplier": 1.0}
    obs, _ = make_observation(peft=PeftConfig(method="adapter"), batch_size=2, seed=1, dp=dp, dp_seed=5, device=device)
    assert _all_cpu(obs.gradients.values()) and all(torch.isfinite(g).all() for g in obs.gradients.values())
    again, _ = make_observation(peft=PeftConfig(method="adapter"), batch_size=2, seed=1, dp=dp, dp_seed=5,
                                device=device)
    assert obs.digest() == again.digest(), "seeded noise is reproducible on one device"


def test_cpu_is_the_default_path_bit_for_bit():
    """``device="cpu"`` computes exactly what the code did before devices existed (the figures in the tests
    rest on it): the same gradient, DP noise included, as the victim built and run by hand on the CPU."""
    from clipleak.client import load_private, sample_batch
    from clipleak.data import DataSpec
    from clipleak.models import build_model
    from clipleak.peft import PeftConfig, build_victim
    from clipleak.privacy import DpSetting, dp_sgd, per_example_gradients

    dp = {"mechanism": "per-example", "clip": 1.0, "noise_multiplier": 0.5}
    obs, _ = make_observation(peft=PeftConfig(method="adapter"), batch_size=3, seed=2, dp=dp, dp_seed=11, device="cpu")
    clip = build_model("tiny-32", None)
    private = load_private(DataSpec.parse("mnist"), clip.image_size, "private")
    victim = build_victim(clip, private.classnames, PeftConfig(method="adapter"))
    images, labels, _ = sample_batch(private, 3, seed=2)
    setting = DpSetting.from_dict(dp).resolve()
    expected = dp_sgd(per_example_gradients(victim, images, labels), 1.0, 0.5, torch.Generator().manual_seed(11),
                      setting.clipping)
    assert set(expected) == set(obs.gradients)
    for k, v in expected.items():
        assert torch.equal(v, obs.gradients[k]), k


def test_mip_adapter_on_every_device(device, tmp_path):
    """MIP's read-out (float64 solvers) and decoder on the trained tiny target, on each device."""
    obs, truth = make_observation(weights="tiny-mnist", peft=PeftConfig(method="adapter"), batch_size=1, seed=0,
                                  device=device)
    rec = attack_observation(obs, name="mip", weights="tiny-mnist", decoder="tiny-mnist-decoder", device=device)
    assert rec.images.device.type == "cpu" and rec.features is not None and rec.features.device.type == "cpu"
    assert int(rec.labels[0]) == int(truth.labels[0])
    _, ev = evaluate_reconstruction(rec, truth, tmp_path / "report", with_lpips=False, device=device)
    assert ev["feature_recovery"]["cosine_to_truth_mean"] > 0.99


@pytest.mark.skipif(DEVICES == ["cpu"], reason="no accelerator: the CPU path is tested in test_mip.py")
@pytest.mark.parametrize("method", ["coop", "full-visual"])
def test_mip_on_accelerators(device, method, tmp_path):
    if device.type == "cpu":
        pytest.skip("covered by test_mip.py")
    obs, truth = make_observation(weights="tiny-mnist", peft=PeftConfig(method=method), batch_size=1, seed=0,
                                  device=device)
    rec = attack_observation(obs, name="mip", weights="tiny-mnist", decoder="tiny-mnist-decoder", device=device)
    _, ev = evaluate_reconstruction(rec, truth, tmp_path / "report", with_lpips=False, device=device)
    assert int(rec.labels[0]) == int(truth.labels[0])
    assert ev["feature_recovery"]["cosine_to_truth_mean"] > 0.9
