"""Feature recovery from PEFT updates: exact algebra on the tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipleak.client import share
from clipleak.peft import PeftConfig, build_victim
from clipleak.recover import adapter_features, predict_labels, text_jacobian


def _x(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_adapter_gradient_reveals_the_exact_feature_with_sign(tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="adapter"))
    for seed in range(3):
        x = _x(1, seed)
        obs = share(v, x, torch.tensor([seed]))
        f = adapter_features(obs, v).features
        with torch.no_grad():
            true = F.normalize(v.raw_image_features(x), dim=-1)
        assert float((f * true).sum()) > 0.9999  # same direction, same sign


def test_predicted_label_is_the_classifier_decision(tiny, digits):
    v = build_victim(tiny, digits, PeftConfig(method="adapter"))
    x = _x(1, 5)
    with torch.no_grad():
        f = F.normalize(v.raw_image_features(x), dim=-1)
        assert torch.equal(predict_labels(v, f), v(x).argmax(-1))


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_gradient_is_text_jacobian_times_feature_term(tiny, digits, class_specific):
    """The CoOp context gradient equals J^T dL/dT exactly (cosine 1 to autograd), shared or
    class-specific context (block-diagonal Jacobian)."""
    v = build_victim(tiny, digits, PeftConfig(method="coop", class_specific=class_specific))
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


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_fit_jacobian_is_forward_mode_ad_of_its_residual(tiny, digits, class_specific):
    """The CoOp fit's closed-form Jacobian (through the softmax, the normalisation and the whitening) is what
    forward-mode AD of its residual gives, with and without the public-feature prior, at batch 3."""
    from functools import partial

    from clipleak.recover import CoopGradientModel
    from clipleak.recover.coop_model import ReducedFit
    from clipleak.recover.solvers import whitening

    v = build_victim(tiny, digits, PeftConfig(method="coop", class_specific=class_specific))
    obs = share(v, _x(3, 2), torch.tensor([3, 7, 7]))
    model = CoopGradientModel(v)
    with torch.no_grad():
        public = v.raw_image_features(_x(40, 3))
    fit = ReducedFit(model, model.reduce(obs.gradients["prompt.ctx"].reshape(-1)), whitening(public))
    u = fit.whitening.coords(public[:3]).reshape(-1)
    u = u + 0.1 * torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
    labels = torch.tensor([1, 4, 7])
    for prior in (0.0, 0.03):
        ad = torch.func.jacfwd(partial(fit.residual, labels, prior))(u)
        ours = fit.jacobian(labels, prior, u)
        assert ours.shape == ad.shape
        assert float((ours - ad).norm() / ad.norm()) < 1e-10


def test_coop_fit_recovers_feature_and_label_on_a_trained_target(short_run):
    """On a trained target the CoOp context gradient pins down the image feature and the label: the fit
    (public-feature starts + Levenberg-Marquardt on the exact J^T dL/dT model) gets both back."""
    from clipleak.api import make_observation
    from clipleak.data import DataSpec, load_public
    from clipleak.peft import rebuild_victim
    from clipleak.recover import coop_features, public_features

    weights, _ = short_run
    public = load_public(DataSpec(), 32)
    public = public.subset(torch.arange(0, len(public), 4))  # 1,000 public starts keep the test fast
    cos, hits = [], 0
    for seed in range(3):
        obs, truth = make_observation(weights=str(weights), peft=PeftConfig(method="coop"), batch_size=1, seed=seed)
        v = rebuild_victim(obs)
        fit = coop_features(obs, v, public_features(v.clip_info, public), public.labels)
        feats, labels, residual = fit.features, fit.labels, fit.residual
        assert int(fit.label_coefficients.argmin()) == int(labels[0])  # the label read off the gradient
        with torch.no_grad():
            true = F.normalize(v.raw_image_features(truth.images), dim=-1)
        cos.append(float((feats * true).sum()))
        hits += int(labels[0] == truth.labels[0])
        print(seed, cos[-1], int(labels[0]), int(truth.labels[0]), residual)
    assert min(cos) > 0.99, cos
    assert hits == 3


def test_adapter_batch_features_are_distinct_or_flagged(tiny, digits):
    """A batch never yields duplicate or negated feature directions. On a random-init CLIP (all features
    nearly parallel) the rows cannot be separated per image, and the recovery says how many it separated."""
    v = build_victim(tiny, digits, PeftConfig(method="adapter"))
    x = _x(4, 11)
    obs = share(v, x, torch.tensor([1, 2, 3, 4]))
    rec = adapter_features(obs, v)
    f = rec.features
    assert f.shape == (4, f.shape[1])
    cos = (f @ f.t()).abs() - torch.eye(4)
    assert float(cos.max()) < 0.99  # distinct directions, none negated
    assert 0 <= rec.separated <= 4
    from clipleak.recover import recovered_features

    est = recovered_features(obs, v)
    if est.separated < 4:
        assert est.notes and "separated" in est.notes[0]
