from __future__ import annotations

import pytest
import torch

from clipleak.errors import ClipleakError
from clipleak.models import build_model, file_sha256, load_state_dict_file, save_weights


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


def test_pretrained_tag_is_refused_with_advice():
    with pytest.raises(ClipleakError, match="never downloads"):
        build_model("ViT-B-32", "openai")


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
