"""Data sources, the seeded public/private split, folder loading and client-side batch sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipleak.client import load_private, sample_batch
from clipleak.data import (
    DIGIT_NAMES,
    DataSpec,
    ImageSet,
    available_datasets,
    load_all,
    load_public,
    load_validation,
    split_indices,
)
from clipleak.errors import ClipleakError

MNIST = DataSpec("mnist")


# ----------------------------------------------------------------------------------------- mnist split


def test_mnist_loads_5000_real_digits() -> None:
    full = load_all(MNIST, 32)
    assert len(full) == 5000
    assert full.images.shape == (5000, 3, 32, 32)
    assert full.images.dtype == torch.float32 and full.labels.dtype == torch.int64
    assert full.classnames == DIGIT_NAMES and full.grayscale
    assert torch.equal(torch.bincount(full.labels), torch.full((10,), 500))
    # real digits: dark background, bright strokes, identical channels
    assert full.images[:, :, :2, :].mean() < 0.01 and full.images.amax(dim=(1, 2, 3)).min() > 0.5
    assert 0.05 < float(full.images.mean()) < 0.3
    assert torch.equal(full.images[:, 0], full.images[:, 2])


def test_public_validation_private_disjoint_cover_stratified() -> None:
    pub, val, priv = load_public(MNIST, 32), load_validation(MNIST, 32), load_private(MNIST, 32)
    assert (len(pub), len(val), len(priv)) == (4000, 500, 500)
    split = split_indices(load_all(MNIST, 32).labels, 0, 0.1, 0.1)
    parts = [set(t.tolist()) for t in split]
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert sorted(set().union(*parts)) == list(range(5000))
    assert torch.equal(torch.bincount(priv.labels, minlength=10), torch.full((10,), 50))
    assert torch.equal(torch.bincount(val.labels, minlength=10), torch.full((10,), 50))
    full = load_all(MNIST, 32)
    assert torch.equal(pub.images, full.images[split.public]) and torch.equal(priv.images, full.images[split.private])
    assert torch.equal(val.images, full.images[split.validation])
    assert "public split" in pub.source and "private split" in priv.source and "validation split" in val.source
    # the public part depends only on the total hold-out: the same 4,000 digits as a 20% private split
    old = split_indices(full.labels, 0, 0.2)
    assert torch.equal(old.public, split.public)
    assert torch.equal(torch.sort(torch.cat([split.private, split.validation])).values, old.private)


def test_split_deterministic_per_seed() -> None:
    labels = load_all(MNIST, 32).labels
    a = split_indices(labels, 0, 0.1, 0.1)
    b = split_indices(labels, 0, 0.1, 0.1)
    c = split_indices(labels, 1, 0.1, 0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.private, c.private)
    other = load_private(DataSpec("mnist", split_seed=1), 32)
    assert not torch.equal(other.images, load_private(MNIST, 32).images)


def test_split_small_classes_and_fraction() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    pub, val, priv = split_indices(labels, 3, 0.2)
    assert val.numel() == 0
    counts = torch.bincount(labels[priv], minlength=3).tolist()
    assert counts == [1, 1, 2]  # at least one private and one public image per class
    assert torch.bincount(labels[pub], minlength=3).min() >= 1
    pub, val, priv = split_indices(labels[2:], 3, 0.1, 0.1)
    assert torch.bincount(labels[2:][val], minlength=3)[1:].min() >= 1  # every part gets one per class
    with pytest.raises(ClipleakError, match="at least 2"):
        split_indices(torch.tensor([0, 0, 1]), 0, 0.2)
    with pytest.raises(ClipleakError, match="at least 3"):
        split_indices(torch.tensor([0, 0, 1, 1]), 0, 0.1, 0.1)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ClipleakError, match="private_fraction"):
            split_indices(labels, 0, bad)
        with pytest.raises(ClipleakError, match="private_fraction"):
            DataSpec("mnist", private_fraction=bad)
    with pytest.raises(ClipleakError, match="below 1"):
        DataSpec("mnist", private_fraction=0.5, validation_fraction=0.5)


def test_prototypes_are_exact_class_means() -> None:
    pub = load_public(MNIST, 32)
    protos = pub.prototypes()
    assert protos.shape == (10, 3, 32, 32)
    for k in range(10):
        members = [pub.images[i] for i in range(len(pub)) if int(pub.labels[i]) == k]
        expected = torch.stack(members).to(torch.float64).mean(0).float()
        assert torch.allclose(protos[k], expected, atol=1e-6)
    assert torch.allclose(pub.of_class(3).images.mean(0), protos[3], atol=1e-5)
    missing = pub.subset(torch.nonzero(pub.labels != 7).reshape(-1))
    with pytest.raises(ClipleakError, match="seven"):
        missing.prototypes()


@pytest.mark.parametrize("size", [32, 64])
def test_range_and_shape(size: int) -> None:
    pub = load_public(MNIST, size)
    assert pub.images.shape == (len(pub), 3, size, size)
    assert float(pub.images.min()) >= 0.0 and float(pub.images.max()) <= 1.0


def test_subset_and_of_class() -> None:
    pub = load_public(DataSpec("digits"), 16)
    sub = pub.subset([5, 1, 3])
    assert torch.equal(sub.images, pub.images[[5, 1, 3]]) and torch.equal(sub.labels, pub.labels[[5, 1, 3]])
    sub.images.zero_()
    assert pub.images[5].max() > 0  # subset copies
    two = pub.of_class(2)
    assert len(two) > 0 and bool((two.labels == 2).all())
    with pytest.raises(ClipleakError):
        pub.of_class(10)


# ------------------------------------------------------------------------------------ other sources


def test_digits() -> None:
    full = load_all(DataSpec("digits"), 32)
    assert len(full) == 1797 and full.grayscale and full.classnames == DIGIT_NAMES
    assert full.images.shape == (1797, 3, 32, 32)
    assert 0.0 <= float(full.images.min()) and float(full.images.max()) <= 1.0
    assert float(full.images.max()) > 0.9


PHOTO_SOURCES = [("sklearn-photos", "flower"), ("skimage-photos", "astronaut")]


@pytest.mark.parametrize(("name", "must_have"), PHOTO_SOURCES)
def test_photos(name: str, must_have: str) -> None:
    full = load_all(DataSpec(name), 48)
    assert not full.grayscale and must_have in full.classnames
    assert len(full) == 24 * len(full.classnames)
    assert torch.equal(torch.bincount(full.labels), torch.full((len(full.classnames),), 24))
    assert full.images.shape[1:] == (3, 48, 48)
    assert 0.0 <= float(full.images.min()) and float(full.images.max()) <= 1.0
    # colour photos: channels differ; crops of one photo differ from each other
    assert (full.images[:, 0] - full.images[:, 2]).abs().mean() > 0.01
    assert not torch.equal(full.images[0], full.images[1])
    if name == "sklearn-photos":  # deterministic crops (shared code path): a fresh, uncached load agrees
        load_all.__globals__["_load_cached"].cache_clear()
        assert torch.equal(full.images, load_all(DataSpec(name), 48).images)
    pub, priv = load_public(DataSpec(name), 48), load_private(DataSpec(name), 48)
    assert len(pub) + len(load_validation(DataSpec(name), 48)) + len(priv) == len(full)
    assert pub.prototypes().shape[0] == len(full.classnames)


def test_available_and_parse(tmp_path: Path) -> None:
    names = available_datasets()
    assert {"mnist", "digits", "sklearn-photos", "skimage-photos", "folder:PATH"} <= set(names)
    assert DataSpec.parse("mnist") == DataSpec()
    assert DataSpec.parse("digits", split_seed=3, private_fraction=0.5) == DataSpec("digits", 3, 0.5, 0.1)
    (tmp_path / "a").mkdir()
    assert DataSpec.parse(str(tmp_path)).name == f"folder:{tmp_path.resolve()}"
    assert DataSpec.parse(f"folder:{tmp_path}").folder == tmp_path.resolve()
    with pytest.raises(ClipleakError, match="mnist"):
        DataSpec.parse("cifar10")
    with pytest.raises(ClipleakError, match="not found"):
        DataSpec.parse(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(ClipleakError, match="unknown data set"):
        DataSpec("imagenet")
    spec = DataSpec("digits", 7, 0.3)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    assert DataSpec.from_dict({**spec.to_dict(), "grayscale": True}) == spec  # facts recorded beside the spec
    with pytest.raises(ClipleakError, match="split_seed"):
        DataSpec.from_dict({"name": "mnist", "split_seed": "0"})
    assert DataSpec().is_grayscale is True and DataSpec("skimage-photos").is_grayscale is False


# ------------------------------------------------------------------------------------ folder source


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_folder_converts_modes_and_sizes(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    red = np.zeros((20, 40, 3), np.uint8)
    red[..., 0] = 255
    red[:, :10] = 0  # left strip black: removed by the centre crop (columns 10..29 kept)
    _save(root / "red_things" / "a.png", red)
    _save(root / "red_things" / "b.jpg", np.full((64, 64, 3), (255, 0, 0), np.uint8))
    _save(root / "gray" / "g.png", np.full((30, 30), 128, np.uint8))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:8, :, 3] = 255  # top half opaque green, bottom half transparent -> black
    _save(root / "gray" / "t.png", rgba)
    (root / "gray" / "notes.txt").write_text("ignored: not an image extension")

    spec = DataSpec.parse(str(root))
    full = load_all(spec, 16)
    assert full.classnames == ["gray", "red things"] and not full.grayscale
    assert full.images.shape == (4, 3, 16, 16) and full.labels.tolist() == [0, 0, 1, 1]
    g, t, a, b = full.images
    assert torch.allclose(g, torch.full_like(g, 128 / 255), atol=1e-3)
    assert torch.allclose(t[1, :7], torch.ones(7, 16), atol=1e-3)  # opaque green kept
    assert float(t[:, 9:].abs().max()) < 1e-3  # transparent composited on black
    assert float(t[[0, 2]].abs().max()) < 1e-3
    assert torch.allclose(a[0], torch.ones(16, 16), atol=1e-3) and float(a[1:].abs().max()) < 1e-3
    assert float(b[0].min()) > 0.95 and float(b[1:].max()) < 0.05  # jpeg, approximately red

    gray_only = tmp_path / "gray_only"
    for c in ("dark", "light"):
        for i in range(3):
            _save(gray_only / c / f"{i}.png", np.full((10, 12), 40 if c == "dark" else 200, np.uint8))
    gfull = load_all(DataSpec.parse(str(gray_only)), 8)
    assert gfull.grayscale and torch.equal(gfull.images[:, 0], gfull.images[:, 1])
    gspec = DataSpec.parse(str(gray_only))
    pub, priv = load_public(gspec, 8), load_private(gspec, 8)
    assert len(pub) == 2 and len(priv) == 2 and sorted(priv.labels.tolist()) == [0, 1]
    assert sorted(load_validation(gspec, 8).labels.tolist()) == [0, 1]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ClipleakError, match="not found"):
        load_all(DataSpec(f"folder:{tmp_path / 'missing'}"), 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipleakError, match="no class sub-folders"):
        load_all(DataSpec.parse(str(empty)), 8)
    single = tmp_path / "single"
    _save(single / "only" / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ClipleakError, match="only one class"):
        load_all(DataSpec.parse(str(single)), 8)
    no_imgs = tmp_path / "no_imgs"
    _save(no_imgs / "a" / "x.png", np.zeros((4, 4, 3), np.uint8))
    (no_imgs / "b").mkdir()
    with pytest.raises(ClipleakError, match="has no images"):
        load_all(DataSpec.parse(str(no_imgs)), 8)
    corrupt = tmp_path / "corrupt"
    _save(corrupt / "a" / "ok.png", np.zeros((4, 4, 3), np.uint8))
    (corrupt / "b").mkdir()
    (corrupt / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ClipleakError, match="broken.png"):
        load_all(DataSpec.parse(str(corrupt)), 8)
    one_each = tmp_path / "one_each"
    _save(one_each / "a" / "x.png", np.zeros((4, 4, 3), np.uint8))
    _save(one_each / "b" / "y.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ClipleakError, match="at least 3 images per class"):
        load_public(DataSpec.parse(str(one_each)), 8)
    with pytest.raises(ClipleakError, match="image_size"):
        load_all(MNIST, 0)


# ------------------------------------------------------------------------------------ sample_batch


def test_sample_batch() -> None:
    priv = load_private(MNIST, 32)
    x1, y1, i1 = sample_batch(priv, 8, seed=5)
    x2, y2, i2 = sample_batch(priv, 8, seed=5)
    _, _, i3 = sample_batch(priv, 8, seed=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert not torch.equal(i1, i3)
    assert x1.shape == (8, 3, 32, 32) and len(set(i1.tolist())) == 8
    assert torch.equal(x1, priv.images[i1]) and torch.equal(y1, priv.labels[i1])

    _, y, _ = sample_batch(priv, 20, seed=0, classes=[3, 7])
    assert set(y.tolist()) <= {3, 7}
    _, y, _ = sample_batch(priv, 10, seed=1, distinct_classes=True)
    assert sorted(y.tolist()) == list(range(10))
    _, y, _ = sample_batch(priv, 2, seed=1, classes=[1, 4, 9], distinct_classes=True)
    assert len(set(y.tolist())) == 2 and set(y.tolist()) <= {1, 4, 9}

    with pytest.raises(ClipleakError, match="only 500"):
        sample_batch(priv, 501, seed=0)
    with pytest.raises(ClipleakError, match="only 50"):
        sample_batch(priv, 51, seed=0, classes=[2])
    with pytest.raises(ClipleakError, match="distinct"):
        sample_batch(priv, 11, seed=0, distinct_classes=True)
    with pytest.raises(ClipleakError, match="out of range"):
        sample_batch(priv, 1, seed=0, classes=[10])
    with pytest.raises(ClipleakError, match="batch_size"):
        sample_batch(priv, 0, seed=0)


def test_imageset_is_a_dataclass_with_len() -> None:
    s = ImageSet(torch.zeros(3, 3, 4, 4), torch.tensor([0, 1, 1]), ["a", "b"], False, "test")
    assert len(s) == 3 and s.prototypes().shape == (2, 3, 4, 4)
