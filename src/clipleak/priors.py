"""Learned image priors: a convolutional VAE and an FGLA-style CLIP-feature-to-image decoder.

Pixel-space attacks on a trained CLIP draw noise: the update (or even the true image feature) does not pin
down the pixels. A generative prior trained on the PUBLIC split does:

* :class:`ConvVAE` -- a small convolutional VAE. :class:`LatentImages` plugs its latent space into the
  optimisation engine (:func:`clipleak.engine.optimise`) as an image parametrisation, so any attack can
  search latent codes instead of pixels (``render() = vae.decode(z)``).
* :class:`FeatureDecoder` -- maps a *normalised* CLIP image feature of the frozen target straight to an
  image (Linear -> 4x4x64, upsample + 3x3 conv + BatchNorm + ReLU blocks, 3x3 conv, sigmoid; after FGLA).
  It is tied to the target's weights: a decoder trained for one CLIP is meaningless for another, so its
  card records the target's SHA-256 and :func:`check_prior` refuses a mismatch.

Both are trained with :func:`train_vae` / :func:`train_decoder` (seeded; bitwise deterministic for a fixed
number of ``steps`` and thread count) and stored with :func:`save_prior` as ``<name>.safetensors`` plus a
``<name>.json`` card (architecture, data, training recipe and time, target weights, a quality number).
:func:`load_prior` reads them back, verifying the file against the card's SHA-256.

Named priors for the default target (``tiny-mnist-vae``, ``tiny-mnist-decoder``) are trained on first use
into :func:`clipleak.artifacts.cache_dir` by :func:`resolve_prior` and reused afterwards.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .engine import Term
from .errors import ClipleakError
from .models import ClipModel, file_sha256

FORMAT = "clipleak-prior/1"
KINDS = ("vae", "decoder")

ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""``progress(step, total_steps, info)``; ``info`` holds ``phase`` (``"features"``, ``"train"``,
``"done"``), ``loss`` (running mean), ``lr`` and ``elapsed_s``."""

DEFAULT_VAE_STEPS = 2000
DEFAULT_DECODER_STEPS = 2000


# ------------------------------------------------------------------------------------------- layout


def _layout(image_size: int) -> tuple[int, int]:
    """``(start, n_up)``: the smallest side (>= 4) reached by halving ``image_size``, and how many halvings.

    32 -> (4, 3), 64 -> (4, 4), 224 -> (7, 5), 28 -> (7, 2). Sizes that cannot be halved at least once
    down to a side >= 4 (odd sizes, or below 8) are refused.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ClipleakError(f"a prior needs an integer image size of at least 8 px, got {image_size!r}")
    n, side = 0, image_size
    while side % 2 == 0 and side // 2 >= 4:
        side //= 2
        n += 1
    if n == 0:
        raise ClipleakError(f"image size {image_size} cannot be halved into a prior's upsampling stack")
    return side, n


def _expand(x: torch.Tensor) -> torch.Tensor:
    """One channel -> three identical channels (grayscale convention); three channels unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ---------------------------------------------------------------------------------------------- VAE


class ConvVAE(nn.Module):
    """Small convolutional VAE for ``image_size`` px images with 1 (grayscale) or 3 channels.

    Encoder: stride-2 4x4 convolutions (32, 64, 128, ... channels, ReLU) down to a 4x4 (or 7x7, ...) map,
    then one linear layer to ``(mu, logvar)``. Decoder: the mirror image with transposed convolutions and
    a sigmoid. About 0.5M parameters at 32 px, latent 32.
    """

    kind = "vae"

    def __init__(self, image_size: int = 32, channels: int = 1, latent: int = 32, width: int = 32):
        super().__init__()
        if channels not in (1, 3):
            raise ClipleakError(f"channels must be 1 (grayscale) or 3, got {channels!r}")
        if latent < 1 or width < 1:
            raise ClipleakError("latent and width must be positive")
        start, n = _layout(image_size)
        self.image_size, self.channels = int(image_size), int(channels)
        self.latent, self.width = int(latent), int(width)
        self.start = start
        widths = [min(width * 2**i, 8 * width) for i in range(n)]
        enc: list[nn.Module] = []
        c_in = channels
        for w in widths:
            enc += [nn.Conv2d(c_in, w, 4, 2, 1), nn.ReLU()]
            c_in = w
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.to_stats = nn.Linear(widths[-1] * start * start, 2 * latent)
        self.from_latent = nn.Linear(latent, widths[-1] * start * start)
        dec: list[nn.Module] = []
        rev = widths[::-1]
        for i, w in enumerate(rev):
            out = rev[i + 1] if i + 1 < len(rev) else channels
            dec.append(nn.ConvTranspose2d(w, out, 4, 2, 1))
            if i + 1 < len(rev):
                dec.append(nn.ReLU())
        self.decoder = nn.Sequential(*dec)
        self.top = widths[-1]
        self.card: dict[str, Any] = {}

    def arch(self) -> dict[str, Any]:
        """Constructor arguments (stored in the card so :func:`load_prior` can rebuild the module)."""
        return {"image_size": self.image_size, "channels": self.channels, "latent": self.latent, "width": self.width}

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ClipleakError(
                f"this VAE takes (B, C, {self.image_size}, {self.image_size}) images, got {tuple(images.shape)}"
            )
        if self.channels == 1 and images.shape[1] == 3:
            return images.mean(dim=1, keepdim=True)
        if images.shape[1] != self.channels:
            raise ClipleakError(f"this VAE takes {self.channels}-channel images, got {images.shape[1]}")
        return images

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``, each ``(B, latent)``, of images in [0, 1] (3-channel input is averaged for
        a grayscale VAE)."""
        stats = self.to_stats(self.encoder(self._prep(images)))
        mu, logvar = stats.chunk(2, dim=-1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid decoder output ``(B, channels, H, W)``."""
        h = self.from_latent(z).view(z.shape[0], self.top, self.start, self.start)
        return self.decoder(F.relu(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] from latent codes ``(B, latent)``."""
        return _expand(torch.sigmoid(self.decode_logits(z)))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """``(logits, mu, logvar)`` with a reparametrised sample (noise from ``generator``)."""
        mu, logvar = self.encode(images)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode_logits(z), mu, logvar


# ------------------------------------------------------------------------------------------ decoder


class FeatureDecoder(nn.Module):
    """FGLA-style decoder: normalised CLIP image feature ``(B, E)`` -> image ``(B, 3, H, W)`` in [0, 1].

    ``Linear(E -> start x start x 64)``, then one block per doubling (2x nearest upsample, 3x3 conv,
    BatchNorm, ReLU; 64, 32, 16, 16, ... channels), a 3x3 conv to the image channels and a sigmoid.
    0.19M parameters for E = 128 at 32 px (three blocks); 64 px adds one block.
    """

    kind = "decoder"

    def __init__(self, embed_dim: int = 128, image_size: int = 32, channels: int = 1, base: int = 64,
                 whiten: bool = False):
        super().__init__()
        if channels not in (1, 3):
            raise ClipleakError(f"channels must be 1 (grayscale) or 3, got {channels!r}")
        if embed_dim < 1 or base < 4:
            raise ClipleakError("embed_dim must be positive and base at least 4")
        start, n = _layout(image_size)
        self.embed_dim, self.image_size = int(embed_dim), int(image_size)
        self.channels, self.base = int(channels), int(base)
        self.start = start
        self.whiten = bool(whiten)
        if self.whiten:  # fixed input whitening, fitted to the public features by fit_whitening
            self.register_buffer("in_mean", torch.zeros(embed_dim))
            self.register_buffer("in_proj", torch.eye(embed_dim))
        widths = [max(base // 2**i, base // 4) for i in range(n)]  # 64, 32, 16, 16, ...
        self.fc = nn.Linear(embed_dim, base * start * start)
        blocks: list[nn.Module] = []
        c_in = base
        for w in widths:
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, w, 3, padding=1),
                       nn.BatchNorm2d(w), nn.ReLU()]
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c_in, channels, 3, padding=1)
        self.card: dict[str, Any] = {}

    def arch(self) -> dict[str, Any]:
        """Constructor arguments (stored in the card so :func:`load_prior` can rebuild the module)."""
        return {"embed_dim": self.embed_dim, "image_size": self.image_size, "channels": self.channels,
                "base": self.base, "whiten": self.whiten}

    def fit_whitening(self, features: torch.Tensor, rel_eps: float = 1e-3) -> None:
        """ZCA-whiten the input with the mean and covariance of ``features`` (the public ones). A trained
        CLIP's features of one class are nearly parallel (same-class cosine ~0.98): what tells two images
        apart lives in low-variance directions, which whitening brings to unit scale before the first layer.
        Eigenvalues below ``rel_eps`` times the largest are floored there (the norm constraint leaves one
        direction with none)."""
        if not self.whiten:
            raise ClipleakError("this decoder was built with whiten=False")
        f = features.double()
        mean = f.mean(0)
        cov = torch.cov((f - mean).T)
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(rel_eps * float(evals.max()))
        proj = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
        with torch.no_grad():
            self.in_mean.copy_(mean.float())
            self.in_proj.copy_(proj.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] from normalised features ``(B, E)``."""
        if features.dim() != 2 or features.shape[1] != self.embed_dim:
            raise ClipleakError(f"this decoder takes (B, {self.embed_dim}) features, got {tuple(features.shape)}")
        if self.whiten:
            features = (features - self.in_mean) @ self.in_proj
        h = self.fc(features).view(features.shape[0], self.base, self.start, self.start)
        return _expand(torch.sigmoid(self.head(self.blocks(h))))


Prior = ConvVAE | FeatureDecoder


# ------------------------------------------------------------------------------------------ helpers


def clip_features(clip: ClipModel, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Normalised image features of the frozen target, ``F.normalize(encode_image(normalize(x)))``."""
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = images[i : i + batch].contiguous()
            out.append(F.normalize(clip.model.encode_image(clip.normalize(x)).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def vae_codes(vae: ConvVAE, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The VAE's mean codes ``mu`` ``(B, latent)`` of images in [0, 1] (no gradient)."""
    vae.eval()
    with torch.no_grad():
        return torch.cat([vae.encode(images[i : i + batch])[0] for i in range(0, images.shape[0], batch)])


def decoder_images(decoder: FeatureDecoder, features: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` decoded from CLIP image features (normalised here; no gradient)."""
    decoder.eval()
    with torch.no_grad():
        f = F.normalize(features.float(), dim=-1)
        return torch.cat([decoder(f[i : i + batch]) for i in range(0, f.shape[0], batch)])


def latent_prior_loss(z: torch.Tensor) -> torch.Tensor:
    """``mean(z**2)``: keeps latent codes where the VAE's N(0, I) prior puts its mass."""
    return z.pow(2).mean()


# ------------------------------------------------------------------------- engine parametrisation


class LatentImages:
    """Engine parametrisation over a frozen VAE's latent space: ``render() = vae.decode(z)``.

    Args:
        vae: the trained VAE (set to eval mode and frozen here).
        starts: starting codes. ``None``: ``z ~ N(0, I)`` from the restart's generator. A tensor
            ``(B, latent)``: every restart starts there. A list of such tensors: restart ``r`` starts from
            ``starts[r % len(starts)]`` (restarts are counted by :meth:`init` calls; set
            :attr:`next_start` to change the position, e.g. after resuming from a checkpoint).
        jitter: standard deviation of Gaussian noise added to given starts (from the restart's generator).
    """

    def __init__(self, vae: ConvVAE, starts: torch.Tensor | list[torch.Tensor] | None = None, jitter: float = 0.0):
        self.vae = vae.eval().requires_grad_(False)
        self.latent = vae.latent
        if isinstance(starts, torch.Tensor):
            starts = [starts]
        if starts is not None:
            if not starts:
                raise ClipleakError("starts is an empty list: give at least one (B, latent) tensor, or None")
            for s in starts:
                if s.dim() != 2 or s.shape[1] != self.latent:
                    raise ClipleakError(f"starting codes must be (B, {self.latent}), got {tuple(s.shape)}")
        self.starts = [s.detach().float().clone() for s in starts] if starts is not None else None
        if jitter < 0:
            raise ClipleakError(f"jitter must be >= 0, got {jitter}")
        self.jitter = float(jitter)
        self.next_start = 0
        self.z: torch.Tensor | None = None

    def init(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Fresh latent leaf ``(batch, latent)`` for one restart."""
        if self.starts is None:
            z = torch.randn(batch, self.latent, generator=generator)
        else:
            s = self.starts[self.next_start % len(self.starts)]
            self.next_start += 1
            if s.shape[0] != batch:
                raise ClipleakError(f"starting codes hold {s.shape[0]} images but the batch has {batch}")
            z = s.clone()
            if self.jitter > 0:
                z = z + self.jitter * torch.randn(z.shape, generator=generator)
        self.z = z.requires_grad_(True)
        return [self.z]

    def render(self) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1], differentiable in :attr:`z`."""
        assert self.z is not None, "call init() first"
        return self.vae.decode(self.z)

    def project(self) -> None:
        """No constraint: the latent prior term (:meth:`prior_term`) keeps codes in range."""

    def prior_term(self, weight: float = 0.01, name: str = "latent") -> Term:
        """An engine :class:`~clipleak.engine.Term` with :func:`latent_prior_loss` of the current codes."""

        def fn(_: Any) -> torch.Tensor:
            assert self.z is not None
            return latent_prior_loss(self.z)

        return Term(name=name, fn=fn, weight=weight)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the reconstruction's record."""
        return {
            "kind": "vae-latent",
            "latent": self.latent,
            "image_size": self.vae.image_size,
            "starts": "random N(0, I)" if self.starts is None else f"{len(self.starts)} given set(s) of codes",
            "jitter": self.jitter,
            "prior_sha256": self.vae.card.get("file_sha256"),
        }


# ----------------------------------------------------------------------------------------- training


@dataclass
class _Budget:
    """Schedule length and time limit: ``steps`` fixes the cosine schedule (deterministic); ``seconds``
    alone fits the schedule to the budget from the speed of the first steps; both: ``seconds`` is a hard stop."""

    steps: int | None
    seconds: float | None
    default_steps: int
    calibration_steps: int = 10

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) < 1):
            raise ClipleakError(f"steps must be a positive integer, got {self.steps!r}")
        if self.seconds is not None and not float(self.seconds) > 0:
            raise ClipleakError(f"seconds must be positive, got {self.seconds!r}")
        if self.steps is None and self.seconds is None:
            self.steps = self.default_steps


def _lr(base: float, step: int, total: int | None) -> float:
    if total is None:  # calibrating: cosine factor ~1 at the start anyway
        return base
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _train_loop(
    model: nn.Module,
    n_items: int,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    *,
    budget: _Budget,
    lr: float,
    batch: int,
    seed: int,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """Adam with cosine decay over shuffled mini-batches of ``range(n_items)``; returns training info."""
    if n_items < 2:
        raise ClipleakError("need at least 2 training images")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = int(budget.steps) if budget.steps is not None else None
    batch = min(batch, n_items)
    order = torch.randperm(n_items, generator=g)
    pos = 0
    step = 0
    running = float("nan")
    t0 = time.perf_counter()
    stopped = None
    model.train()
    while total is None or step < total:
        elapsed = time.perf_counter() - t0
        if budget.seconds is not None and elapsed >= budget.seconds:
            stopped = f"time budget of {budget.seconds:g} s reached at step {step}"
            break
        if pos + batch > n_items:
            order, pos = torch.randperm(n_items, generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = _lr(lr, step, total)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(idx, g)
        loss.backward()
        opt.step()
        step += 1
        v = float(loss.detach())
        running = v if math.isnan(running) else 0.98 * running + 0.02 * v
        if total is None and step == budget.calibration_steps:
            per_step = (time.perf_counter() - t0) / step
            total = max(step + 1, int(float(budget.seconds or 0) / per_step))
        if progress is not None:
            progress(step, total or 0, {"phase": "train", "loss": running, "lr": opt.param_groups[0]["lr"],
                                        "elapsed_s": time.perf_counter() - t0})
    model.eval()
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress(step, total or step, {"phase": "done", "loss": running, "lr": 0.0, "elapsed_s": seconds})
    return {"steps_done": step, "schedule_steps": total, "train_seconds": round(seconds, 3),
            "final_loss": running, "stopped_early": stopped}


def _train_images(public: ImageSet, images: torch.Tensor | None = None) -> torch.Tensor:
    """The prior's training targets: ``images`` (default the public ones) with the channels the prior
    models (one for a grayscale set)."""
    if len(public) < 2:
        raise ClipleakError("need at least 2 public images to train a prior")
    x = public.images if images is None else images
    x = x[:, :1] if public.grayscale else x
    return x.contiguous().float()


def train_vae(
    public: ImageSet,
    *,
    latent: int = 32,
    steps: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    batch: int = 64,
    lr: float = 1e-3,
    beta: float = 1.0,
    width: int = 32,
    progress: ProgressFn | None = None,
) -> ConvVAE:
    """Train a :class:`ConvVAE` on public images (BCE reconstruction + ``beta`` x KL, summed per image).

    Adam, cosine decay from ``lr``, batch ``batch``; default schedule :data:`DEFAULT_VAE_STEPS` steps.
    Deterministic for fixed ``steps`` and thread count (``seconds`` alone fits the step count to the
    time budget, which depends on the machine). The training record is in ``vae.card["training"]``.
    """
    x = _train_images(public)
    budget = _Budget(steps, seconds, DEFAULT_VAE_STEPS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = ConvVAE(int(x.shape[-1]), x.shape[1], latent, width)

    def loss_fn(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = x[idx]
        logits, mu, logvar = vae(xb, generator=g)
        rec = F.binary_cross_entropy_with_logits(logits, xb, reduction="sum") / xb.shape[0]
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / xb.shape[0]
        return rec + beta * kl

    info = _train_loop(vae, x.shape[0], loss_fn, budget=budget, lr=lr, batch=batch, seed=seed, progress=progress)
    vae.requires_grad_(False)
    vae.card = {"training": {"recipe": {"loss": "BCE + beta*KL (sum per image)", "beta": beta, "optimizer": "Adam",
                                        "lr": lr, "decay": "cosine", "batch": batch, "seed": seed, "latent": latent,
                                        "width": width,
                                        "steps": steps, "seconds": seconds},
                             "data": public.source, "n_images": len(public), **info}}
    return vae


def train_decoder(
    clip: ClipModel,
    public: ImageSet,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    batch: int = 64,
    lr: float = 2e-3,
    feature_noise: float = 0.0,
    augment_copies: int = 0,
    base: int = 64,
    whiten: bool = True,
    progress: ProgressFn | None = None,
) -> FeatureDecoder:
    """Train a :class:`FeatureDecoder` for the frozen target ``clip`` on public (feature, image) pairs.

    Loss L1 + MSE, Adam with cosine decay from ``lr``, batch ``batch``; default schedule
    :data:`DEFAULT_DECODER_STEPS` steps. The features are computed once (not counted in
    ``train_seconds``). ``feature_noise`` > 0 adds Gaussian noise of that norm-relative scale to the
    features during training (re-normalised), for robustness to imperfectly recovered features.
    ``augment_copies`` adds that many random small affine copies of every public image (shift, rotation,
    scale, as in pretraining; seeded), their features computed once by the frozen target: many more
    (feature, image) pairs than the public split holds, so the decoder learns the encoder's inverse
    rather than the public digits.
    ``base`` is the decoder's widest channel count; ``whiten`` whitens its input with the public
    features' statistics (:meth:`FeatureDecoder.fit_whitening`).
    """
    if public.images.shape[-1] != clip.image_size:
        raise ClipleakError(f"public images are {public.images.shape[-1]} px but the target takes "
                            f"{clip.image_size} px")
    if augment_copies < 0:
        raise ClipleakError(f"augment_copies must be >= 0, got {augment_copies}")
    if feature_noise < 0:
        raise ClipleakError(f"feature_noise must be >= 0, got {feature_noise}")
    t_feat = time.perf_counter()
    if progress is not None:
        progress(0, 0, {"phase": "features", "loss": float("nan"), "lr": 0.0, "elapsed_s": 0.0})
    images = public.images
    if augment_copies:
        from .pretrain import PretrainConfig, _augment

        g_aug = torch.Generator().manual_seed(seed + 7919)
        copies = [_augment(images, PretrainConfig(), g_aug, public.grayscale) for _ in range(augment_copies)]
        images = torch.cat([images, *copies])
    x = _train_images(public, images)
    feats = clip_features(clip, images)
    feat_seconds = time.perf_counter() - t_feat
    budget = _Budget(steps, seconds, DEFAULT_DECODER_STEPS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = FeatureDecoder(int(feats.shape[1]), int(x.shape[-1]), x.shape[1], base=base, whiten=whiten)
    if whiten:
        dec.fit_whitening(feats)

    def loss_fn(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = x[idx]
        f = feats[idx]
        if feature_noise > 0:
            f = F.normalize(f + feature_noise / math.sqrt(f.shape[1]) * torch.randn(f.shape, generator=g), dim=-1)
        out = dec(f)
        out = out[:, :1] if x.shape[1] == 1 else out
        return F.l1_loss(out, xb) + F.mse_loss(out, xb)

    info = _train_loop(dec, x.shape[0], loss_fn, budget=budget, lr=lr, batch=batch, seed=seed, progress=progress)
    info["n_pairs"] = int(x.shape[0])
    dec.requires_grad_(False)
    dec.card = {
        "training": {"recipe": {"loss": "L1 + MSE", "optimizer": "Adam", "lr": lr, "decay": "cosine", "batch": batch,
                                "seed": seed, "feature_noise": feature_noise, "augment_copies": augment_copies,
                                "base": base, "whiten": whiten, "steps": steps, "seconds": seconds},
                     "data": public.source, "n_images": len(public), "feature_seconds": round(feat_seconds, 3),
                     **info},
        "target": {"arch": clip.arch, "weights": clip.weights, "weights_sha256": clip.weights_sha256},
    }
    return dec


# --------------------------------------------------------------------------------------- save / load


def _card_path(path: Path) -> Path:
    return path.with_name(path.stem + ".json")


def _weights_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if p.suffix != ".safetensors":
        raise ClipleakError(f"a prior file must end in .safetensors, got {p}")
    return p


def save_prior(prior: Prior, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors) and ``<stem>.json`` (the card); returns the weights path.

    The card holds ``kind``, ``arch`` (constructor arguments: image size, channels, latent or embed
    dims), the prior's own training record (``prior.card``), everything in ``card`` (data spec,
    quality numbers, ...) and the weights file's SHA-256.
    """
    from safetensors.torch import save_file

    if not isinstance(prior, ConvVAE | FeatureDecoder):
        raise ClipleakError(f"not a prior: {type(prior).__name__}")
    p = _weights_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in prior.state_dict().items()}
    save_file(sd, str(p))
    full = {**prior.card, **(card or {})}
    full.update({"format": FORMAT, "kind": prior.kind, "arch": prior.arch(), "image_size": prior.image_size,
                 "channels": prior.channels, "file_sha256": file_sha256(p)})
    if isinstance(prior, ConvVAE):
        full["latent"] = prior.latent
    else:
        full["embed_dim"] = prior.embed_dim
    _card_path(p).write_text(json.dumps(full, indent=2, default=str))
    prior.card = full
    return p


def load_prior(path: str | Path) -> Prior:
    """Read a prior written by :func:`save_prior` (or a registered name such as ``tiny-mnist-vae``,
    trained on first use by :func:`resolve_prior`). Returned in eval mode, frozen; ``.card`` holds the card.

    Raises :class:`ClipleakError` when the file or its card is missing, unreadable, modified since it was
    saved (SHA-256 mismatch), or does not fit the architecture its card describes.
    """
    from safetensors.torch import load_file

    if isinstance(path, str) and path in PRIOR_ARTIFACTS and not Path(path).exists():
        path = resolve_prior(path)
    p = _weights_path(path)
    cp = _card_path(p)
    if not p.is_file():
        raise ClipleakError(f"prior file not found: {p}")
    if not cp.is_file():
        raise ClipleakError(f"prior card not found: {cp} (save priors with save_prior / `clipleak prior train`)")
    try:
        card = json.loads(cp.read_text())
        if not isinstance(card, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ClipleakError(f"cannot read prior card {cp}: {e}") from e
    if card.get("format") != FORMAT or card.get("kind") not in KINDS or not isinstance(card.get("arch"), dict):
        raise ClipleakError(f"{cp} is not a clipleak prior card (format {FORMAT!r}, kind vae|decoder)")
    sha = file_sha256(p)
    if card.get("file_sha256") not in (None, sha):
        raise ClipleakError(f"prior file {p} does not match its card (SHA-256 differs): corrupt or modified")
    try:
        sd = load_file(str(p))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ClipleakError(f"cannot read prior weights {p}: {e}") from e
    cls = ConvVAE if card["kind"] == "vae" else FeatureDecoder
    try:
        prior = cls(**card["arch"])
        prior.load_state_dict(sd, strict=True)
    except (TypeError, RuntimeError) as e:
        raise ClipleakError(f"prior weights {p} do not fit the architecture in its card: {e}") from e
    prior.eval().requires_grad_(False)
    prior.card = card
    return prior


def check_prior(prior: Prior, image_size: int, weights_sha256: str | None = None, kind: str | None = None) -> None:
    """Raise :class:`ClipleakError` unless ``prior`` fits the target.

    Checks the kind (if given), the resolution, and for a decoder the target weights it was trained for
    (when ``weights_sha256`` is given): a decoder learned for one CLIP's features is meaningless for another.
    """
    if kind is not None and prior.kind != kind:
        raise ClipleakError(f"expected a {kind} prior, got a {prior.kind}")
    if prior.image_size != int(image_size):
        raise ClipleakError(f"the {prior.kind} prior makes {prior.image_size} px images but the target takes "
                            f"{image_size} px; train one for this resolution (`clipleak prior train`)")
    if prior.kind == "decoder" and weights_sha256 is not None:
        trained_for = (prior.card.get("target") or {}).get("weights_sha256")
        if trained_for is None:
            raise ClipleakError("this feature decoder's card does not say which target weights it was trained for")
        if trained_for != weights_sha256:
            raise ClipleakError(
                f"this feature decoder was trained for target weights {trained_for[:16]}..., not "
                f"{weights_sha256[:16]}...; train a decoder for this target (`clipleak prior train --kind decoder`)"
            )


# ------------------------------------------------------------------------------------- quality card


def prior_quality(prior: Prior, private: ImageSet, public: ImageSet | None = None,
                  clip: ClipModel | None = None) -> dict[str, Any]:
    """Quality numbers for a card: mean PSNR (dB) of the prior's reconstruction of ``private`` images.

    VAE: ``decode(encode(x).mu)``; decoder: ``decoder(feature(x))`` (needs ``clip``). With ``public``,
    the class-prototype baseline (mean public image of the true class) on the same images is added.
    """
    from .metrics import psnr

    x = private.images.contiguous().float()
    if isinstance(prior, ConvVAE):
        with torch.no_grad():
            rec = prior.decode(vae_codes(prior, x))
        key = "private_reencode_psnr_db"
    else:
        if clip is None:
            raise ClipleakError("a decoder's quality needs the target model")
        rec = decoder_images(prior, clip_features(clip, x))
        key = "private_decode_psnr_db"
    out: dict[str, Any] = {key: round(float(psnr(rec, x).mean()), 3), "n_private": len(private),
                           "private_data": private.source}
    if public is not None:
        proto = public.prototypes()[private.labels]
        out["private_prototype_psnr_db"] = round(float(psnr(proto, x).mean()), 3)
    return out


# ------------------------------------------------------------------------------------ named priors


@dataclass(frozen=True)
class PriorRecipe:
    """How a named prior is built: kind, target artifact, data and training schedule."""

    kind: str
    target: str  # a clipleak artifact name (the decoder's frozen CLIP; the VAE only takes its resolution)
    arch: str
    image_size: int
    data: str = "mnist"
    split_seed: int = 0
    steps: int = 3000
    seed: int = 0
    latent: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRIOR_ARTIFACTS: dict[str, PriorRecipe] = {
    "tiny-mnist-vae": PriorRecipe("vae", "tiny-mnist", "tiny-32", 32, steps=DEFAULT_VAE_STEPS),
    "tiny-mnist-decoder": PriorRecipe("decoder", "tiny-mnist", "tiny-32", 32, steps=DEFAULT_DECODER_STEPS),
}


def prior_path(name: str) -> Path:
    """Where named prior ``name`` lives in the artifact cache (built or not)."""
    from . import artifacts

    if name not in PRIOR_ARTIFACTS:
        raise ClipleakError(f"unknown prior {name!r}; registered: {', '.join(sorted(PRIOR_ARTIFACTS))}")
    return artifacts.cache_dir() / f"{name}.safetensors"


def _is_current(name: str, path: Path, target_sha: str | None) -> bool:
    cp = _card_path(path)
    if not path.is_file() or not cp.is_file():
        return False
    try:
        card = json.loads(cp.read_text())
    except (OSError, ValueError):
        return False
    if card.get("recipe") != PRIOR_ARTIFACTS[name].to_dict() or card.get("file_sha256") != file_sha256(path):
        return False
    return target_sha is None or (card.get("target") or {}).get("weights_sha256") == target_sha


def _stderr_progress(name: str) -> ProgressFn:
    state = {"last": 0.0}

    def cb(step: int, total: int, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if info.get("phase") == "features":
            print(f"[clipleak] training prior {name}: CLIP features of the public images", file=sys.stderr, flush=True)
            return
        if info.get("phase") == "train" and now - state["last"] < 10:
            return
        state["last"] = now
        print(f"[clipleak] training prior {name}: step {step}/{total}, loss {info['loss']:.4f}, "
              f"{info['elapsed_s']:.0f} s", file=sys.stderr, flush=True)

    return cb


def build_prior(
    kind: str,
    *,
    data: str = "mnist",
    arch: str = "tiny-32",
    weights: str | None = None,
    split_seed: int = 0,
    steps: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    latent: int = 32,
    feature_noise: float = 0.0,
    progress: ProgressFn | None = None,
    quality: bool = True,
) -> Prior:
    """Train a prior of ``kind`` for target ``arch``/``weights`` on ``data``'s public split, card filled in.

    The card gets the data spec, the target (for a decoder) and, with ``quality``, the PSNR on the
    private split next to the class-prototype baseline (:func:`prior_quality`). ``feature_noise``
    (decoder only) trains on noisy features, for features that are fitted rather than exact (CoOp).
    """
    from .data import DataSpec, load_public
    from .models import build_model

    if kind not in KINDS:
        raise ClipleakError(f"unknown prior kind {kind!r}; choose vae or decoder")
    if feature_noise < 0 or (feature_noise > 0 and kind != "decoder"):
        raise ClipleakError(f"feature noise must be >= 0 and only applies to a decoder, got {feature_noise} "
                            f"for a {kind}")
    if kind == "decoder" and weights is None:
        raise ClipleakError("a feature decoder needs the target's trained weights (--weights PATH or tiny-mnist): "
                            "a random-init CLIP gives every image nearly the same feature")
    spec = DataSpec.parse(data, split_seed=split_seed)
    clip = build_model(arch, weights)
    public = load_public(spec, clip.image_size)
    if kind == "vae":
        prior: Prior = train_vae(public, latent=latent, steps=steps, seconds=seconds, seed=seed, progress=progress)
    else:
        prior = train_decoder(clip, public, steps=steps, seconds=seconds, seed=seed, feature_noise=feature_noise,
                              progress=progress)
    prior.card["data"] = spec.to_dict()
    prior.card["for_arch"] = arch
    if quality:
        from .client import load_private  # the card's quality number only; the prior never sees these

        prior.card["quality"] = prior_quality(prior, load_private(spec, clip.image_size), public,
                                              clip if kind == "decoder" else None)
    return prior


def resolve_prior(name: str, progress: ProgressFn | None = None, *, rebuild: bool = False) -> Path:
    """Path of named prior ``name`` (``tiny-mnist-vae``, ``tiny-mnist-decoder``), training it on first use.

    The file lives in :func:`clipleak.artifacts.cache_dir`; it is rebuilt when its card does not match
    the registered recipe, the file does not match its card, or (decoder) the target artifact changed.
    Resolving a decoder resolves its target CLIP first (pretraining it if needed).
    """
    from . import artifacts

    path = prior_path(name)
    recipe = PRIOR_ARTIFACTS[name]
    target_sha = None
    target_path: Path | None = None
    if recipe.kind == "decoder":
        target_path = artifacts.resolve(recipe.target)
        target_sha = file_sha256(target_path)
    if not rebuild and _is_current(name, path, target_sha):
        return path
    from .artifacts import _build_lock

    with _build_lock(path):
        if not rebuild and _is_current(name, path, target_sha):
            return path
        print(f"[clipleak] prior {name!r} is not in {path.parent} yet: one-time training "
              f"({recipe.steps} steps); later uses load the file.", file=sys.stderr, flush=True)
        prior = build_prior(recipe.kind, data=recipe.data, arch=recipe.arch,
                            weights=str(target_path) if target_path else None, split_seed=recipe.split_seed,
                            steps=recipe.steps, seed=recipe.seed, latent=recipe.latent,
                            progress=progress or _stderr_progress(name))
        save_prior(prior, path, {"name": name, "recipe": recipe.to_dict()})
    return path
