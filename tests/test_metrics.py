"""Metrics on hand-computable cases, Hungarian pairing, re-identification and the evaluation verdict."""

from __future__ import annotations

import json
import math
import urllib.request
from dataclasses import dataclass

import pytest
import torch

from clipleak.errors import ClipleakError
from clipleak.evaluation import evaluate, metrics
from clipleak.evaluation.metrics import (
    PSNR_CAP,
    label_accuracy,
    label_count_accuracy,
    lpips_distance,
    lpips_status,
    pair_by_psnr,
    psnr,
    reid_rate,
    reidentify,
    ssim,
    ssim_kernel_size,
)
from clipleak.records import Reconstruction, Truth


@dataclass
class Pool:
    images: torch.Tensor
    labels: torch.Tensor


def const(value: float, n: int = 1, size: int = 16) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


def digit_prototypes(k: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Digit-like class means: dark background with a bright random stroke per class."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.zeros(k, 3, size, size)
    for c in range(k):
        r0, c0 = (int(v) for v in torch.randint(1, size // 2, (2,), generator=g))
        protos[c, :, r0 : r0 + size // 3, c0 : c0 + 3] = 0.9
        protos[c, :, r0 : r0 + 3, c0 : c0 + size // 3] = 0.9
    return protos


def noisy(protos: torch.Tensor, labels: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = protos[labels] + sigma * torch.randn(protos[labels].shape, generator=g)
    return x.clamp(0, 1)


# -------------------------------------------------------------------------------------------- PSNR


def test_psnr_constant_images_hand_value() -> None:
    # MSE = 0.1^2 = 0.01 -> 10 log10(1 / 0.01) = 20 dB
    got = psnr(const(0.3, 2), const(0.4, 2))
    assert got.shape == (2,)
    assert torch.allclose(got, torch.full((2,), 20.0, dtype=got.dtype), atol=1e-4)


def test_psnr_identical_is_capped_and_finite() -> None:
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = psnr(x, x.clone())
    assert got.tolist() == [PSNR_CAP] * 3
    json.dumps(got.tolist(), allow_nan=False)


def test_psnr_is_per_image() -> None:
    a = torch.cat([const(0.0), const(0.5)])
    b = torch.cat([const(0.1), const(0.5)])
    got = psnr(a, b)
    assert got[0].item() == pytest.approx(20.0, abs=1e-4)
    assert got[1].item() == PSNR_CAP


def test_psnr_rejects_shape_mismatch() -> None:
    with pytest.raises(ClipleakError):
        psnr(const(0.0, 2), const(0.0, 3))


# -------------------------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ssim(x, x.clone()), torch.ones(2, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("size", [8, 32])
def test_ssim_constant_images_hand_value(size: int) -> None:
    a, b = 0.2, 0.7
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances are 0: the C2 term is C2/C2 = 1
    got = ssim(const(a, 1, size), const(b, 1, size))
    assert got.item() == pytest.approx(expected, abs=1e-4)


def test_ssim_kernel_size_fits_small_images() -> None:
    assert ssim_kernel_size(32, 32) == 11
    assert ssim_kernel_size(8, 8) == 7
    assert ssim_kernel_size(7, 9) == 7
    assert ssim_kernel_size(4, 4) == 3
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ClipleakError):
        ssim(x[:, :, :2, :2], x[:, :, :2, :2])


# ------------------------------------------------------------------------------------ labels, pairing


def test_label_accuracy() -> None:
    assert label_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    with pytest.raises(ClipleakError):
        label_accuracy(torch.tensor([1]), torch.tensor([1, 2]))
    # order-free: {1, 1, 2, 5} vs {1, 2, 2, 5} share 1, 2, 5
    assert label_count_accuracy(torch.tensor([5, 1, 2, 1]), torch.tensor([1, 2, 2, 5])) == 0.75


def test_pair_by_psnr_recovers_permutation() -> None:
    g = torch.Generator().manual_seed(4)
    truth = torch.rand(7, 3, 16, 16, generator=g)
    shuffle = torch.randperm(7, generator=g)
    recon = (truth[shuffle] + 0.02 * torch.randn(7, 3, 16, 16, generator=g)).clamp(0, 1)
    perm = pair_by_psnr(recon, truth)
    assert perm.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(7))
    assert torch.allclose(recon[perm], truth, atol=0.1)
    # recon[j] = truth[shuffle[j]], so truth[i] is matched with j = shuffle^-1[i]
    assert torch.equal(perm, torch.argsort(shuffle))


def test_pair_by_psnr_batch_of_one() -> None:
    x = torch.rand(1, 3, 8, 8)
    assert pair_by_psnr(x, torch.rand(1, 3, 8, 8)).tolist() == [0]


# ---------------------------------------------------------------------------------- re-identification


def test_reidentify_single_trial() -> None:
    g = torch.Generator().manual_seed(5)
    cands = torch.rand(5, 3, 8, 8, generator=g)
    assert reidentify(cands[3], cands, 3)
    assert not reidentify(cands[3], cands, 1)
    tie = torch.stack([cands[0], cands[0]])
    assert not reidentify(cands[0], tie, 0)  # a tie is not a re-identification


def _reid_setup(k_classes: int = 3, per_class: int = 40, size: int = 16):
    protos = digit_prototypes(k_classes, size, seed=6)
    labels = torch.arange(k_classes).repeat_interleave(per_class)
    pool = Pool(images=noisy(protos, labels, 0.15, seed=7), labels=labels)
    # the client's batch is part of the private pool, as in the real data flow
    idx = torch.tensor([0, per_class + 1, 2 * per_class + 2, 5, per_class + 9])
    return protos, pool, pool.images[idx].clone(), pool.labels[idx].clone()


def test_reid_true_image_always_found() -> None:
    _, pool, truth, labels = _reid_setup()
    assert reid_rate(truth, truth, labels, pool, k=10, draws=5, seed=0) == 1.0


def test_reid_prototype_near_chance_and_seeded() -> None:
    protos, pool, truth, labels = _reid_setup()
    rate = reid_rate(protos[labels], truth, labels, pool, k=10, draws=20, seed=0)  # 100 trials
    assert rate <= 0.35
    assert rate == reid_rate(protos[labels], truth, labels, pool, k=10, draws=20, seed=0)


def test_reid_pool_too_small_is_explained() -> None:
    _, pool, truth, labels = _reid_setup(per_class=5)
    with pytest.raises(ClipleakError, match="use a smaller k"):
        reid_rate(truth, truth, labels, pool, k=10)


# ---------------------------------------------------------------------------------------------- LPIPS


def test_lpips_status_is_honest() -> None:
    ok, note = lpips_status()
    assert isinstance(ok, bool) and isinstance(note, str) and note
    x = torch.rand(2, 3, 32, 32)
    d = lpips_distance(x, x)
    if ok:
        assert d is not None and d.shape == (2,)
    else:
        assert "LPIPS unavailable" in note
        assert d is None


def test_lpips_missing_weights_gives_none(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(metrics.torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ok, note = lpips_status()
    assert not ok
    assert metrics.ALEXNET_FILE in note and str(tmp_path / "hub" / "checkpoints") in note
    assert lpips_distance(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)) is None
    ev = evaluate(Reconstruction(const(0.5), torch.tensor([0]), "observation", "test"),
                  Truth(const(0.4), torch.tensor([0])), const(0.3))
    assert ev["lpips"] == {"available": False, "note": note}
    assert all(ev["methods"][m]["lpips"] is None and ev["methods"][m]["lpips_mean"] is None
               for m in ("attack", "blank", "prototype"))


def test_lpips_loads_local_weights_without_network(tmp_path, monkeypatch) -> None:
    """With a (here random) AlexNet file in the hub cache, LPIPS is built offline and behaves."""
    from torchvision.models import alexnet

    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    feats = {f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}
    torch.save(feats, ckpt / metrics.ALEXNET_FILE)
    monkeypatch.setattr(metrics.torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("LPIPS tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    ok, _ = lpips_status()
    assert ok
    g = torch.Generator().manual_seed(8)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    same = lpips_distance(x, x)
    diff = lpips_distance(x, y)
    assert same is not None and diff is not None
    assert torch.allclose(same, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert (diff > 0).all()
    small = lpips_distance(x[:, :, :8, :8], y[:, :, :8, :8])  # upsampled to 32 internally
    assert small is not None and small.shape == (2,)
    metrics._LPIPS_CACHE.clear()


# ----------------------------------------------------------------------------------------- evaluate


def test_evaluate_perfect_reconstruction_beats_both() -> None:
    protos = digit_prototypes()
    labels = torch.tensor([0, 1, 2, 3])
    truth = Truth(noisy(protos, labels, 0.1, seed=9), labels)
    rec = Reconstruction(truth.images.clone(), labels.clone(), "observation", "test")
    ev = evaluate(rec, truth, protos, with_lpips=False)
    json.dumps(ev, allow_nan=False)
    assert ev["methods"]["attack"]["psnr"] == [PSNR_CAP] * 4
    assert ev["methods"]["attack"]["psnr_mean"] == PSNR_CAP
    assert ev["methods"]["attack"]["ssim_mean"] == pytest.approx(1.0, abs=1e-6)
    assert ev["verdict"]["beat_blank"] and ev["verdict"]["beat_prototype"]
    assert ev["verdict"]["text"].startswith("The attack beat both baselines: 100.0 dB PSNR")
    assert ev["label_accuracy"] == 1.0
    assert ev["pairing"] == [0, 1, 2, 3]
    assert ev["lpips"]["available"] is False and "disabled" in ev["lpips"]["note"]
    assert ev["reidentification"] is None


def test_evaluate_noise_does_not_beat_prototype() -> None:
    protos = digit_prototypes()
    labels = torch.tensor([0, 1, 2, 3, 1])
    truth = Truth(noisy(protos, labels, 0.05, seed=10), labels)
    noise = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    rec = Reconstruction(noise, labels.clone(), "observation", "test")
    ev = evaluate(rec, truth, protos, with_lpips=False)
    v = ev["verdict"]
    assert not v["beat_prototype"] and not v["beat_blank"]
    assert "did NOT beat" in v["text"] and "class prototype" in v["text"]
    m = ev["methods"]
    proto_db = f"{m['prototype']['psnr_mean']:.1f} dB"
    assert proto_db in v["text"]
    assert m["attack"]["psnr_mean"] < m["prototype"]["psnr_mean"]
    # blank baseline by hand: PSNR of an all-black image = -10 log10(mean(x^2))
    blank = [-10 * math.log10(float((truth.images[i] ** 2).mean())) for i in range(5)]
    assert m["blank"]["psnr"] == pytest.approx(blank, abs=1e-4)


def test_evaluate_pairs_images_and_labels() -> None:
    protos = digit_prototypes()
    labels = torch.tensor([0, 1, 2, 3])
    truth = Truth(noisy(protos, labels, 0.1, seed=12), labels)
    shuffle = torch.tensor([2, 0, 3, 1])
    rec_labels = labels[shuffle].clone()
    rec_labels[0] = 3  # one wrong label (recon slot 0 shows class 2)
    rec = Reconstruction((truth.images[shuffle] + 0.01).clamp(0, 1), rec_labels, "inferred", "test")
    ev = evaluate(rec, truth, protos, with_lpips=False)
    assert ev["pairing"] == torch.argsort(shuffle).tolist()
    assert ev["labels"]["true"] == [0, 1, 2, 3]
    assert ev["labels"]["reconstructed"] == [0, 1, 3, 3]
    assert ev["label_accuracy"] == 0.75
    assert ev["label_count_accuracy"] == 0.75
    assert all(v > 35 for v in ev["methods"]["attack"]["psnr"])
    # the prototype baseline follows the reconstruction's (paired) labels, wrong one included
    wrong = psnr(protos[3:4], truth.images[2:3]).item()
    assert ev["methods"]["prototype"]["psnr"][2] == pytest.approx(wrong, abs=1e-6)


def test_evaluate_reidentification() -> None:
    protos, pool, truth_imgs, labels = _reid_setup()
    truth = Truth(truth_imgs, labels)
    rec = Reconstruction(truth_imgs.clone(), labels.clone(), "observation", "test")
    ev = evaluate(rec, truth, protos, with_lpips=False, reid_pool=pool, reid_k=10)
    r = ev["reidentification"]
    assert r["k"] == 10 and r["chance"] == pytest.approx(0.1)
    assert r["attack"] == 1.0
    assert r["prototype"] <= 0.35
    small = evaluate(rec, truth, protos, with_lpips=False, reid_pool=pool, reid_k=50)
    assert small["reidentification"]["attack"] is None
    assert "smaller k" in small["reidentification"]["note"]
    json.dumps(small, allow_nan=False)


def test_evaluate_rejects_mismatch() -> None:
    with pytest.raises(ClipleakError):
        evaluate(Reconstruction(const(0.5, 2), torch.tensor([0, 0]), "observation", "t"),
                 Truth(const(0.5, 3), torch.tensor([0, 0, 0])), const(0.3))


def test_batch_reid_stays_at_chance_after_best_match_pairing() -> None:
    """Reconstructions that do not depend on the client's images (other digits of the same class),
    paired to the truth by best PSNR match: scored image by image, the pairing's selection lifts them
    above chance; the batch protocol (one candidate set holding all true images) keeps them at 1/k."""
    from clipleak.client import load_private
    from clipleak.data import DataSpec

    private = load_private(DataSpec("mnist"), 16)
    g = torch.Generator().manual_seed(0)
    batch_rates, pair_rates = [], []
    for trial in range(12):
        idx = torch.nonzero(private.labels == trial % 10).flatten()
        pick = idx[torch.randperm(idx.numel(), generator=g)[:8]]
        truth, fake = private.images[pick[:4]], private.images[pick[4:]]
        labels = private.labels[pick[:4]]
        perm = pair_by_psnr(fake, truth)
        paired = fake[perm]
        batch_rates.append(reid_rate(paired, truth, labels, private, k=10, draws=10, seed=trial))
        pair_rates.append(sum(reid_rate(paired[i:i + 1], truth[i:i + 1], labels[i:i + 1], private, k=10, draws=10,
                                        seed=trial) for i in range(4)) / 4)
    batch_rate, pair_rate = sum(batch_rates) / 12, sum(pair_rates) / 12
    # measured: 0.015 one-to-one (chance 0.1), 0.2 image by image
    assert batch_rate <= 0.12, batch_rate
    assert pair_rate > batch_rate + 0.05, (pair_rate, batch_rate)


def test_batch_reid_counts_each_truth_once() -> None:
    """B copies of one true image re-identify one truth out of B, not all of them (one-to-one)."""
    from clipleak.client import load_private
    from clipleak.data import DataSpec

    private = load_private(DataSpec("mnist"), 16)
    idx = torch.nonzero(private.labels == 3).flatten()[:4]
    truth, labels = private.images[idx], private.labels[idx]
    copies = truth[:1].expand(4, -1, -1, -1).clone()
    assert reid_rate(copies, truth, labels, private, k=10, draws=5) == pytest.approx(0.25)
    assert reid_rate(truth.clone(), truth, labels, private, k=10, draws=5) == 1.0
    two = torch.cat([truth[:2], truth[:2]])  # each of two truths claimed twice: 2 of 4
    assert reid_rate(two, truth, labels, private, k=10, draws=5) == pytest.approx(0.5)


def test_verdict_names_every_baseline_the_attack_loses_to() -> None:
    """An attack that beats the prototype and the blank image but not an extra baseline (here the true
    images themselves, as a stand-in for a strong public nearest neighbour) must say so in words."""
    protos = digit_prototypes()
    labels = torch.tensor([0, 1, 2, 3])
    truth = Truth(noisy(protos, labels, 0.1, seed=21), labels)
    jitter = 0.05 * torch.randn(truth.images.shape, generator=torch.Generator().manual_seed(22))
    rec = Reconstruction((truth.images + jitter).clamp(0, 1), labels.clone(), "observation", "test")
    ev = evaluate(rec, truth, protos, with_lpips=False, extra_baselines={"public-nn": truth.images.clone()})
    v = ev["verdict"]
    assert v["beat_prototype"] and v["beat_blank"]
    lost = {(x["baseline"], x["measure"]) for x in v["lost_to"]}
    assert ("public-nn", "PSNR") in lost and ("public-nn", "SSIM") in lost
    assert all(x["baseline"] == "public-nn" for x in v["lost_to"])
    assert "did NOT beat the public nearest neighbour on PSNR (" in v["text"]
    # a tie is reported as a tie, not as a loss
    ev3 = evaluate(rec, truth, protos, with_lpips=False, extra_baselines={"public-nn": rec.images.clone()})
    assert " It only tied the public nearest neighbour on PSNR (both " in ev3["verdict"]["text"]
    assert "did NOT beat the public" not in ev3["verdict"]["text"]
    assert all(x["tie"] for x in ev3["verdict"]["lost_to"])
    # the same attack without the extra baseline has nothing more to confess
    ev2 = evaluate(rec, truth, protos, with_lpips=False)
    assert ev2["verdict"]["lost_to"] == [] and "NOT" not in ev2["verdict"]["text"]
