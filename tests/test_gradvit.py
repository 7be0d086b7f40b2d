"""GradViT and the analytic ViT attacks: closed form, projection read-out, labels, presets, BN prior.

Random-init tiny-32 (mechanics and exactness, never leakage claims)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipleak.attacks import ATTACKS, PRESETS, GradViTConfig, make_config, run_attack
from clipleak.client import share
from clipleak.engine import EngineConfig, State
from clipleak.errors import ClipleakError
from clipleak.peft import PeftConfig, build_victim
from clipleak.priors import PriorCNN, bn_statistics_loss, load_prior, save_prior
from clipleak.recover import (
    ProjectionModel,
    closed_form_images,
    labels_from_features,
    pooled_tokens,
    projection_features,
)
from clipleak.report import save_loss, schedule_switches


def _obs(tiny, digits, n=1, method="full-visual", labels=False, seed=0):
    v = build_victim(tiny, digits, PeftConfig(method=method))
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    y = (torch.arange(n) * 3 + 2 + seed) % 10
    return v, x, y, share(v, x, y, include_labels=labels)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-30))


@pytest.mark.parametrize("method", ["full-visual", "full"])
def test_closed_form_recovers_a_batch1_image_exactly(tiny, digits, method):
    v, x, y, obs = _obs(tiny, digits, method=method)
    sol = closed_form_images(obs, v)
    assert sol.rank == sol.patches == 16
    assert _psnr(sol.images, x) >= 60  # measured: 147 dB (float32 gradients)
    rec = run_attack("closed-form", obs, v)
    assert rec.attack == "closed-form" and _psnr(rec.images, x) >= 60
    assert torch.equal(rec.labels, y)  # labels read off the projection gradient


def test_closed_form_refuses_a_batch(tiny, digits):
    v, _, _, obs = _obs(tiny, digits, n=2)
    with pytest.raises(ClipleakError, match="batch 1 only"):
        closed_form_images(obs, v)


def test_projection_gradient_model_matches_autograd(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, n=3)
    model = ProjectionModel(v)
    pred = model.gradient(pooled_tokens(tiny, x), y, 3)
    g = obs.gradients["clip.visual.proj"].double()
    assert float((pred - g).norm() / g.norm()) < 1e-5
    # each image's term is invariant to the scale of its pooled token
    assert torch.allclose(model.gradient(7.0 * pooled_tokens(tiny, x), y, 3), pred, atol=1e-9)


def test_projection_reads_feature_and_label_at_batch1(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, seed=3)
    pf = projection_features(obs, v)
    true = F.normalize(v.raw_image_features(x), dim=-1).detach()
    assert float((pf.features * true).sum()) > 0.9999
    assert torch.equal(pf.labels, y) and pf.residual < 1e-4


def test_projection_separates_a_batch(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, n=2, seed=1)
    g = torch.Generator().manual_seed(5)
    # the attacker's "public" starts: perturbed look-alikes with wrong labels, plus unrelated images
    starts = torch.cat([(x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1), torch.rand(6, 3, 32, 32,
                                                                                                 generator=g)])
    pf = projection_features(obs, v, public_images=starts, public_labels=torch.arange(8) % 10)
    true = F.normalize(v.raw_image_features(x), dim=-1).detach()
    cos = pf.features @ true.t()
    assert float(cos.max(0).values.min()) > 0.999, cos
    assert pf.separated == 2 and sorted(pf.labels.tolist()) == sorted(y.tolist())


def test_labels_from_known_features_reproduce_the_gradient(tiny, digits):
    v, x, y, obs = _obs(tiny, digits, n=4, seed=2)
    true = F.normalize(v.raw_image_features(x), dim=-1).detach()
    labels, off = labels_from_features(obs, v, true)
    assert torch.equal(labels, y)
    assert float(off.max()) < 1e-3


def _cnn(tmp_path, images: torch.Tensor) -> str:
    net = PriorCNN(32, 1, 10, width=4, depth=2)
    net.calibrate(images)
    return str(save_prior(net, tmp_path / "cnn.safetensors"))


def test_bn_prior_is_zero_on_its_own_statistics_and_grows_for_noise(tmp_path):
    g = torch.Generator().manual_seed(0)
    # smooth "digit-like" images: blurred sparse strokes, nothing like uniform noise
    strokes = (torch.rand(64, 1, 32, 32, generator=g) > 0.95).float()
    images = F.avg_pool2d(strokes, 5, stride=1, padding=2).clamp(0, 1).expand(-1, 3, -1, -1)
    net = load_prior(_cnn(tmp_path, images))
    assert isinstance(net, PriorCNN)
    own = float(bn_statistics_loss(net, images))
    noise = float(bn_statistics_loss(net, torch.rand(64, 3, 32, 32, generator=g)))
    assert own < 1e-4, own
    assert noise > 1.0 and noise > 1e4 * max(own, 1e-9), (own, noise)


@pytest.mark.parametrize("preset", ["dlg", "idlg", "ig", "gradvit"])
def test_each_preset_reduces_its_gradient_objective(tiny, digits, tmp_path, preset):
    v, x, y, obs = _obs(tiny, digits)
    settings = {"iterations": 24, "restarts": 1}
    if preset == "gradvit":
        settings["bn_prior"] = _cnn(tmp_path, torch.rand(16, 3, 32, 32))
    cfg = make_config(preset, **settings)
    rec = run_attack(preset, obs, v, cfg)
    g = rec.history["gradient"]
    assert len(g) == 24 and rec.attack == preset
    assert min(g[-4:]) < 0.5 * g[0], (g[0], g[-4:])
    assert rec.images.shape == x.shape and 0 <= float(rec.images.min()) and float(rec.images.max()) <= 1
    if preset in ("idlg", "gradvit"):  # labels read analytically first: exact at batch 1
        assert torch.equal(rec.labels, y) and rec.label_source.startswith("read off the update")
    if preset == "dlg":
        assert rec.label_source.startswith("inferred") and rec.meta["engine"]["optimizer"] == "lbfgs"


def test_lbfgs_presets_take_rgb_batches(tiny, digits):
    """L-BFGS flattens the image gradient; a conv backward hands it back channels-last at batch > 1."""
    v, x, y, obs = _obs(tiny, digits, n=2, labels=True)
    for preset, labels in (("dlg", "infer"), ("idlg", "known")):
        rec = run_attack(preset, obs, v, make_config(preset, iterations=2, restarts=1, labels=labels))
        assert rec.images.shape == (2, 3, 32, 32) and len(rec.history["gradient"]) == 2


def test_gradvit_schedule_switches_at_the_iteration_it_says(tiny, digits, tmp_path):
    v, x, y, obs = _obs(tiny, digits, labels=True)
    cfg = GradViTConfig(iterations=10, restarts=1, bn_prior=_cnn(tmp_path, torch.rand(16, 3, 32, 32)))
    rec = run_attack("gradvit", obs, v, cfg)
    switch = rec.meta["schedule"]["bn_prior"]["switch_iteration"]
    assert switch == 5
    # the report's loss curve marks this switch with the weights' change
    assert schedule_switches(rec.meta) == [(5, "bn_prior, patch, l2 on; gradient x0.5 at iteration 5")]
    save_loss(rec.history, tmp_path / "loss.png", schedule_switches(rec.meta))
    h = rec.history
    assert len(h["gradient"]) == 10 and len(h["bn_prior"]) == len(h["patch"]) == len(h["l2"]) == 10 - switch
    for it in range(10):
        after = it >= switch
        expect = (0.5 if after else 1.0) * h["gradient"][it] + 1e-4 * h["tv"][it]
        if after:
            j = it - switch
            expect += 0.1 * h["bn_prior"][j] + 1e-4 * h["patch"][j] + 1e-4 * h["l2"][j]
        assert h["total"][it] == pytest.approx(expect, rel=1e-5), it


def test_presets_name_their_source_and_defaults():
    for name in PRESETS:
        summary = ATTACKS[name].summary
        assert "Defaults:" in summary and any(y in summary for y in ("2019", "2020", "2022"))
    assert "lbfgs" in ATTACKS["dlg"].summary and "switch=0.5" in ATTACKS["gradvit"].summary
    with pytest.raises(ClipleakError, match="signed=False"):
        EngineConfig(optimizer="lbfgs", signed=True)


def test_patch_border_prior_sees_only_patch_borders():
    from clipleak.engine import patch_border_variation

    inside = torch.zeros(1, 3, 32, 32)
    inside[..., 2:6, 2:6] = 1.0  # an edge inside one 8x8 patch
    border = torch.zeros(1, 3, 32, 32)
    border[..., :, 8:] = 1.0  # an edge exactly on a patch border
    assert float(patch_border_variation(inside, 8)) == 0.0
    assert float(patch_border_variation(border, 8)) > 0.0
    assert State  # the engine's state type is what terms receive


def _mnist_obs(tiny, digits, n=2):
    """An observation that names the MNIST split (the attacker's public data), images from its public part."""
    from clipleak.data import DataSpec, load_public

    spec = DataSpec.parse("mnist", split_seed=0)
    public = load_public(spec, 32)
    v = build_victim(tiny, digits, PeftConfig(method="full-visual"))
    idx = torch.tensor([3, 700])[:n]
    x, y = public.images[idx], public.labels[idx]
    return v, x, y, share(v, x, y, data={**spec.to_dict(), "grayscale": public.grayscale}), public


def test_gradvit_starts_from_public_knowledge(tiny, digits):
    v, x, y, obs, public = _mnist_obs(tiny, digits)
    off = {"bn_prior": None, "bn_weight": 0.0}
    proto = run_attack("gradvit", obs, v, GradViTConfig(iterations=0, start="prototype", **off))
    assert torch.equal(proto.labels, y)  # read off the projection first (exact here)
    assert torch.allclose(proto.images, public.prototypes()[y].clamp(0, 1))
    near = run_attack("gradvit", obs, v, GradViTConfig(iterations=0, start="neighbours", start_k=1, **off))
    # K = 1: the public image of the read label nearest the read feature; the observed images are public
    # images themselves, so that is each image itself (the read-out is exact at this batch)
    assert torch.allclose(near.images, x, atol=1e-6)
    k3 = run_attack("gradvit", obs, v, GradViTConfig(iterations=0, start="neighbours", start_k=3, **off))
    assert not torch.allclose(k3.images, x, atol=1e-3)  # a mean of three digits
    with pytest.raises(ClipleakError, match="decoder"):
        GradViTConfig(start="decoder")
    with pytest.raises(ClipleakError, match="labels first"):
        run_attack("gradvit", obs, v, GradViTConfig(iterations=2, start="prototype", label_read="joint", **off))
    with pytest.raises(ClipleakError, match="start must be"):
        GradViTConfig(start="nearest")


def test_restarts_from_a_start_are_perturbed_copies():
    from clipleak.engine import PixelImages

    start = torch.rand(2, 3, 8, 8)
    p = PixelImages(8, start=start, start_noise=0.1)
    r0 = p.init(2, torch.Generator().manual_seed(5 * 1000 + 0))[0].detach().clone()
    r1 = p.init(2, torch.Generator().manual_seed(5 * 1000 + 1))[0].detach().clone()
    r1b = p.init(2, torch.Generator().manual_seed(5 * 1000 + 1))[0].detach().clone()
    assert torch.equal(r0, start)  # the first restart starts exactly there
    assert torch.equal(r1, r1b) and 0.03 < float((r1 - start).abs().mean()) < 0.12  # seeded, ~N(0, 0.1^2)
    assert p.describe()["start_noise"] == 0.1
    assert torch.equal(PixelImages(8, start=start).init(2, torch.Generator().manual_seed(1))[0], start)


def test_gradvit_feature_term_pulls_towards_the_read_features(tiny, digits):
    v, x, y, obs, _ = _mnist_obs(tiny, digits)
    cfg = GradViTConfig(iterations=12, restarts=1, bn_prior=None, bn_weight=0.0, start="prototype", lr=0.01,
                        feature_weight=1.0)
    rec = run_attack("gradvit", obs, v, cfg)
    f = rec.history["feature"]
    assert len(f) == 12 and f[-1] < f[0], f
    assert rec.meta["schedule"]["feature"]["before"] == 1.0  # on from the start, not switched


def test_engine_can_average_its_restarts(tmp_path):
    from safetensors.torch import load_file

    from clipleak.engine import PixelImages, Term, optimise
    from clipleak.engine.optimise import RESTARTS
    from clipleak.records import latest_checkpoint

    target = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    terms = [Term("fit", lambda s: (s.images - target).pow(2).mean())]
    param = PixelImages(8, start=torch.full((2, 3, 8, 8), 0.5), start_noise=0.2)
    cfg = EngineConfig(iterations=3, restarts=3, lr=0.01, signed=False, decay="none", combine="mean")
    res = optimise(param, terms, cfg, batch=2, num_classes=10, known_labels=torch.zeros(2, dtype=torch.long),
                   checkpoint=tmp_path / "ck")
    folder = latest_checkpoint(tmp_path / "ck")
    assert folder is not None
    saved = load_file(str(folder / RESTARTS))
    each = torch.stack([saved[f"{i}/images"] for i in range(3)])
    assert not torch.allclose(each[0], each[1])  # the restarts differ ...
    assert torch.allclose(res.images, each.mean(0))  # ... and the result is their mean
    with pytest.raises(ClipleakError, match="combine"):
        EngineConfig(combine="median")


@pytest.mark.slow
def test_gradvit_from_the_neighbours_start_beats_the_prototype_at_batch4():
    """README claim (private split, batches 0 and 1 of 4 digits, 200 steps x 2 restarts): GradViT started
    from the mean of the 8 public images nearest the feature read off the projection gradient scores
    14.4 dB / 68% re-identification against the class prototype's 13.3 dB / 9%. Margins asserted: +0.5 dB
    and +30 points (measured +1.1 dB and +59 points). About 10 minutes on one busy thread."""
    from clipleak.api import attack_observation, make_observation
    from clipleak.client import load_private
    from clipleak.data import public_for_observation
    from clipleak.evaluation import evaluate

    psnr, reid = {"attack": [], "prototype": []}, {"attack": [], "prototype": []}
    for draw in (0, 1):
        obs, truth = make_observation(weights="tiny-mnist", peft=PeftConfig(method="full-visual"), batch_size=4,
                                      seed=draw)
        spec, public = public_for_observation(obs.meta)
        rec = attack_observation(obs, name="gradvit", weights="tiny-mnist", start="neighbours", lr=0.01,
                                 start_noise=0.05, iterations=200, restarts=2)
        ev = evaluate(rec, truth, public.prototypes(), with_lpips=False,
                      reid_pool=load_private(spec, int(obs.meta["image_size"])))
        for m in psnr:
            psnr[m].append(ev["methods"][m]["psnr_mean"])
            reid[m].append(ev["reidentification"][m])
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(psnr["attack"]) > mean(psnr["prototype"]) + 0.5, psnr
    assert mean(reid["attack"]) > mean(reid["prototype"]) + 0.30, reid


@pytest.mark.slow
def test_tiny64_projection_decoder_beats_the_prototype_at_batch1():
    """README / docs claim (tiny-mnist-64, private split, batch 1): the projection read-out + the
    tiny-mnist-64-decoder scored 16.4 dB / 94% re-identification on draws 0-7 against the prototype's
    13.9 dB / 28%; on draws 0-3 (asserted here) 17.5 against 13.7 dB and 94%, labels 100%. Margins: +2 dB
    and re-identification >= 85%. Needs the tiny-mnist-64 artifacts (built on first use: an hour)."""
    from clipleak.api import attack_observation, make_observation
    from clipleak.client import load_private
    from clipleak.data import public_for_observation
    from clipleak.evaluation import evaluate

    psnr, proto, reid, labels = [], [], [], []
    for draw in range(4):
        obs, truth = make_observation(arch="tiny-64", weights="tiny-mnist-64", peft=PeftConfig(method="full-visual"),
                                      batch_size=1,
                                      seed=draw)
        spec, public = public_for_observation(obs.meta)
        rec = attack_observation(obs, name="projection", weights="tiny-mnist-64", decoder="tiny-mnist-64-decoder")
        ev = evaluate(rec, truth, public.prototypes(), with_lpips=False,
                      reid_pool=load_private(spec, int(obs.meta["image_size"])))
        psnr.append(ev["methods"]["attack"]["psnr_mean"])
        proto.append(ev["methods"]["prototype"]["psnr_mean"])
        reid.append(ev["reidentification"]["attack"])
        labels.append(ev["label_count_accuracy"])
    assert sum(psnr) / 4 > sum(proto) / 4 + 2.0, (psnr, proto)
    assert sum(reid) / 4 >= 0.85 and min(labels) == 1.0, (reid, labels)


def test_tiny64_artifacts_follow_the_tiny_mnist_recipe():
    from dataclasses import replace

    from clipleak import artifacts
    from clipleak.models import arch_config

    t64, t32 = artifacts.get("tiny-mnist-64").recipe, artifacts.get("tiny-mnist").recipe
    assert t64.arch == "tiny-64" and replace(t64, arch="tiny-32") == t32  # trained the same way
    vision = arch_config("tiny-64")["vision_cfg"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 64  # 64 tokens
    cnn = artifacts.get("tiny-mnist-64-cnn").recipe
    assert (cnn.kind, cnn.arch) == ("cnn", "tiny-64")
    dec, dec32 = artifacts.get("tiny-mnist-64-decoder").recipe, artifacts.get("tiny-mnist-decoder").recipe
    assert (dec.kind, dec.target, dec.arch) == ("decoder", "tiny-mnist-64", "tiny-64")
    assert replace(dec, target="tiny-mnist", arch="tiny-32") == dec32  # tiny-mnist-decoder's recipe


def test_lean_forward_and_flat_distance_equal_the_models_own(tiny, digits):
    """The attack step's lean image-tower forward (models.lean) and the flattened gradient distance give
    open_clip's features and the per-tensor cosine distance, value and image gradient (the double
    backward), up to float rounding (measured: features equal, image gradient within 5e-7 relative)."""
    import copy
    import dataclasses

    from clipleak.attacks import gradient_matching_term
    from clipleak.models import lean_encode_image, lean_supported, math_attention

    assert lean_supported(tiny)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), math_attention():
        ref = tiny.model.encode_image(tiny.normalize(x))
        assert float((lean_encode_image(tiny, x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    v, _, y, obs = _obs(tiny, digits, n=2)
    params = list(v.trainable().values())
    targets = [obs.gradients[n].double() for n in v.trainable()]
    cand = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    with math_attention():
        value = gradient_matching_term(v, obs).fn(State(cand, y, 0, 1))
        (g_lean,) = torch.autograd.grad(value, [cand])
        # the reference: the model's own forward, the per-tensor cosine distance (sums in float64)
        gs = torch.autograd.grad(v.loss(cand, y), params, create_graph=True)
        dot = sum((g.double() * t).sum() for g, t in zip(gs, targets, strict=True))
        gn = torch.sqrt(sum(g.double().pow(2).sum() for g in gs))
        tn = torch.sqrt(sum(t.pow(2).sum() for t in targets))
        ref_value = 1 - dot / (gn * tn)
        (g_ref,) = torch.autograd.grad(ref_value, [cand])
    assert abs(float(value.detach()) - float(ref_value.detach())) < 1e-6
    assert float((g_lean - g_ref).abs().max()) < 1e-4 * float(g_ref.abs().max())
    # an architecture the lean forward does not cover falls back to the model's own forward
    odd = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model))
    odd.model.visual.transformer.resblocks[0].ls_1 = torch.nn.Dropout(0.0)
    assert not lean_supported(odd)
    vo = build_victim(odd, digits, PeftConfig(method="full-visual"))
    with torch.no_grad(), math_attention():
        assert torch.equal(vo.loss(x[:2], y, lean=True), vo.loss(x[:2], y))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_gradient_distance_matches_the_per_tensor_sums(metric):
    from clipleak.engine import cosine_gradient_distance, gradient_distance, l2_gradient_distance

    g = torch.Generator().manual_seed(0)
    shapes = [(128, 3, 8, 8), (17, 128), (128,), (512, 128), (1,)]
    grads = [torch.randn(s, generator=g) * 10.0 ** (i - 2) for i, s in enumerate(shapes)]
    targets = [t + 0.3 * torch.randn(t.shape, generator=g) * t.abs().mean() for t in grads]
    g64, t64 = [t.double() for t in grads], [t.double() for t in targets]
    if metric == "cosine":
        dot = sum((a * b).sum() for a, b in zip(g64, t64, strict=True))
        ref = 1 - dot / torch.sqrt(sum(a.pow(2).sum() for a in g64) * sum(b.pow(2).sum() for b in t64))
        old = cosine_gradient_distance(grads, targets)
        tol = 1e-6
    else:
        ref = sum((a - b).pow(2).sum() for a, b in zip(g64, t64, strict=True))
        old = l2_gradient_distance(grads, targets)
        tol = 1e-6 * float(ref)
    assert abs(float(gradient_distance(metric, targets)(grads)) - float(ref)) < tol
    assert abs(float(old) - float(ref)) < tol
    with pytest.raises(ClipleakError, match="unknown gradient distance"):
        gradient_distance("l1", targets)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_gradient_distance_has_the_right_gradient(metric):
    from clipleak.engine import gradient_distance

    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    grads = [torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)]
    dist = gradient_distance(metric, targets)
    assert torch.autograd.gradcheck(lambda a, b: dist([a, b]), tuple(grads))
