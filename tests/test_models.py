from __future__ import annotations

import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipleak.errors import ClipleakError
from clipleak.models import build_model, file_sha256, load_state_dict_file, save_weights
from clipleak.models import pretrained as pretrained_mod


def test_tiny_config_matches_spec(tiny):
    m = tiny.model
    assert tiny.image_size == 32
    assert m.visual.patch_size == (8, 8) or m.visual.conv1.kernel_size == (8, 8)  # 16 patch tokens
    assert len(m.visual.transformer.resblocks) == 4
    assert m.visual.transformer.width == 128
    assert m.visual.pool_type == "avg"
    assert len(m.transformer.resblocks) == 3 and m.transformer.width == 128
    assert m.context_length == 32
    assert m.text_projection.shape[-1] == 128
    assert not any(p.requires_grad for p in m.parameters())


def test_tiny64_variant():
    clip = build_model("tiny-64")
    assert clip.image_size == 64
    with torch.no_grad():
        f = clip.model.encode_image(torch.zeros(1, 3, 64, 64))
    assert f.shape == (1, 128)


def test_weights_round_trip_safetensors_and_torch(tmp_path, tiny):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tok = tiny.tokenizer(["a photo of a three.", "a photo of a seven."])
    src = build_model("tiny-32", init_seed=123)
    p = tmp_path / "w.safetensors"
    sha = save_weights(src.model, p)
    assert sha == file_sha256(p)
    loaded = build_model("tiny-32", p)
    assert loaded.weights_sha256 == sha
    with torch.no_grad():
        assert torch.equal(src.model.encode_image(x), loaded.model.encode_image(x))
        assert torch.equal(src.model.encode_text(tok), loaded.model.encode_text(tok))
    # an open_clip training checkpoint ({"state_dict": ...} with DDP "module." prefixes)
    pt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in src.model.state_dict().items()}}, pt)
    loaded2 = build_model("tiny-32", pt)
    with torch.no_grad():
        assert torch.equal(src.model.encode_image(x), loaded2.model.encode_image(x))


def test_random_init_is_seeded():
    a, b = build_model("tiny-32", init_seed=5), build_model("tiny-32", init_seed=5)
    c = build_model("tiny-32", init_seed=6)
    pa, pb, pc = (m.model.visual.proj for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_arch_and_missing_file(tmp_path):
    with pytest.raises(ClipleakError, match="unknown architecture"):
        build_model("no-such-net")
    with pytest.raises(ClipleakError, match="not found"):
        build_model("tiny-32", tmp_path / "missing.safetensors")


def test_wrong_architecture_weights(tmp_path):
    p = tmp_path / "w64.safetensors"
    save_weights(build_model("tiny-64").model, p)
    with pytest.raises(ClipleakError, match="do not fit"):
        build_model("tiny-32", p)


class Evil:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""


def test_pickled_object_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(ClipleakError):
        load_state_dict_file(p)


# Every local format open_clip writes or reads (TorchScript and big_vision .npz aside: they are refused).
def _plain(sd: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(sd, path)


def _safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _training_checkpoint(sd: dict[str, torch.Tensor], path: Path) -> None:
    """What open_clip's trainer saves from a DDP run: epoch, name, the state dict with ``module.`` prefixes,
    the optimizer's state and the AMP scaler's."""
    params = [torch.nn.Parameter(v.clone()) for v in list(sd.values())[:2]]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": opt.state_dict(), "scaler": {"scale": 65536.0, "growth_factor": 2.0}}, path)


def _compiled(sd: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({"module._orig_mod." + k: v for k, v in sd.items()}, path)


FORMATS = {"model.safetensors": _safetensors, "state_dict.pt": _plain, "open_clip_pytorch_model.bin": _plain,
           "epoch_3.pt": _training_checkpoint, "compiled.pth": _compiled}


def _round_trip(arch: str, sd: dict[str, torch.Tensor], tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    FORMATS[name](sd, path)
    loaded = build_model(arch, path)
    back = loaded.model.state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    assert loaded.weights == str(path) and loaded.weights_sha256 == file_sha256(path)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_local_formats_round_trip(tmp_path, name):
    sd = build_model("tiny-32", init_seed=7).model.state_dict()
    _round_trip("tiny-32", sd, tmp_path, name)


@pytest.fixture(scope="module")
def vitb32_state() -> dict[str, torch.Tensor]:
    """A random-init ViT-B-32 as open_clip builds it (about 600 MB in float32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model("ViT-B-32", pretrained=None).state_dict()


def test_vitb32_safetensors_round_trip(tmp_path, vitb32_state):
    _round_trip("ViT-B-32", vitb32_state, tmp_path, "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_vitb32_all_formats_round_trip(tmp_path, vitb32_state, name):
    _round_trip("ViT-B-32", vitb32_state, tmp_path, name)


def _hub_file(cache: Path, repo: str, filename: str) -> Path:
    """Where huggingface_hub keeps ``repo``'s ``filename`` at ``main`` (the layout hf_hub_download writes)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    return snap / filename


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache of this test's own, offline."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_pretrained_tag_loads_from_hub_cache(hub_cache, vitb32_state):
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].rstrip("/")
    path = _hub_file(hub_cache, repo, "open_clip_model.safetensors")
    _safetensors(vitb32_state, path)
    clip = build_model("ViT-B-32", "OpenAI")
    assert clip.weights == "openai"
    assert clip.weights_sha256 == "openai:" + file_sha256(path)
    back = clip.model.state_dict()
    assert all(torch.equal(back[k], v) for k, v in vitb32_state.items())
    # OpenAI's weights were trained with QuickGELU: the model is built with it, as open_clip's -quickgelu configs
    acts = {type(m).__name__ for m in clip.model.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    assert clip.image_size == 224
    # the same file given as a path is another model (GELU): its identity is not the tag's
    local = build_model("ViT-B-32", path)
    assert local.weights_sha256 == file_sha256(path) != clip.weights_sha256


def test_hf_hub_repo_loads_from_hub_cache(hub_cache):
    src = build_model("tiny-32", init_seed=3)
    repo = "someone/tiny-clip"
    save_weights(src.model, _hub_file(hub_cache, repo, "open_clip_model.safetensors"))
    config = {"model_cfg": {"quick_gelu": False}, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    _hub_file(hub_cache, repo, "open_clip_config.json").write_text(json.dumps(config))
    clip = build_model("tiny-32", f"hf-hub:{repo}")
    assert clip.weights == f"hf-hub:{repo}" and clip.weights_sha256.startswith(f"hf-hub:{repo}:")
    assert clip.mean == (0.5, 0.5, 0.5) and clip.std == (0.5, 0.5, 0.5)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(src.model.encode_image(x), clip.model.encode_image(x))
    with pytest.raises(ClipleakError, match="hf-hub:ORG/NAME"):
        build_model("tiny-32", "hf-hub:no-slash")


def test_tag_offline_and_not_cached_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from clipleak.cli import main

    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    start = time.monotonic()
    rc = main(["share", "--arch", "ViT-B-32", "--weights", "openai", "--out", str(tmp_path / "o")])
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "'openai'" in lines[0] and "ViT-B-32" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert str(tmp_path / "hf" / "hub") in lines[0]
    assert "pretrained='openai'" in lines[0] and "local file" in lines[0]
    assert not (tmp_path / "o.json").exists()


def test_tag_not_cached_and_hub_unreachable_fails_fast(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pretrained_mod.hf_constants, "HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was tried although the hub cannot be reached")

    monkeypatch.setattr(pretrained_mod.socket, "create_connection", no_network)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_download)
    with pytest.raises(ClipleakError, match="laion2b_s34b_b79k.*cannot be reached.*run once online"):
        build_model("ViT-B-32", "laion2b_s34b_b79k")


def test_unknown_tag_lists_the_known_ones(hub_cache):
    with pytest.raises(ClipleakError, match="known tags for ViT-B-32: openai, .*laion2b_s34b_b79k"):
        build_model("ViT-B-32", "opanai")
    with pytest.raises(ClipleakError, match="no pretrained tags for tiny-32"):
        build_model("tiny-32", "openai")
