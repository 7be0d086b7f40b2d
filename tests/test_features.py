"""Feature recovery from PEFT updates: exact algebra on the tiny model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipleak.attacks.features import adapter_features, predict_labels, text_jacobian
from clipleak.observation import share
from clipleak.peft import PeftConfig, build_victim


def _x(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_adapter_gradient_reveals_the_exact_feature_with_sign(tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="adapter"))
    for seed in range(3):
        x = _x(1, seed)
        obs = share(v, x, torch.tensor([seed]))
        f = adapter_features(obs, v)
        with torch.no_grad():
            true = F.normalize(v.raw_image_features(x), dim=-1)
        assert float((f * true).sum()) > 0.9999  # same direction, same sign


def test_predicted_label_is_the_classifier_decision(tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="adapter"))
    x = _x(1, 5)
    with torch.no_grad():
        f = F.normalize(v.raw_image_features(x), dim=-1)
        assert torch.equal(predict_labels(v, f), v(x).argmax(-1))


def test_coop_gradient_is_text_jacobian_times_feature_term(tiny, digits):
    """The CoOp context gradient equals J^T dL/dT exactly (cosine 1 to autograd)."""
    v = build_victim(tiny, digits, PeftConfig(method="coop"))
    x, y = _x(2, 1), torch.tensor([3, 7])
    obs = share(v, x, y)
    jac, text = text_jacobian(v)
    t = text.clone().requires_grad_(True)
    with torch.no_grad():
        f = F.normalize(v.raw_image_features(x), dim=-1)
    loss = F.cross_entropy(v.logit_scale().detach() * f @ t.t(), y)
    (a,) = torch.autograd.grad(loss, t)
    ours = jac.t() @ a.reshape(-1)
    ref = obs.gradients["prompt.ctx"].reshape(-1)
    assert float(F.cosine_similarity(ours, ref, dim=0)) > 0.99999
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-5)
