from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipleak.errors import ClipleakError
from clipleak.peft import PeftConfig, build_victim


@pytest.mark.parametrize(
    "method,expected",
    [("coop", {"prompt.ctx"}), ("adapter", {"adapter.fc1.weight", "adapter.fc2.weight"})],
)
def test_only_chosen_parameters_train(tiny, digits, method, expected):
    v = build_victim(tiny, digits, PeftConfig(method=method))
    assert set(v.trainable()) == expected


def test_full_visual_trains_only_the_image_encoder(tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="full-visual"))
    names = set(v.trainable())
    assert names and all(n.startswith("clip.visual.") for n in names)
    n_visual = sum(1 for n, _ in v.clip.visual.named_parameters())
    assert len(names) == n_visual


def test_class_specific_context_shape(tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="coop", n_ctx=3, class_specific=True))
    assert v.trainable()["prompt.ctx"].shape == (10, 3, 128)


def test_coop_prompt_truncation_is_exact(tiny, digits):
    """Prompt text features via the cut sequence equal open_clip's full-length encode_text."""
    v = build_victim(tiny, digits, PeftConfig(method="full"))
    with torch.no_grad():
        ours = v.text_features()
        ref = F.normalize(tiny.model.encode_text(v.class_tokens), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_coop_context_of_real_words_reproduces_the_prompt(tiny, digits):
    """With the context set to the embeddings of 'a photo of a', CoOp equals the hand prompt."""
    v = build_victim(tiny, digits, PeftConfig(method="coop", n_ctx=4))
    words = tiny.tokenizer(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        v.prompt.ctx.copy_(tiny.model.token_embedding(words))
        ours = v.text_features()
        ref = F.normalize(tiny.model.encode_text(tiny.tokenizer([f"a photo of a {d}." for d in digits])), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_gradient_nonzero_only_for_chosen(tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="adapter"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    g = v.gradient(x, torch.tensor([1, 2]))
    assert set(g) == {"adapter.fc1.weight", "adapter.fc2.weight"}
    assert all(t.abs().sum() > 0 for t in g.values())
    assert all(p.grad is None for p in v.parameters())


def test_bad_config():
    with pytest.raises(ClipleakError):
        PeftConfig(method="lora")
    with pytest.raises(ClipleakError):
        PeftConfig(template="no placeholder")


def test_full_finetune_victims_do_not_unfreeze_the_shared_model(tiny, digits):
    """A full-visual victim trains its own copy: the model it was built from stays frozen, and a CoOp
    victim built on the same model afterwards shares only its prompt."""
    full = build_victim(tiny, digits, PeftConfig(method="full-visual"))
    assert any(p.requires_grad for p in full.trainable().values())
    assert not any(p.requires_grad for p in tiny.model.parameters())
    coop = build_victim(tiny, digits, PeftConfig(method="coop"))
    assert set(coop.trainable()) == {"prompt.ctx"}
    assert len(full.trainable()) > 1  # the full-visual victim is unaffected by the later one
