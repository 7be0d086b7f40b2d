"""Image-similarity metrics, label accuracy, Hungarian pairing and re-identification.

All image arguments are float tensors ``(B, 3, H, W)`` in ``[0, 1]``; per-image scores come back as
``(B,)`` float64 tensors.

* PSNR (dB, data range 1) is capped at :data:`PSNR_CAP`: identical images score exactly ``100.0``
  instead of ``inf`` so that results stay finite and JSON-valid.
* SSIM uses the standard Gaussian window (11 taps, sigma 1.5); for images smaller than 11 pixels the
  window shrinks to the largest odd size that fits, with sigma scaled to match (``1.5 * k / 11``).
* LPIPS (AlexNet, v0.1) is computed only when torchvision's ImageNet AlexNet weights are already on
  disk in the torch hub cache; nothing is ever downloaded and no substitute number is produced.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ClipleakError

PSNR_CAP = 100.0
"""PSNR ceiling in dB: identical images (MSE 0) score exactly this instead of infinity."""

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
"""torchvision's ImageNet AlexNet weights, the trunk LPIPS (net="alex") is built on."""

LPIPS_MIN_SIDE = 32
"""Smallest side AlexNet's pooling stack accepts; smaller images are upsampled (bilinear) to this."""

_LPIPS_CACHE: dict[str, torch.nn.Module] = {}


# ----------------------------------------------------------------------------------------- helpers


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two image batches of the same shape and return them as float64 on CPU."""
    if a.dim() != 4 or a.shape[1] != 3:
        raise ClipleakError(f"images must be (B, 3, H, W); got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ClipleakError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


# -------------------------------------------------------------------------------------- PSNR / SSIM


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (data range 1), ``(B,)`` float64, capped at :data:`PSNR_CAP`.

    Computed with torchmetrics' ``peak_signal_noise_ratio`` over ``dim=(1, 2, 3)``. Identical images
    (MSE 0, PSNR infinite) and any image closer than ``PSNR_CAP`` dB score exactly ``PSNR_CAP``.
    """
    x, y = _check_pair(a, b)
    from torchmetrics.functional.image import peak_signal_noise_ratio  # on first use: see clipleak.lazy

    val = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return val.reshape(-1).clamp(max=PSNR_CAP)  # inf -> PSNR_CAP; NaN (NaN input) stays NaN


def ssim_kernel_size(height: int, width: int) -> int:
    """Gaussian window size: 11, or the largest odd size that fits the smaller image side (>= 3)."""
    side = min(int(height), int(width))
    if side < 3:
        raise ClipleakError(f"SSIM needs images of at least 3x3 pixels; got {height}x{width}")
    k = min(11, side)
    return k if k % 2 == 1 else k - 1


def ssim_sigma(kernel_size: int) -> float:
    """Gaussian sigma for a window of ``kernel_size`` taps: 1.5 at 11, scaled down proportionally.

    torchmetrics derives the Gaussian window from sigma alone (``2 * int(3.5 * sigma + 0.5) + 1`` taps),
    so a smaller window needs a smaller sigma.
    """
    sigma = 1.5 * kernel_size / 11
    assert int(3.5 * sigma + 0.5) * 2 + 1 == kernel_size
    return sigma


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (data range 1, Gaussian window), ``(B,)`` float64.

    Uses torchmetrics' ``structural_similarity_index_measure`` with ``reduction="none"``: the standard
    11-tap sigma-1.5 window from 11x11 up, a smaller one (:func:`ssim_kernel_size`, :func:`ssim_sigma`)
    below, so 8x8 test images work too.
    """
    x, y = _check_pair(a, b)
    k = ssim_kernel_size(x.shape[-2], x.shape[-1])
    from torchmetrics.functional.image import structural_similarity_index_measure

    val = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none", kernel_size=k,
                                              sigma=ssim_sigma(k))
    assert isinstance(val, torch.Tensor)
    return val.reshape(-1)


# -------------------------------------------------------------------------------------------- LPIPS


def _alexnet_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _lpips_linear_path() -> Path | None:
    """The LPIPS linear-layer weights shipped inside the ``lpips`` package (None if not installed)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"


def lpips_status() -> tuple[bool, str]:
    """Whether LPIPS can be computed from files already on disk, and a one-line explanation.

    Checks the files before anything is constructed, so this never triggers a download.
    """
    lin = _lpips_linear_path()
    if lin is None:
        return False, "LPIPS unavailable: the lpips package is not installed"
    if not lin.is_file():
        return False, f"LPIPS unavailable: the lpips package lacks its linear-layer weights ({lin})"
    alex = _alexnet_weights_path()
    if not alex.is_file():
        return False, f"LPIPS unavailable: no local weights (put {ALEXNET_FILE} in {alex.parent})"
    return True, f"LPIPS (AlexNet, v0.1) from local weights {alex}"


def _lpips_model() -> torch.nn.Module | None:
    """Build (once per weights file) LPIPS with the local AlexNet trunk; None when unavailable."""
    ok, _ = lpips_status()
    if not ok:
        return None
    alex = _alexnet_weights_path()
    key = str(alex.resolve())
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    import lpips
    from torchvision.models import alexnet

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # pnet_rand=True: the trunk starts random (no download); its linear layers come from the
            # weights shipped in the lpips package. The trunk is then filled from the local file.
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
            features = alexnet(weights=None).features
            state = torch.load(str(alex), map_location="cpu", weights_only=True)
            # only the convolutional trunk is used; the classifier weights in the file are ignored
            features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                      if k.startswith("features.")})
    except Exception as e:  # noqa: BLE001
        raise ClipleakError(f"cannot load LPIPS weights ({alex}): {e}") from e
    for slice_module in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                         model.net.slice5):
        for name, child in slice_module.named_children():
            child.load_state_dict(features[int(name)].state_dict())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _LPIPS_CACHE[key] = model
    return model


def lpips_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-image LPIPS distance (AlexNet, lower is closer), ``(B,)`` float64, or None when unavailable.

    Inputs in [0, 1] are mapped to [-1, 1]; images with a side below 32 pixels are upsampled
    (bilinear) to 32 first because AlexNet's pooling cannot run on them.
    """
    x, y = _check_pair(a, b)
    model = _lpips_model()
    if model is None:
        return None
    x, y = x.float(), y.float()
    h, w = x.shape[-2:]
    if min(h, w) < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / min(h, w)
        size = (max(LPIPS_MIN_SIDE, round(h * scale)), max(LPIPS_MIN_SIDE, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        d = model(x * 2 - 1, y * 2 - 1)
    return d.reshape(-1).to(torch.float64)


# ------------------------------------------------------------------------------- labels / pairing


def _label_pair(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both label batches as flat int64 tensors of equal, non-zero length (else ClipleakError)."""
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(true).reshape(-1).long()
    if p.shape != t.shape:
        raise ClipleakError(f"label batches differ in length: {p.numel()} vs {t.numel()}")
    if p.numel() == 0:
        raise ClipleakError("no labels to compare")
    return p, t


def label_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of positions where ``pred`` equals ``true`` (both ``(B,)``)."""
    p, t = _label_pair(pred, true)
    return float((p == t).double().mean())


def label_count_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Order-free label recovery: multiset overlap of ``pred`` and ``true`` divided by the batch size.

    Independent of how reconstructions were paired with true images (pairing noise cannot lower it).
    """
    p, t = _label_pair(pred, true)
    if int(min(p.min(), t.min())) < 0:
        raise ClipleakError("labels must be non-negative")
    m = int(max(p.max(), t.max())) + 1
    overlap = torch.minimum(torch.bincount(p, minlength=m), torch.bincount(t, minlength=m)).sum()
    return float(overlap) / p.numel()


def psnr_matrix(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``M[i, j]`` = PSNR between ``truth[i]`` and ``recon[j]``, ``(B, B)`` float64."""
    _check_pair(recon, truth)
    rows = [psnr(recon, truth[i : i + 1].expand_as(recon)) for i in range(truth.shape[0])]
    return torch.stack(rows)


def pair_by_psnr(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Hungarian matching maximising total PSNR: ``recon[perm[i]]`` is matched with ``truth[i]``.

    Returns ``perm`` as an int64 ``(B,)`` tensor (``[0]`` for a batch of one).
    """
    _check_pair(recon, truth)
    b = truth.shape[0]
    if b == 1:
        return torch.zeros(1, dtype=torch.int64)
    score = psnr_matrix(recon, truth).numpy()
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty(b, dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


# ------------------------------------------------------------------------------- re-identification


class LabelledImages(Protocol):
    """Anything with ``images (N, 3, H, W)`` and ``labels (N,)`` (e.g. ``data.ImageSet``)."""

    images: torch.Tensor
    labels: torch.Tensor


def reidentify(recon: torch.Tensor, candidates: torch.Tensor, true_pos: int) -> bool:
    """Does ``recon`` ``(3, H, W)`` pick ``candidates[true_pos]`` out of ``candidates`` ``(K, 3, H, W)``?

    The pick is the candidate with the highest PSNR to the reconstruction; it counts only when the
    true candidate is strictly closer than every other one (a tie is not a re-identification).
    """
    if recon.dim() != 3 or candidates.dim() != 4:
        raise ClipleakError("reidentify takes one image (3, H, W) and candidates (K, 3, H, W)")
    k = candidates.shape[0]
    if not 0 <= int(true_pos) < k:
        raise ClipleakError(f"true_pos {true_pos} out of range for {k} candidates")
    scores = psnr(recon.unsqueeze(0).expand_as(candidates), candidates)
    others = torch.cat([scores[:true_pos], scores[true_pos + 1 :]])
    return bool(others.numel() == 0 or scores[true_pos] > others.max())


def _distractor_pool(pool: LabelledImages, label: int, true_image: torch.Tensor) -> torch.Tensor:
    """Indices of pool images of class ``label`` that are not (numerically) the true image itself."""
    idx = torch.nonzero(pool.labels.reshape(-1) == int(label)).reshape(-1)
    if idx.numel() == 0:
        return idx
    imgs = pool.images.index_select(0, idx).to(true_image.dtype)
    same = (imgs - true_image.unsqueeze(0)).abs().flatten(1).amax(dim=1) <= 1e-6
    return idx[~same]


def reid_rate(
    recons: torch.Tensor,
    truth_images: torch.Tensor,
    truth_labels: torch.Tensor,
    pool: LabelledImages,
    *,
    k: int = 10,
    draws: int = 1,
    seed: int = 0,
) -> float:
    """Fraction of (image, draw) trials in which a reconstruction re-identifies a client image.

    Batch of one: each trial builds ``k`` candidates, the true image plus ``k - 1`` distinct images of
    the same class drawn (seeded, without replacement) from ``pool`` excluding copies of the true image;
    the trial succeeds when the reconstruction is strictly closer (PSNR) to the true image than to
    every distractor. Chance level is ``1 / k``.

    Batch of ``B > 1``: reconstructions are usually paired to the truth by best match first, and that
    selection alone would lift an image-independent reconstruction above ``1 / k``. So each draw builds
    one candidate set for the whole batch, all ``B`` true images plus ``k - 1`` distractors of each one's
    class (none of them a batch image); each reconstruction claims its closest candidate, and the score
    is the number of distinct true images claimed, over ``B``: one truth counts once however many
    reconstructions claim it (``B`` copies of one truth score ``1 / B``). Chance stays at most ``1 / k``
    whatever the pairing. Raises :class:`ClipleakError` when a
    class has too few distractors.
    """
    if k < 2:
        raise ClipleakError("re-identification needs k >= 2 candidates")
    if draws < 1:
        raise ClipleakError("re-identification needs at least one draw")
    _check_pair(recons, truth_images)
    labels = torch.as_tensor(truth_labels).reshape(-1).long()
    if labels.numel() != truth_images.shape[0]:
        raise ClipleakError("need one truth label per truth image")
    if pool.images.shape[1:] != truth_images.shape[1:]:
        raise ClipleakError(
            f"re-identification pool images are {tuple(pool.images.shape[1:])}, "
            f"truth images {tuple(truth_images.shape[1:])}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    truth = truth_images.detach().cpu()
    rec = recons.detach().cpu().to(truth.dtype)
    b = truth.shape[0]
    pools: dict[int, torch.Tensor] = {}
    for c in sorted(set(labels.tolist())):
        idx = _distractor_pool(pool, c, truth[0])
        if b > 1 and idx.numel():  # no batch image may be a distractor
            imgs = pool.images.index_select(0, idx).to(truth.dtype).flatten(1)
            dist = torch.cdist(imgs, truth.flatten(1), p=float("inf"))
            idx = idx[dist.amin(dim=1) > 1e-6]
        need = (k - 1) * int((labels == c).sum())
        if idx.numel() < need:
            raise ClipleakError(
                f"re-identification with k={k} needs {need} other images of class {c}; "
                f"the pool has {idx.numel()} (use a smaller k)"
            )
        pools[c] = idx
    if b == 1:
        hits = 0
        c = int(labels[0])
        for _ in range(draws):
            chosen = pools[c][torch.randperm(pools[c].numel(), generator=gen)[: k - 1]]
            pos = int(torch.randint(k, (1,), generator=gen))
            others = pool.images.index_select(0, chosen).to(truth.dtype)
            cands = torch.cat([others[:pos], truth[:1], others[pos:]])
            hits += reidentify(rec[0], cands, pos)
        return hits / draws
    hits = 0
    for _ in range(draws):
        picked: list[torch.Tensor] = []
        for c, idx in pools.items():
            n = (k - 1) * int((labels == c).sum())
            picked.append(idx[torch.randperm(idx.numel(), generator=gen)[:n]])
        distract = pool.images.index_select(0, torch.cat(picked)).to(truth.dtype)
        claimed: set[int] = set()  # one truth can be claimed once, however many reconstructions pick it
        for i in range(b):
            to_truth = psnr(rec[i].unsqueeze(0).expand_as(truth), truth)
            to_other = psnr(rec[i].unsqueeze(0).expand_as(distract), distract)
            if to_truth.max() > to_other.max():
                claimed.add(int(to_truth.argmax()))
        hits += len(claimed)
    return hits / (draws * b)


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when finite, else None (keeps JSON valid)."""
    v = float(x)
    return v if math.isfinite(v) else None
