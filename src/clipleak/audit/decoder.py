"""The feature decoder the audit's attack needs, for any target and data (``--decoder auto``).

The default target and data (``tiny-mnist`` on ``mnist``) have a shipped decoder (``tiny-mnist-decoder``).
For any other pair, a :class:`~clipleak.priors.FeatureDecoder` is trained on the PUBLIC split for these
weights within a time budget (the schedule is fitted to the budget, :func:`clipleak.training.build_prior`)
and cached in the artifact cache under a name derived from three hashes: the weights' identity (their
SHA-256 as the model records it), the public images it learns from (their pixels, labels and class names
at the target's resolution), and the recipe (this module's settings and the budget). A rerun with the
same three finds the file and does not train again; two processes building the same one wait on a lock.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from .. import artifacts
from ..data import DataSpec, ImageSet
from ..errors import ClipleakError
from ..models import ClipModel
from ..priors import check_prior, load_prior, save_prior
from ..records import ProgressFn
from ..training import PriorCheckpoints, build_prior, checkpoint_dir
from .cells import AUTO_DECODER, DEFAULT_TARGET

RECIPE: dict[str, Any] = {"kind": "decoder", "seed": 0, "augment_copies": 0, "base": 64, "feature_noise": 0.0}
"""The automatic decoder's recipe: ``tiny-mnist-decoder``'s (L1 + MSE, Adam, cosine decay, batch 64,
whitened input), with a time budget in place of its fixed 2,000 steps."""
WORK_SIZE = 56
"""Above this side the decoder's convolutions work at this side and the output is resized, where the
prior training supports it (a 224 px decoder at full size costs 16x the compute for little detail)."""
FOLDER = "audit-decoders"
"""Sub-folder of the artifact cache that holds the automatic decoders."""


def _recipe(clip: ClipModel, seconds: float) -> dict[str, Any]:
    recipe = {**RECIPE, "seconds": float(seconds)}
    if clip.image_size > WORK_SIZE and "work_size" in inspect.signature(build_prior).parameters:
        recipe["work_size"] = WORK_SIZE
    return recipe


def decoder_path(clip: ClipModel, public: ImageSet, seconds: float) -> Path:
    """Where the automatic decoder for ``clip``'s weights, these public images and this budget is cached."""
    parts = {"weights_sha256": clip.weights_sha256, "data": public.digest(), "recipe": _recipe(clip, seconds)}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return artifacts.cache_dir() / FOLDER / f"decoder-{clip.arch}-{key}.safetensors"


def _usable(path: Path, clip: ClipModel, spec: DataSpec) -> bool:
    if not path.is_file():
        return False
    try:
        check_prior(load_prior(path), clip.image_size, weights_sha256=clip.weights_sha256, kind="decoder",
                    data=spec.to_dict())
    except ClipleakError:
        return False
    return True


def auto_decoder(clip: ClipModel, weights: str, spec: DataSpec, public: ImageSet, *, seconds: float,
                 progress: ProgressFn | None = None) -> Path:
    """The cached decoder for ``clip`` (built from ``weights``, a file) on ``spec``'s public split, trained
    first when there is none (within ``seconds`` of training; its quality on the validation split beside
    the class prototype's goes on its card)."""
    path = decoder_path(clip, public, seconds)
    if _usable(path, clip, spec):
        return path
    with artifacts.build_lock(path):
        if _usable(path, clip, spec):  # built by another process meanwhile
            return path
        print(f"[clipleak] no feature decoder for these weights and data in {path.parent} yet: training one on "
              f"the public split ({seconds:g} s budget); later audits reuse it.", file=sys.stderr, flush=True)
        recipe = _recipe(clip, seconds)
        extra = {"work_size": recipe["work_size"]} if "work_size" in recipe else {}
        # its progress is kept beside it, so that an audit killed while the decoder trains continues it
        ckpt = PriorCheckpoints(checkpoint_dir(path), resume=True)
        prior = build_prior("decoder", data=spec.name, arch=clip.arch, weights=weights, split_seed=spec.split_seed,
                            seconds=float(seconds), seed=int(recipe["seed"]), feature_noise=recipe["feature_noise"],
                            augment_copies=int(recipe["augment_copies"]), base=int(recipe["base"]), progress=progress,
                            task="train decoder (audit)", checkpoints=ckpt, **extra)
        save_prior(prior, path, {"audit_decoder": {"recipe": recipe, "data_sha256": public.digest()}})
        ckpt.clear()
    if not _usable(path, clip, spec):
        raise ClipleakError(f"training the audit's decoder did not produce a usable file at {path}")
    return path


def choose_decoder(name: str, *, clip: ClipModel, weights: str | None, path: str | None, spec: DataSpec,
                   same_as: DataSpec, public: ImageSet, seconds: float, progress: ProgressFn | None = None) -> str:
    """The decoder file ``name`` stands for, checked against the target before any attack.

    ``auto``: the shipped ``tiny-mnist-decoder`` for ``tiny-mnist`` on the mnist digits (``same_as``: the data
    set a folder holds exactly, see :func:`clipleak.audit.sweep.same_data`), else :func:`auto_decoder` on
    ``spec``'s ``public`` split (trained weights needed: ``path``, the resolved ``weights``). A registered name
    must be a decoder for ``clip``'s architecture; any file must fit the weights and the data."""
    if name == AUTO_DECODER and (weights, same_as.name) == DEFAULT_TARGET and same_as.split_seed == 0 \
            and clip.arch == "tiny-32":
        name = "tiny-mnist-decoder"  # a folder holding exactly the mnist digits: the shipped decoder fits
    if name == AUTO_DECODER:
        if path is None:
            raise ClipleakError("--decoder auto needs trained weights: a random-init CLIP gives every image "
                                "nearly the same feature (give --weights, or --decoder '' for none)")
        return str(auto_decoder(clip, path, spec, public, seconds=seconds, progress=progress))
    if artifacts.is_artifact(name) and not Path(name).exists():
        recipe = artifacts.get(name).recipe
        made_for = getattr(recipe, "arch", None)
        if getattr(recipe, "kind", None) != "decoder" or made_for != clip.arch:
            raise ClipleakError(f"--decoder {name} is a {getattr(recipe, 'kind', 'target')} for "
                                f"{made_for}, not a decoder for {clip.arch}; use --decoder auto")
    found = artifacts.resolve_path(name, progress)
    if found is None or not Path(found).is_file():
        raise ClipleakError(f"--decoder {name}: no such file or registered decoder")
    check_prior(load_prior(found), clip.image_size, weights_sha256=clip.weights_sha256, kind="decoder",
                data=same_as.to_dict())
    return found
