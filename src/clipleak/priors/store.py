"""Priors on disk: ``<name>.safetensors`` plus a ``<name>.card.json`` card, checked on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data import DataSpec, check_same_split
from ..errors import ClipleakError
from ..models import card_path, file_sha256
from .cnn import PriorCNN
from .decoder import FeatureDecoder
from .vae import ConvVAE

FORMAT = "clipleak-prior/1"
KINDS = ("vae", "decoder", "cnn")
Prior = ConvVAE | FeatureDecoder | PriorCNN


def prior_card_path(path: Path) -> Path:
    """The card beside a prior file: ``<stem>.card.json`` (the same naming as targets' cards)."""
    return card_path(path)


def prior_weights_path(path: str | Path) -> Path:
    p = Path(path)
    if p.name.endswith(".card.json"):
        p = p.with_name(p.name[: -len(".card.json")] + ".safetensors")
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

    if not isinstance(prior, ConvVAE | FeatureDecoder | PriorCNN):
        raise ClipleakError(f"not a prior: {type(prior).__name__}")
    p = prior_weights_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in prior.state_dict().items()}
    save_file(sd, str(p))
    full = {**prior.card, **(card or {})}
    full.update({"format": FORMAT, "kind": prior.kind, "arch": prior.arch(), "image_size": prior.image_size,
                 "channels": prior.channels, "file_sha256": file_sha256(p)})
    if isinstance(prior, ConvVAE):
        full["latent"] = prior.latent
    elif isinstance(prior, FeatureDecoder):
        full["embed_dim"] = prior.embed_dim
    else:
        full["classes"] = prior.classes
    prior_card_path(p).write_text(json.dumps(full, indent=2, default=str))
    prior.card = full
    return p


def load_prior(path: str | Path) -> Prior:
    """Read a prior written by :func:`save_prior` (names such as ``tiny-mnist-vae`` are turned into files by
    :func:`clipleak.artifacts.resolve`). Returned in eval mode, frozen; ``.card`` holds the card.

    Raises :class:`ClipleakError` when the file or its card is missing, unreadable, modified since it was
    saved (SHA-256 mismatch), or does not fit the architecture its card describes.
    """
    from safetensors.torch import load_file

    p = prior_weights_path(path)
    cp = prior_card_path(p)
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
        raise ClipleakError(f"{cp} is not a clipleak prior card (format {FORMAT!r}, kind vae|decoder|cnn)")
    sha = file_sha256(p)
    if card.get("file_sha256") not in (None, sha):
        raise ClipleakError(f"prior file {p} does not match its card (SHA-256 differs): corrupt or modified")
    try:
        sd = load_file(str(p))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ClipleakError(f"cannot read prior weights {p}: {e}") from e
    cls: type[Prior] = {"vae": ConvVAE, "decoder": FeatureDecoder, "cnn": PriorCNN}[card["kind"]]
    try:
        prior = cls(**card["arch"])
        prior.load_state_dict(sd, strict=True)
    except (TypeError, RuntimeError) as e:
        raise ClipleakError(f"prior weights {p} do not fit the architecture in its card: {e}") from e
    prior.eval().requires_grad_(False)
    prior.card = card
    return prior


def check_prior(prior: Prior, image_size: int, weights_sha256: str | None = None, kind: str | None = None,
                data: dict[str, Any] | None = None) -> None:
    """Raise :class:`ClipleakError` unless ``prior`` fits the target and the observation's data split.

    Checks the kind (if given), the resolution, for a decoder the target weights it was trained for
    (when ``weights_sha256`` is given: a decoder learned for one CLIP's features is meaningless for
    another), and with ``data`` (an observation's data spec) that the prior was trained on the public
    part of that same split.
    """
    if data:
        check_same_split(DataSpec.from_dict(data), prior.card, f"the {prior.kind} prior")
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
