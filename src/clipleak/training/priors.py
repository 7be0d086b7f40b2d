"""Training the learned priors (VAE, feature decoder, GradViT's BN prior CNN) on the public split, on the one
training loop."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import AffineRange, DataSpec, ImageSet, load_public, load_validation, random_affine, resize_images
from ..errors import ClipleakError
from ..evaluation import psnr
from ..models import ClipModel, build_model, image_features
from ..priors import KINDS, ConvVAE, FeatureDecoder, Prior, PriorCNN, bn_statistics_loss, decoder_images, vae_codes
from ..records import ProgressEvent, ProgressFn, load_checkpoint, write_checkpoint
from .loop import Budget, LoopState, train_loop

DEFAULT_VAE_STEPS = 2000
DEFAULT_DECODER_STEPS = 2000
DEFAULT_CNN_STEPS = 600


def _cosine_lr(base: float, step: int, total: int | None) -> float:
    if total is None:  # calibrating: cosine factor ~1 at the start anyway
        return base
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


T = TypeVar("T")
CKPT_FORMAT = "clipleak-prior-checkpoint-1"
DEFAULT_CHECKPOINT_EVERY = 200
FEATURES_FILE = "features.safetensors"
FEATURES_KEY = "features.json"


@dataclass
class PriorCheckpoints:
    """Where a prior's training keeps its progress, so that a killed run continues instead of starting over.

    ``root`` holds the latest checkpoint (the prior's weights and buffers as safetensors, Adam's state via
    ``torch.save``, re-read with ``weights_only=True``, the batch order and its generator, the loop's
    step and schedule), written every ``every`` steps and when a time budget stops the run, and, for a
    decoder, the target's features of the public images (computed once: with a large target they are most of
    the cost). ``resume=False`` starts over (the checkpoints are cleared); ``resume=True`` continues from the latest
    checkpoint when its settings are the run's and starts from step 0 when there is none: the resumed run
    continues bitwise. ``clear()`` removes ``root`` (once the prior is saved)."""

    root: Path
    resume: bool = False
    every: int = DEFAULT_CHECKPOINT_EVERY

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if isinstance(self.every, bool) or int(self.every) < 1:
            raise ClipleakError(f"checkpoints every {self.every!r} steps: give a positive number")

    def clear(self) -> None:
        """Remove the checkpoints (the prior they led to is saved)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def begin(self, key: dict[str, Any], read_files: Callable[[Path], T]) -> tuple[dict[str, Any], T] | None:
        """Without ``resume``, clear the checkpoints (a decoder's features, just written by this run, stay) and
        return ``None``. With it, the latest checkpoint's state and ``read_files(folder)``, ``None`` when there
        is none; a checkpoint made with other settings than ``key`` is refused, naming them."""
        if not self.resume:
            for entry in self.root.iterdir() if self.root.is_dir() else []:
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.name not in (FEATURES_FILE, FEATURES_KEY):
                    entry.unlink()
            return None
        saved = load_checkpoint(self.root, read_files, hint=f"delete {self.root} to start over")
        if saved is None:
            return None
        old = saved[0].get("key", {})
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        if saved[0].get("format") != CKPT_FORMAT or diff:
            raise ClipleakError(f"cannot resume from {self.root}: it was started with different settings "
                                f"({', '.join(diff) or 'format'}); use the same ones or delete {self.root} to "
                                "start over")
        return saved

    def cached_features(self, key: dict[str, Any]) -> torch.Tensor | None:
        """The features an earlier run of these settings (``key``) kept, when resuming; else ``None``."""
        path = self.root / FEATURES_FILE
        if not (self.resume and path.is_file()):
            return None
        try:
            if json.loads((self.root / FEATURES_KEY).read_text()) != key:
                return None
            return load_file(str(path))["features"]
        except Exception:  # noqa: BLE001 - a damaged file: they are computed again
            return None

    def keep_features(self, feats: torch.Tensor, key: dict[str, Any]) -> None:
        """Keep ``feats`` (made with settings ``key``) for a resumed run."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / FEATURES_FILE
        path.unlink(missing_ok=True)  # then the key, then the file: a kill anywhere leaves no file to mistrust
        (self.root / FEATURES_KEY).write_text(json.dumps(key))
        tmp = path.with_name(path.name + ".tmp")
        save_file({"features": feats.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(path)


def _fit(model: nn.Module, n_items: int, loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], *,
         budget: Budget, lr: float, batch: int, seed: int, task: str,
         progress: ProgressFn | None, checkpoints: PriorCheckpoints | None = None,
         key: dict[str, Any] | None = None) -> dict[str, Any]:
    """Adam with cosine decay over shuffled mini-batches of ``range(n_items)``, run by :func:`train_loop`;
    with ``checkpoints``, saved as it goes and continued from there (``key``: the run's settings)."""
    if n_items < 2:
        raise ClipleakError("need at least 2 training images")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = min(batch, n_items)
    order: dict[str, Any] = {"perm": torch.randperm(n_items, generator=g), "pos": 0}
    full_key = {**(key or {}), "n_items": int(n_items), "lr": lr, "batch": batch, "seed": seed,
                "steps": budget.steps}
    state: LoopState | None = None
    resumed_from: list[int] = []
    saved = checkpoints.begin(full_key, _read_fit) if checkpoints is not None else None
    if saved is not None:
        st_dict, (sd, opt_sd, extra) = saved
        model.load_state_dict(sd, strict=True)
        opt.load_state_dict(opt_sd)
        g.set_state(extra["generator"])
        order["perm"], order["pos"] = extra["perm"], int(st_dict["pos"])
        state = LoopState.from_dict(st_dict)
        resumed_from = [*st_dict.get("resumed_from", []), state.step]

    def step(s: int, total: int | None) -> float:
        if order["pos"] + batch > n_items:
            order["perm"], order["pos"] = torch.randperm(n_items, generator=g), 0
        pos = int(order["pos"])
        idx = order["perm"][pos:pos + batch]
        order["pos"] = pos + batch
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(lr, s, total)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(idx, g)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def save(st: LoopState) -> None:
        assert checkpoints is not None

        def write(d: Path) -> None:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
                      str(d / "model.safetensors"))
            torch.save(opt.state_dict(), d / "optimizer.pt")
            save_file({"generator": g.get_state(), "perm": order["perm"].contiguous()}, str(d / "order.safetensors"))

        write_checkpoint(checkpoints.root, st.step, {"format": CKPT_FORMAT, "key": full_key, "pos": order["pos"],
                                                     "resumed_from": resumed_from, **st.to_dict()}, write)

    model.train()
    st = train_loop(step, budget, task=task, state=state, progress=progress,
                    lr_of=lambda s, t: _cosine_lr(lr, s, t), checkpoint=save if checkpoints is not None else None,
                    checkpoint_every=checkpoints.every if checkpoints is not None else 10**9)
    model.eval()
    return {"steps_done": st.step, "schedule_steps": st.total, "train_seconds": round(st.train_seconds, 3),
            "final_loss": st.running_loss(), "stopped_early": st.stopped,
            **({"resumed_from_steps": resumed_from} if resumed_from else {})}


def _read_fit(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    return (load_file(str(d / "model.safetensors")),
            torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True),
            load_file(str(d / "order.safetensors")))


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
    task: str = "train vae",
    device: str | torch.device = "cpu",
    checkpoints: PriorCheckpoints | None = None,
) -> ConvVAE:
    """Train a :class:`ConvVAE` on public images (BCE reconstruction + ``beta`` x KL, summed per image).

    Adam, cosine decay from ``lr``, batch ``batch``; default schedule :data:`DEFAULT_VAE_STEPS` steps.
    Deterministic for fixed ``steps`` and thread count (``seconds`` alone fits the step count to the
    time budget, which depends on the machine). The training record is in ``vae.card["training"]``.
    Trained on ``device`` (init, batch order and noise drawn on the CPU); returned on the CPU.
    ``checkpoints``: save progress there and continue from it (:class:`PriorCheckpoints`).
    """
    x = _train_images(public).to(device)
    budget = Budget(steps if steps is not None or seconds is not None else DEFAULT_VAE_STEPS, seconds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = ConvVAE(int(x.shape[-1]), x.shape[1], latent, width).to(device)

    def loss_fn(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = x[idx]
        logits, mu, logvar = vae(xb, generator=g)
        rec = F.binary_cross_entropy_with_logits(logits, xb, reduction="sum") / xb.shape[0]
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / xb.shape[0]
        return rec + beta * kl

    key = None if checkpoints is None else {"kind": "vae", "data": public.digest(), "latent": latent, "beta": beta,
                                            "width": width}
    info = _fit(vae, x.shape[0], loss_fn, budget=budget, lr=lr, batch=batch, seed=seed, task=task,
                progress=progress, checkpoints=checkpoints, key=key)
    vae.requires_grad_(False).cpu()
    vae.card = {"training": {"recipe": {"loss": "BCE + beta*KL (sum per image)", "beta": beta, "optimizer": "Adam",
                                        "lr": lr, "decay": "cosine", "batch": batch, "seed": seed, "latent": latent,
                                        "width": width, "steps": steps, "seconds": seconds},
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
    work_size: int | None = None,
    progress: ProgressFn | None = None,
    task: str = "train decoder",
    device: str | torch.device | None = None,
    checkpoints: PriorCheckpoints | None = None,
) -> FeatureDecoder:
    """Train a :class:`FeatureDecoder` for the frozen target ``clip`` on public (feature, image) pairs.

    Loss L1 + MSE, Adam with cosine decay from ``lr``, batch ``batch``; default schedule
    :data:`DEFAULT_DECODER_STEPS` steps. The features are computed once (not counted in
    ``train_seconds``). ``feature_noise`` > 0 adds Gaussian noise of that norm-relative scale to the
    features during training (re-normalised), for robustness to imperfectly recovered features.
    ``augment_copies`` adds that many random small affine copies of every public image (shift, rotation,
    scale, as in pretraining; seeded), their features computed once by the frozen target.
    ``base`` is the decoder's widest channel count; ``whiten`` whitens its input with the public
    features' statistics (:meth:`FeatureDecoder.fit_whitening`). ``work_size`` is the side its convolution
    stack works at (resized to the image size; default: the image size); the loss is then taken there, against
    the images resized to it (bilinear, antialiased, as the data are): the same target up to the resize, at a
    fraction of the cost (1/64 of the pixels for a 224 px decoder at 28 px). Trained on ``device`` (default:
    the target's), returned on the CPU. ``checkpoints``: save progress there, with the features, and continue
    from it (:class:`PriorCheckpoints`).
    """
    dev = torch.device(device) if device is not None else clip.model.logit_scale.device
    if public.images.shape[-1] != clip.image_size:
        raise ClipleakError(f"public images are {public.images.shape[-1]} px but the target takes "
                            f"{clip.image_size} px")
    if augment_copies < 0:
        raise ClipleakError(f"augment_copies must be >= 0, got {augment_copies}")
    if feature_noise < 0:
        raise ClipleakError(f"feature_noise must be >= 0, got {feature_noise}")
    t_feat = time.perf_counter()
    if progress is not None:
        progress(ProgressEvent(task, 0, steps, phase="load", note="target features of the public images"))
    side = int(public.images.shape[-1])
    loss_side = int(work_size) if work_size is not None and int(work_size) != side else None

    def targets(images: torch.Tensor) -> torch.Tensor:  # what the loss compares with (at the work size)
        t = _train_images(public, images)
        return resize_images(t, loss_side) if loss_side is not None else t

    kept = fkey = key = None
    if checkpoints is not None:  # what the features depend on, and the rest of the run's settings
        fkey = {"target": clip.weights_sha256, "arch": clip.arch, "data": public.digest(),
                "augment_copies": augment_copies, "seed": seed}
        key = {"kind": "decoder", **fkey, "feature_noise": feature_noise, "base": base, "whiten": whiten,
               "work_size": work_size}
        kept = checkpoints.cached_features(fkey)
    # one copy at a time (a copy of 4,000 digits at 224 px is 2.4 GB): its targets and its features
    xs = [targets(public.images)]
    fs = [image_features(clip, public.images)] if kept is None else []
    g_aug = torch.Generator().manual_seed(seed + 7919)
    for _ in range(augment_copies):
        copy = random_affine(public.images, AffineRange(), g_aug, public.grayscale)
        xs.append(targets(copy))
        if kept is None:
            fs.append(image_features(clip, copy))
        del copy
    x, feats = torch.cat(xs).to(dev), (torch.cat(fs) if kept is None else kept).to(dev)
    del xs, fs
    if checkpoints is not None and fkey is not None and kept is None:
        checkpoints.keep_features(feats, fkey)
    feat_seconds = time.perf_counter() - t_feat
    budget = Budget(steps if steps is not None or seconds is not None else DEFAULT_DECODER_STEPS, seconds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = FeatureDecoder(int(feats.shape[1]), side, x.shape[1], base=base, whiten=whiten,
                             work_size=work_size).to(dev)
    if whiten:
        dec.fit_whitening(feats)

    def loss_fn(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = x[idx]
        f = feats[idx]
        if feature_noise > 0:
            noise = torch.randn(f.shape, generator=g).to(dev)  # the CPU generator of the batch order
            f = F.normalize(f + feature_noise / math.sqrt(f.shape[1]) * noise, dim=-1)
        out = torch.sigmoid(dec.work_logits(f)) if loss_side is not None else dec(f)
        out = out[:, :1] if x.shape[1] == 1 else out
        return F.l1_loss(out, xb) + F.mse_loss(out, xb)

    info = _fit(dec, x.shape[0], loss_fn, budget=budget, lr=lr, batch=batch, seed=seed, task=task,
                progress=progress, checkpoints=checkpoints, key=key)
    info["n_pairs"] = int(x.shape[0])
    dec.requires_grad_(False).cpu()
    dec.card = {
        "training": {"recipe": {"loss": "L1 + MSE", "optimizer": "Adam", "lr": lr, "decay": "cosine", "batch": batch,
                                "seed": seed, "feature_noise": feature_noise, "augment_copies": augment_copies,
                                "base": base, "whiten": whiten, "steps": steps, "seconds": seconds,
                                **({"work_size": work_size, "loss_at": "work size"} if work_size is not None
                                   else {})},
                     "data": public.source, "n_images": len(public), "feature_seconds": round(feat_seconds, 3),
                     **info},
        "target": {"arch": clip.arch, "weights": clip.weights, "weights_sha256": clip.weights_sha256},
    }
    return dec


def train_cnn(
    public: ImageSet,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    batch: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    depth: int = 3,
    progress: ProgressFn | None = None,
    task: str = "train cnn",
    device: str | torch.device = "cpu",
    checkpoints: PriorCheckpoints | None = None,
) -> PriorCNN:
    """Train GradViT's prior network, a :class:`PriorCNN` classifier, on the public images (cross-entropy,
    Adam with cosine decay, default :data:`DEFAULT_CNN_STEPS` steps), then calibrate its BatchNorm running
    statistics to the exact statistics of the public images (:meth:`PriorCNN.calibrate`). Trained on
    ``device``, returned on the CPU."""
    x = _train_images(public).to(device)
    y = public.labels.long().to(device)
    budget = Budget(steps if steps is not None or seconds is not None else DEFAULT_CNN_STEPS, seconds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = PriorCNN(int(x.shape[-1]), x.shape[1], len(public.classnames), width=width, depth=depth).to(device)

    def loss_fn(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(net(x[idx]), y[idx])

    key = None if checkpoints is None else {"kind": "cnn", "data": public.digest(), "width": width, "depth": depth}
    info = _fit(net, x.shape[0], loss_fn, budget=budget, lr=lr, batch=batch, seed=seed, task=task,
                progress=progress, checkpoints=checkpoints, key=key)
    net.calibrate(x)
    net.requires_grad_(False).cpu()
    net.card = {"training": {"recipe": {"loss": "cross-entropy", "optimizer": "Adam", "lr": lr, "decay": "cosine",
                                        "batch": batch, "seed": seed, "width": width, "depth": depth,
                                        "steps": steps, "seconds": seconds,
                                        "bn_statistics": "calibrated: exact statistics of the public images"},
                             "data": public.source, "n_images": len(public), **info}}
    return net


def cnn_quality(net: PriorCNN, images: ImageSet, split: str = "validation", seed: int = 0) -> dict[str, Any]:
    """A prior CNN's card numbers: accuracy on ``images`` and its BN prior on them (batches of 4) next to
    the prior of uniform noise batches of the same size."""
    x = images.images.contiguous().float()
    with torch.no_grad():
        net.eval()
        acc = float((net(x).argmax(-1) == images.labels).float().mean())
        real = [float(bn_statistics_loss(net, x[i:i + 4])) for i in range(0, min(len(x), 200), 4)]
        g = torch.Generator().manual_seed(seed)
        noise = [float(bn_statistics_loss(net, torch.rand(4, *x.shape[1:], generator=g))) for _ in range(10)]
    return {f"{split}_accuracy": round(acc, 4), f"n_{split}": len(images), f"{split}_data": images.source,
            f"{split}_bn_prior_batch4_mean": round(sum(real) / len(real), 4),
            "noise_bn_prior_batch4_mean": round(sum(noise) / len(noise), 4)}


def prior_quality(prior: Prior, images: ImageSet, public: ImageSet | None = None,
                  clip: ClipModel | None = None, split: str = "validation") -> dict[str, Any]:
    """Quality numbers for a card: mean PSNR (dB) of the prior's reconstruction of ``images``.

    VAE: ``decode(encode(x).mu)``; decoder: ``decoder(feature(x))`` (needs ``clip``). With ``public``,
    the class-prototype baseline (mean public image of the true class) on the same images is added.
    """
    x = images.images.contiguous().float()
    if isinstance(prior, PriorCNN):
        return cnn_quality(prior, images, split)
    if isinstance(prior, ConvVAE):
        with torch.no_grad():
            rec = prior.decode(vae_codes(prior, x))
        key = f"{split}_reencode_psnr_db"
    else:
        if clip is None:
            raise ClipleakError("a decoder's quality needs the target model")
        rec = decoder_images(prior, image_features(clip, x))
        key = f"{split}_decode_psnr_db"
    out: dict[str, Any] = {key: round(float(psnr(rec, x).mean()), 3), f"n_{split}": len(images),
                           f"{split}_data": images.source}
    if public is not None:
        proto = public.prototypes()[images.labels]
        out[f"{split}_prototype_psnr_db"] = round(float(psnr(proto, x).mean()), 3)
    return out


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
    augment_copies: int = 0,
    base: int = 64,
    work_size: int | None = None,
    progress: ProgressFn | None = None,
    quality: bool = True,
    task: str | None = None,
    device: str | torch.device = "cpu",
    checkpoints: PriorCheckpoints | None = None,
) -> Prior:
    """Train a prior of ``kind`` for target ``arch``/``weights`` (a file) on ``data``'s public split.

    The card gets the data spec (checked against every observation the prior is used on), the target
    (for a decoder) and, with ``quality``, the PSNR on the validation split next to the class-prototype
    baseline (:func:`prior_quality`). ``feature_noise`` (decoder only) trains on noisy features, for
    features that are fitted rather than exact (CoOp). ``augment_copies`` (decoder only) adds that many
    small random affine copies of every public image and ``base`` (decoder only) is its widest channel
    count and ``work_size`` (decoder only) the side its convolutions work at (:func:`train_decoder`).
    ``device``: where the target and the prior compute; the prior comes back on the CPU (what is saved).
    ``checkpoints``: save progress there and continue from it (:class:`PriorCheckpoints`; call its
    ``clear()`` once the prior is saved).
    """
    if kind not in KINDS:
        raise ClipleakError(f"unknown prior kind {kind!r}; choose vae, decoder or cnn")
    if feature_noise < 0 or (feature_noise > 0 and kind != "decoder"):
        raise ClipleakError(f"feature noise must be >= 0 and only applies to a decoder, got {feature_noise} "
                            f"for a {kind}")
    if augment_copies < 0 or (augment_copies > 0 and kind != "decoder"):
        raise ClipleakError(f"augment copies must be >= 0 and only apply to a decoder, got {augment_copies} "
                            f"for a {kind}")
    if base != 64 and kind != "decoder":
        raise ClipleakError(f"base (the channel width) only applies to a decoder, got {base} for a {kind}")
    if work_size is not None and kind != "decoder":
        raise ClipleakError(f"work_size only applies to a decoder, got {work_size} for a {kind}")
    if kind == "decoder" and weights is None:
        raise ClipleakError("a feature decoder needs the target's trained weights (--weights PATH or tiny-mnist): "
                            "a random-init CLIP gives every image nearly the same feature")
    spec = DataSpec.parse(data, split_seed=split_seed)
    clip = build_model(arch, weights, device=device)
    public = load_public(spec, clip.image_size)
    name = task or f"train {kind}"
    if kind == "cnn":
        prior: Prior = train_cnn(public, steps=steps, seconds=seconds, seed=seed, progress=progress, task=name,
                                 device=device, checkpoints=checkpoints)
    elif kind == "vae":
        prior = train_vae(public, latent=latent, steps=steps, seconds=seconds, seed=seed, progress=progress,
                          task=name, device=device, checkpoints=checkpoints)
    else:
        prior = train_decoder(clip, public, steps=steps, seconds=seconds, seed=seed, feature_noise=feature_noise,
                              augment_copies=augment_copies, base=base, work_size=work_size, progress=progress,
                              task=name, device=device, checkpoints=checkpoints)
    prior.card["data_spec"] = spec.to_dict()
    prior.card["for_arch"] = arch
    if quality:
        if progress is not None:
            progress(ProgressEvent(name, 0, None, phase="eval", note="quality on the validation split"))
        validation = load_validation(spec, clip.image_size)
        if isinstance(prior, PriorCNN):
            prior.card["quality"] = cnn_quality(prior, validation)
        else:
            prior.card["quality"] = prior_quality(prior, validation, public, clip if kind == "decoder" else None)
    return prior
