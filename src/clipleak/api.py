"""The small public API the CLI is built on: one function per stage of the data path.

    obs, truth = make_observation(peft=PeftConfig("coop"), batch_size=2)  # client side
    obs.save("runs/obs"); truth.save("runs/obs.truth")
    rec = attack_observation("runs/obs.safetensors", name="ig")          # attacker side
    rec.save("runs/rec")
    report, metrics = evaluate_reconstruction("runs/rec", "runs/obs.truth.safetensors", "runs/rec")

Names of registered artifacts (``tiny-mnist``, ``tiny-mnist-decoder``, ``generative:tiny-mnist-vae``)
are accepted wherever a weights or prior file is, and built on first use (:mod:`clipleak.artifacts`).

Every stage that computes takes ``device`` (``auto``: CUDA, then MPS, then the CPU; ``cpu``, ``cuda``,
``cuda:N``, ``mps`` or a ``torch.device``), resolved once by :func:`clipleak.devices.resolve_device`; the
records it returns and the files it writes hold CPU tensors.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import artifacts
from .attacks import ATTACKS, make_config, run_attack
from .audit import AuditConfig, run_audit
from .client import load_private, sample_batch, share
from .data import DataSpec, ImageSet, check_same_split, load_validation, public_for_observation
from .devices import resolve_device
from .errors import ClipleakError, check_range
from .evaluation import LEAKAGE_WARNING_COSINE, evaluate, public_nearest_neighbour, same_class_gradient_cosine
from .models import arch_config, build_model, read_card
from .peft import PeftConfig, build_victim, rebuild_victim
from .priors import check_prior, load_prior
from .privacy import PER_EXAMPLE_METHODS, Defense, DpSetting, parse_defense
from .records import Observation, ProgressFn, Reconstruction, Truth, digests_match
from .report import write_report
from .training import ContrastiveConfig, FinetuneConfig, contrastive_finetune, finetune

RANDOM_INIT = ("none", "random")
"""Weights names that mean a random init (seeded by ``init_seed``), as ``weights=None`` does."""

ATTACK_BOUNDS: dict[str, tuple[str, float | None, float | None, bool, bool]] = {
    "iterations": ("--iterations", 0, 100_000, False, True),
    "restarts": ("--restarts", 1, 1_000, False, True),
    "lr": ("--lr", 0, 1_000, True, False),
    "tv_weight": ("--tv", 0, 1e6, False, False),
    "search": ("--search", 0, 100_000, False, True),
    "refine": ("--refine", 0, 100_000, False, True),
}
"""Attack settings: (option, low, high, low excluded, whole number). The upper bounds are far beyond any
useful run and keep a typo from costing hours."""


def _weights_name(weights: str | None) -> str | None:
    return None if weights is None or str(weights).strip().lower() in RANDOM_INIT else weights


def make_observation(
    *,
    arch: str = "tiny-32",
    weights: str | None = None,
    init_seed: int = 0,
    data: str = "mnist",
    split_seed: int = 0,
    peft: PeftConfig | None = None,
    classnames: list[str] | None = None,
    batch_size: int = 1,
    classes: list[int] | None = None,
    distinct_classes: bool = False,
    seed: int = 0,
    include_labels: bool = False,
    part: str = "private",
    dp: DpSetting | dict[str, Any] | None = None,
    dp_seed: int | None = None,
    progress: ProgressFn | None = None,
    defense: Defense | str | None = None,
    device: str | torch.device = "auto",
) -> tuple[Observation, Truth]:
    """Client side: build the victim, draw a private batch, compute the shared gradient.

    Returns the observation (what the server receives) and the ground truth (kept by the client,
    used only for evaluation: it alone records the batch-draw seed and the private indices).
    ``part="validation"`` draws the client's images from the validation split (for tuning).
    ``distinct_classes`` gives every image of the batch a different label (``batch_size`` classes drawn
    at random, among ``classes`` if given, and one image of each).

    ``peft`` (a :class:`~clipleak.peft.PeftConfig`; default ``PeftConfig()``, CoOp) is what the client
    fine-tunes.

    ``dp`` (a :class:`~clipleak.privacy.DpSetting` or its fields as a dict, e.g.
    ``{"mechanism": "per-example", "clip": 1.0, "noise_multiplier": 1.0}``) privatises the shared
    gradient; the observation records the setting under ``meta["defense"]``. The noise seed
    ``dp_seed`` (default: a fresh secret one) goes to the truth file only. ``defense`` (a
    :class:`~clipleak.privacy.Defense` or its text, e.g. ``"prune:0.1"``) is applied to the shared gradient
    after DP and recorded under ``meta["defense"]`` too.
    """
    check_range("batch size", batch_size, low=1, high=4096, integer=True)
    dev = resolve_device(device)
    weights = _weights_name(weights)
    cfg = peft if peft is not None else PeftConfig()
    setting = DpSetting.from_dict(dp) if isinstance(dp, dict) else dp
    update_defense = parse_defense(defense) if isinstance(defense, str) else defense
    if setting is not None:
        if setting.mechanism == "per-example" and cfg.method not in PER_EXAMPLE_METHODS:
            raise ClipleakError(f"per-example DP needs a frozen image encoder ({', '.join(PER_EXAMPLE_METHODS)}), "
                                f"not {cfg.method!r}; use the per-batch mechanism")
        setting = setting.resolve()  # calibrate and check before loading anything
        if dp_seed is None:
            dp_seed = secrets.randbits(63)
    path = artifacts.resolve_path(weights, progress)
    clip = build_model(arch, path, init_seed=init_seed)
    spec = DataSpec.parse(data, split_seed=split_seed)
    if path is not None:
        check_same_split(spec, read_card(path), f"the target {Path(path).name}")
    private = load_private(spec, clip.image_size, part)
    names = classnames or private.classnames
    if len(names) != len(private.classnames):
        raise ClipleakError(
            f"{len(names)} class names given but the data set has {len(private.classnames)} classes"
        )
    victim = build_victim(clip, names, cfg, device=dev)
    images, labels, idx = sample_batch(private, batch_size, seed=seed, classes=classes,
                                     distinct_classes=distinct_classes)
    data_meta = {**spec.to_dict(), "grayscale": private.grayscale}
    obs = share(victim, images, labels, include_labels=include_labels, data=data_meta, dp=setting,
                dp_seed=dp_seed, defense=update_defense)
    truth_meta: dict[str, Any] = {"private_indices": idx.tolist(), "data": data_meta, "seed": seed,
                                  "part": part, "observation_digest": obs.digest()}
    if setting is not None:
        truth_meta["dp_seed"] = dp_seed
    truth = Truth(images=images, labels=labels, meta=truth_meta)
    return obs, truth


def _resolve_prior(prior: str, progress: ProgressFn | None) -> str:
    if prior.startswith("generative:"):
        return "generative:" + str(artifacts.resolve_path(prior.split(":", 1)[1], progress))
    return prior


def attack_observation(
    observation: str | Path | Observation,
    *,
    name: str = "ig",
    weights: str | None = None,
    progress: ProgressFn | None = None,
    device: str | torch.device = "auto",
    **settings: Any,
) -> Reconstruction:
    """Attacker side: rebuild the victim from the observation and run attack ``name``.

    Keyword arguments are the attack's typed config (``clipleak.attacks.ATTACKS[name].config``:
    iterations, restarts, lr, tv_weight, labels, seed, checkpoint, prior, decoder, bn_prior, ...); settings
    not given keep the preset's defaults. Artifact names in ``prior`` (``generative:NAME``), ``decoder``
    and ``bn_prior`` are resolved to files here.

    Everything is checked before the attack starts (settings within :data:`ATTACK_BOUNDS`, weights against
    the observation, the decoder MIP needs, each prior against the target and the split), so a bad input
    costs seconds, not the feature fit. The reconstruction records the observation's digest
    (``meta["observation_digest"]``), which :func:`evaluate_reconstruction` matches against the truth's.
    """
    if name not in ATTACKS:
        raise ClipleakError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    dev = resolve_device(device)
    for key, (option, low, high, low_open, whole) in ATTACK_BOUNDS.items():
        check_range(option, settings.get(key), low=low, high=high, low_open=low_open, integer=whole)
    obs = observation if isinstance(observation, Observation) else Observation.load(observation)
    weights = _check_weights(obs, weights)
    cfg = make_config(name, **settings)
    if name == "mip" and not getattr(cfg, "decoder", None):
        raise ClipleakError("MIP's image stage needs a feature-to-image decoder for this target (--decoder: "
                            "tiny-mnist-decoder for tiny-mnist, or one trained with `clipleak prior train --kind "
                            "decoder --weights ...`)")
    for named in (getattr(cfg, "decoder", None), str(getattr(cfg, "prior", "") or "").removeprefix("generative:"),
                  getattr(cfg, "bn_prior", None)):
        _check_named_prior(named, obs)
    if "prior" in settings:
        settings["prior"] = _resolve_prior(str(settings["prior"]), progress)
    if settings.get("decoder"):
        settings["decoder"] = artifacts.resolve_path(str(settings["decoder"]), progress)
    cfg = make_config(name, **settings)
    if getattr(cfg, "bn_prior", None):  # gradvit's prior network, by default the tiny-mnist-cnn artifact
        cfg.bn_prior = artifacts.resolve_path(str(cfg.bn_prior), progress)
    _check_priors(cfg, obs)  # priors first: they need no model, and a large model takes a while to build
    victim = rebuild_victim(obs, artifacts.resolve_path(weights, progress), device=dev)
    rec = run_attack(name, obs, victim, cfg, progress)
    rec.meta["observation_digest"] = obs.digest()
    return rec


def _check_weights(obs: Observation, weights: str | None) -> str | None:
    """``weights`` as given for ``obs``: refused when the observation was made with a random init (the
    recorded init is what the attacker rebuilds; other weights would be silently ignored)."""
    sha = str(obs.meta.get("weights_sha256", ""))
    if weights is not None and sha.startswith("random-init:"):
        if _weights_name(weights) is None:
            return None
        raise ClipleakError(f"the observation was made with a random init ({sha}), not with weights {weights!r}; "
                            "leave out --weights")
    return weights


def _check_named_prior(name: str | None, obs: Observation) -> None:
    """A registered prior artifact named for ``obs``, refused before it is built (minutes on first use) when it
    cannot fit: it makes images of another size than the target takes, or it is a decoder for a trained target
    and the observation was made with a random init."""
    if not name or not artifacts.is_artifact(name):
        return
    recipe = artifacts.get(name).recipe
    if not isinstance(recipe, artifacts.PriorRecipe):
        return
    size = int(obs.meta["image_size"])
    cfg = arch_config(recipe.arch) or {}
    made = (cfg.get("vision_cfg") or {}).get("image_size")
    if made is not None and int(made) != size:
        raise ClipleakError(f"{name} makes {made} px images but the observation's target ({obs.meta['arch']}) takes "
                            f"{size} px; train a prior for it (`clipleak prior train --arch {obs.meta['arch']}`)")
    sha = str(obs.meta.get("weights_sha256", ""))
    if recipe.kind == "decoder" and sha.startswith("random-init:"):
        raise ClipleakError(f"{name} decodes the features of target {recipe.target}, but the observation was made "
                            f"with a random init ({sha}); train a decoder for that target or leave it out")


def _check_priors(cfg: Any, obs: Observation) -> None:
    """Every prior file an attack config names (decoder, VAE, BN-prior CNN), checked against the target the
    observation records (image size, weights identity) and its split before any expensive step, the victim's
    model included (the attacks check them again when they load them)."""
    size = int(obs.meta["image_size"])
    data = obs.meta.get("data")
    decoder = getattr(cfg, "decoder", None)
    if decoder:
        check_prior(load_prior(str(decoder)), size, weights_sha256=str(obs.meta["weights_sha256"]), kind="decoder",
                    data=data)
    prior = str(getattr(cfg, "prior", "") or "")
    if prior.startswith("generative:"):
        check_prior(load_prior(prior.split(":", 1)[1]), size, kind="vae", data=data)
    bn_prior = getattr(cfg, "bn_prior", None)
    if bn_prior:
        check_prior(load_prior(str(bn_prior)), size, kind="cnn", data=data)


def evaluate_reconstruction(
    reconstruction: str | Path | Reconstruction,
    truth: str | Path | Truth,
    out_dir: str | Path,
    *,
    reid_k: int = 10,
    with_lpips: bool = True,
    weights: str | None = None,
    device: str | torch.device = "auto",
) -> tuple[Path, dict[str, Any]]:
    """Evaluator side: score against the truth and the baselines, write the report folder.

    The evaluator holds the private split (re-identification draws its distractors from it). A truth
    that belongs to another observation than the one the reconstruction attacked (their recorded
    observation digests differ) is refused; files made before digests were recorded are scored, with
    ``ev["truth_matches_observation"]`` None (unchecked) instead of True.
    """
    check_range("--reid-k", reid_k, low=2, high=1000, integer=True)
    dev = resolve_device(device)
    rec = reconstruction if isinstance(reconstruction, Reconstruction) else Reconstruction.load(reconstruction)
    tru = truth if isinstance(truth, Truth) else Truth.load(truth)
    matched = truth_matches(rec, tru)
    if rec.images.shape != tru.images.shape:
        raise ClipleakError(
            f"reconstruction {tuple(rec.images.shape)} and ground truth {tuple(tru.images.shape)} differ in shape"
        )
    found = rec.meta.get("observation")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    lacking = [k for k in ("arch", "weights_sha256", "peft", "classnames", "image_size") if k not in meta]
    if lacking:
        raise ClipleakError(f"the reconstruction does not record the observation it attacked (meta.observation lacks "
                            f"{', '.join(lacking)}); rerun `clipleak attack` on the observation")
    spec, public = public_for_observation(meta)
    private = load_private(spec, int(meta["image_size"]), str(tru.meta.get("part", "private")))
    # attacker-side baselines and diagnostics need the target model (rebuilt exactly as the attacker does)
    victim = rebuild_victim(Observation(gradients={}, meta=meta), artifacts.resolve_path(weights),
                            check_gradients=False, device=dev)
    with torch.no_grad():
        est = rec.features if rec.features is not None else victim.raw_image_features(rec.images)
    nn_images, _ = public_nearest_neighbour(victim, public, est, rec.labels)
    ev = evaluate(rec, tru, public.prototypes(), with_lpips=with_lpips, reid_pool=private, reid_k=reid_k,
                  extra_baselines={"public-nn": nn_images})
    cos = same_class_gradient_cosine(victim, public)
    ev["diagnostics"] = {
        "same_class_gradient_cosine": cos,
        "public_nn_source": "the attack's feature estimate" if rec.features is not None
        else "the reconstruction's own feature",
        "warning": (f"the shared gradients of different images of one class have cosine {cos:.3f} > "
                    f"{LEAKAGE_WARNING_COSINE}: this model's features barely depend on the image, so no "
                    "attack on it can show instance leakage (use trained weights)")
        if cos > LEAKAGE_WARNING_COSINE else None,
    }
    recovery = rec.meta.get("feature_recovery")
    if recovery:
        ev["feature_recovery"] = dict(recovery)
    if rec.features is not None:  # evaluator side: how close the recovered features are to the truth's
        with torch.no_grad():
            true_feats = F.normalize(victim.raw_image_features(tru.images), dim=-1).cpu()
        perm = torch.tensor(ev["pairing"])
        feat_cos = (F.normalize(rec.features.float(), dim=-1)[perm] * true_feats).sum(-1)
        ev.setdefault("feature_recovery", {})["cosine_to_truth"] = [round(float(c), 4) for c in feat_cos]
        ev["feature_recovery"]["cosine_to_truth_mean"] = round(float(feat_cos.mean()), 4)
    ev["truth_matches_observation"] = matched
    ev["defense"] = meta.get("defense")  # None: the observation was not privatised
    config = {"attack": rec.attack, "label_source": rec.label_source, "defense": meta.get("defense"),
              "attack_meta": {k: v for k, v in rec.meta.items() if k != "observation"},
              "observation": meta}
    report = write_report(out_dir, rec, tru, ev, public.prototypes(), list(meta.get("classnames", [])), config)
    json.dumps(ev)  # fail loudly here if anything is not JSON-serialisable
    return Path(report), ev


def truth_matches(rec: Reconstruction, truth: Truth) -> bool | None:
    """True when the truth belongs to the observation the reconstruction attacked (same digest); None when
    either file predates the digest (unchecked); a mismatch is a :class:`ClipleakError`."""
    return digests_match(rec.meta.get("observation_digest"), truth.meta.get("observation_digest"),
                         "the ground truth belongs to another observation (digest {truth}...) than the one this "
                         "reconstruction attacked ({attacked}...); give the truth file `clipleak share` wrote beside "
                         "that observation")


def client_images(*, weights: str | None = "tiny-mnist", arch: str = "tiny-32", data: str = "mnist",
                  split_seed: int = 0, part: str = "private",
                  progress: ProgressFn | None = None) -> tuple[str | None, ImageSet, ImageSet, dict[str, Any]]:
    """A client's images (``part``: the private split, or the validation split for tuning) and the held-out
    validation images, checked against the target's split: ``(weights path, train, held out, description)``.

    With ``part="validation"`` the held-out set is the same validation split (tuning runs only)."""
    path = artifacts.resolve_path(weights, progress)
    spec = DataSpec.parse(data, split_seed=split_seed)
    if path is not None:
        check_same_split(spec, read_card(path), f"the target {Path(path).name}")
    size = build_model(arch, path).image_size
    train = load_private(spec, size, part)
    held_out = load_validation(spec, size)
    desc = {"data": spec.to_dict(), "part": part}
    return (None if path is None else str(path)), train, held_out, desc


def finetune_client(cfg: FinetuneConfig, out_dir: str | Path, *, weights: str | None = "tiny-mnist",
                    arch: str = "tiny-32", data: str = "mnist", split_seed: int = 0, part: str = "private",
                    resume: bool = False, progress: ProgressFn | None = None, threads: int | None = None,
                    stop_after: int | None = None, device: str | torch.device = "auto") -> dict[str, Any]:
    """Fine-tune a client's CoOp or adapter on its images (with or without DP-SGD); accuracy on the
    validation split. See :func:`clipleak.training.finetune`."""
    path, train, held_out, desc = client_images(weights=weights, arch=arch, data=data, split_seed=split_seed,
                                                part=part, progress=progress)
    return finetune(cfg, train, held_out, out_dir, weights=path, arch=arch, train_description=desc, resume=resume,
                    progress=progress, threads=threads, stop_after=stop_after, device=resolve_device(device))


def contrastive_finetune_client(cfg: ContrastiveConfig, out_path: str | Path, *, weights: str | None = "tiny-mnist",
                                arch: str = "tiny-32", data: str = "mnist", split_seed: int = 0,
                                part: str = "private", resume: bool = False, progress: ProgressFn | None = None,
                                threads: int | None = None, device: str | torch.device = "auto") -> dict[str, Any]:
    """Dp-CLIP contrastive fine-tuning of the target on a client's images; zero-shot accuracy on the
    validation split. See :func:`clipleak.training.contrastive_finetune`."""
    path, train, _, desc = client_images(weights=weights, arch=arch, data=data, split_seed=split_seed, part=part,
                                         progress=progress)
    return contrastive_finetune(cfg, train, out_path, weights=path, arch=arch, data=data, split_seed=split_seed,
                                train_description=desc, resume=resume, progress=progress, threads=threads,
                                device=resolve_device(device))


def audit(cfg: AuditConfig, out_dir: str | Path, *, progress: ProgressFn | None = None,
          threads: int | None = None, device: str | torch.device | None = "auto", workers: int = 1,
          ray_address: str | None = None) -> dict[str, Any]:
    """The privacy audit (:func:`clipleak.audit.run_audit`): resumable; returns the summary and file paths.
    ``workers`` > 1 runs its cells on that many Ray workers (a local Ray, or the cluster at ``ray_address``;
    one GPU each where it has them), the same table as a serial run.

    ``device`` (``auto``: a GPU when there is one) is where the target, the victims and the attacks
    compute, the DP fine-tuning of the accuracy cells included."""
    check_range("--workers", workers, low=1, high=256, integer=True)
    return run_audit(cfg, out_dir, progress=progress, threads=threads, device=resolve_device(device), workers=workers,
                     ray_address=ray_address)


@dataclass
class DemoPlan:
    """What ``clipleak demo`` runs: the policy lives here, not in the CLI."""

    weights: str | None
    method: str
    attack: str
    settings: dict[str, Any]
    description: str


def plan_demo(*, weights: str = "tiny-mnist", method: str = "coop", attack: str = "featmatch",
              prior: str | None = None, decoder: str | None = "tiny-mnist-decoder", iterations: int | None = None,
              restarts: int = 1, seed: int = 0) -> DemoPlan:
    """The demo's choices. On the trained target, ``featmatch`` decodes the recovered feature with the
    decoder (the best prior measured there) and stops (``iterations=0``); with iterations it refines by
    a search in the VAE's latent space. ``weights='random'`` is the random-init contrast: no learned
    prior (they belong to the trained target), pixels + TV."""
    w = None if weights == "random" else weights
    dec = decoder or None
    if w is None or attack != "featmatch":
        dec = None
    if prior is None:
        prior = "generative:tiny-mnist-vae" if w is not None else "tv"
    if w is None and prior.startswith("generative:tiny-mnist"):
        prior = "tv"
    if iterations is None:
        iterations = 0 if (attack == "featmatch" and dec) else 150
    pixels = prior in ("none", "tv")
    settings: dict[str, Any] = {"iterations": iterations, "restarts": restarts, "seed": seed,
                                "lr": 0.1 if attack == "ig" and pixels else 0.05, "tv_weight": 0.05,
                                "labels": "auto", "prior": prior if not (dec and iterations == 0) else "none"}
    if attack == "featmatch":
        settings["decoder"] = dec
    if dec and iterations == 0:
        how = f"decoder {dec} (its output, no search)"
    else:
        how = f"prior {prior}" + (f", decoder {dec}" if dec else "") + f", {iterations} steps"
    return DemoPlan(w, method, attack, settings, f"{attack}, {how}")


def run_demo(out: str | Path, plan: DemoPlan, *, batch_size: int = 1, seed: int = 0,
             progress: ProgressFn | None = None,
             say: Any = None, device: str | torch.device = "auto") -> tuple[Path, dict[str, Any], float]:
    """share -> attack -> evaluate as the demo plans it, on ``device``; returns the report path, metrics and
    seconds."""
    dev = resolve_device(device)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tell = say or (lambda _msg: None)
    tell(f"1/3 client: tiny-32 ({plan.weights or 'random init'}), {plan.method}, {batch_size} private MNIST "
         "digit(s)")
    obs, truth = make_observation(weights=plan.weights, peft=PeftConfig(method=plan.method), batch_size=batch_size,
                                  seed=seed, progress=progress, device=dev)
    obs_path = obs.save(out / "observation")
    truth_path = truth.save(out / "truth")
    tell(f"2/3 attacker: {plan.description}")
    rec = attack_observation(obs_path, name=plan.attack, progress=progress, device=dev, **plan.settings)
    rec.save(out / "reconstruction")
    tell("3/3 evaluation")
    report, ev = evaluate_reconstruction(out / "reconstruction", truth_path, out / "report", device=dev)
    return report, ev, time.perf_counter() - t0
