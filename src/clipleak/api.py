"""The small public API the CLI is built on: one function per stage of the data path.

    obs, truth = make_observation(method="coop", batch_size=2)          # client side
    obs.save("runs/obs"); truth.save("runs/obs.truth")
    rec = attack_observation("runs/obs.safetensors", name="ig")          # attacker side
    rec.save("runs/rec")
    report, metrics = evaluate_reconstruction("runs/rec", "runs/obs.truth.safetensors", "runs/rec")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .attacks import AttackConfig, run_attack
from .data import DataSpec
from .data import public_for_observation as public_for
from .diagnostics import LEAKAGE_WARNING_COSINE, public_nearest_neighbour, same_class_gradient_cosine
from .engine import ProgressFn
from .errors import ClipleakError
from .evaluate import evaluate
from .models import build_model
from .observation import Observation, Truth, rebuild_victim, share
from .peft import PeftConfig, build_victim
from .reconstruction import Reconstruction
from .report import write_report


def make_observation(
    *,
    arch: str = "tiny-32",
    weights: str | None = None,
    init_seed: int = 0,
    data: str = "mnist",
    split_seed: int = 0,
    method: str = "coop",
    n_ctx: int = 4,
    class_specific: bool = False,
    classnames: list[str] | None = None,
    batch_size: int = 1,
    classes: list[int] | None = None,
    seed: int = 0,
    include_labels: bool = False,
    peft_seed: int = 0,
) -> tuple[Observation, Truth]:
    """Client side: build the victim, draw a private batch, compute the shared gradient.

    Returns the observation (what the server receives) and the ground truth (kept by the client,
    used only for evaluation).
    """
    from .client import load_private, sample_batch  # client side only

    if batch_size < 1:
        raise ClipleakError("batch size must be at least 1")
    clip = build_model(arch, weights, init_seed=init_seed)
    spec = DataSpec.parse(data, split_seed=split_seed)
    private = load_private(spec, clip.image_size)
    names = classnames or private.classnames
    if len(names) != len(private.classnames):
        raise ClipleakError(
            f"{len(names)} class names given but the data set has {len(private.classnames)} classes"
        )
    cfg = PeftConfig(method=method, n_ctx=n_ctx, class_specific=class_specific, init_seed=peft_seed)
    victim = build_victim(clip, names, cfg)
    images, labels, idx = sample_batch(private, batch_size, seed=seed, classes=classes)
    data_meta = {**spec.to_dict(), "grayscale": private.grayscale}
    obs = share(victim, images, labels, include_labels=include_labels, data=data_meta, seed=seed)
    truth = Truth(images=images, labels=labels,
                  meta={"private_indices": idx.tolist(), "data": data_meta, "seed": seed})
    return obs, truth


def attack_observation(
    observation: str | Path | Observation,
    *,
    name: str = "ig",
    weights: str | None = None,
    progress: ProgressFn | None = None,
    **config: Any,
) -> Reconstruction:
    """Attacker side: rebuild the victim from the observation and run attack ``name``.

    Keyword arguments go into :class:`~clipleak.attacks.AttackConfig` (iterations, restarts, lr,
    tv_weight, labels, seed, checkpoint, ...).
    """
    obs = observation if isinstance(observation, Observation) else Observation.load(observation)
    victim = rebuild_victim(obs, weights)
    known = set(AttackConfig.__dataclass_fields__)
    unknown = [k for k in config if k not in known]
    if unknown:
        raise ClipleakError(f"unknown attack setting(s): {', '.join(unknown)}")
    return run_attack(name, obs, victim, AttackConfig(**config), progress)


def evaluate_reconstruction(
    reconstruction: str | Path | Reconstruction,
    truth: str | Path | Truth,
    out_dir: str | Path,
    *,
    reid_k: int = 10,
    with_lpips: bool = True,
    weights: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Evaluator side: score against the truth and the baselines, write the report folder."""
    from .client import load_private  # the evaluator holds the private split (re-identification)

    rec = reconstruction if isinstance(reconstruction, Reconstruction) else Reconstruction.load(reconstruction)
    tru = truth if isinstance(truth, Truth) else Truth.load(truth)
    if rec.images.shape != tru.images.shape:
        raise ClipleakError(
            f"reconstruction {tuple(rec.images.shape)} and ground truth {tuple(tru.images.shape)} differ in shape"
        )
    meta = rec.meta.get("observation", {})
    spec, public = public_for(meta)
    private = load_private(spec, int(meta["image_size"]))
    # attacker-side baselines and diagnostics need the target model (rebuilt exactly as the attacker does)
    obs = Observation(gradients={}, meta=meta)
    victim = rebuild_victim(obs, weights, check_gradients=False)
    feats = rec.meta.get("feature_estimate")
    with torch.no_grad():
        est = torch.tensor(feats) if feats is not None else victim.raw_image_features(rec.images)
    nn_images, _ = public_nearest_neighbour(victim, public, est, rec.labels)
    ev = evaluate(rec, tru, public.prototypes(), with_lpips=with_lpips, reid_pool=private, reid_k=reid_k,
                  extra_baselines={"public-nn": nn_images})
    cos = same_class_gradient_cosine(victim, public)
    ev["diagnostics"] = {
        "same_class_gradient_cosine": cos,
        "public_nn_source": "the attack's feature estimate" if feats is not None
        else "the reconstruction's own feature",
        "warning": (f"the shared gradients of different images of one class have cosine {cos:.3f} > "
                    f"{LEAKAGE_WARNING_COSINE}: this model's features barely depend on the image, so no "
                    "attack on it can show instance leakage (use trained weights)")
        if cos > LEAKAGE_WARNING_COSINE else None,
    }
    config = {"attack": rec.attack, "label_source": rec.label_source,
              "attack_meta": {k: v for k, v in rec.meta.items() if k != "observation"},
              "observation": meta}
    report = write_report(out_dir, rec, tru, ev, public.prototypes(), list(meta.get("classnames", [])), config)
    json.dumps(ev)  # fail loudly here if anything is not JSON-serialisable
    return Path(report), ev
