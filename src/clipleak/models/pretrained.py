"""Pretrained weights named as open_clip users name them: a tag open_clip knows for the architecture
(``openai``, ``laion2b_s34b_b79k``, ...) or a Hugging Face hub repository ``hf-hub:ORG/NAME``.

The file comes from open_clip's own pretrained table and the Hugging Face hub cache (``HF_HUB_CACHE``,
else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``). A cached file is used as it is, without any
network request, so a run is the same online and offline. A file that is not cached is downloaded by
open_clip, unless ``HF_HUB_OFFLINE`` is set or the hub does not take a connection within a few seconds:
then one line says how to fetch it (a download attempt without a network can hang for minutes).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache

from ..errors import ClipleakError
from ..lazy import lazy_module

if TYPE_CHECKING:
    import open_clip
else:  # imported on first use: see clipleak.lazy
    open_clip = lazy_module("open_clip")

HF_PREFIX = "hf-hub:"
# open_clip's default weights file in a hub repository, and its safetensors twin (preferred when present).
HF_WEIGHTS = "open_clip_pytorch_model.bin"
HF_CONFIG = "open_clip_config.json"
# How long the hub may take to accept a connection before a missing file is reported instead of fetched.
PROBE_SECONDS = 3.0
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass(frozen=True)
class PretrainedFile:
    """A pretrained weights file in the hub cache, with what open_clip publishes beside it."""

    name: str  # the canonical tag (``openai``) or ``hf-hub:ORG/NAME``
    path: Path  # the cached weights file
    quick_gelu: bool  # the weights were trained with QuickGELU (OpenAI's models)
    preprocess: dict[str, Any] = field(default_factory=dict)  # mean / std / interpolation published with them


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (huggingface_hub's spellings of true)."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(hf_constants.HF_HUB_OFFLINE)


def is_pretrained_name(arch: str, weights: str) -> bool:
    """Whether ``weights`` names pretrained weights for ``arch``: ``hf-hub:...`` or a tag open_clip knows."""
    return weights.startswith(HF_PREFIX) or bool(open_clip.get_pretrained_cfg(arch, weights))


def known_tags(arch: str) -> list[str]:
    return list(open_clip.list_pretrained_tags_by_model(arch))


def unknown_tag_error(arch: str, weights: str) -> ClipleakError:
    tags = known_tags(arch)
    known = (f"known tags for {arch}: {', '.join(tags)}" if tags
             else f"open_clip has no pretrained tags for {arch}")
    return ClipleakError(f"{weights!r} is neither a file nor a pretrained tag for {arch} ({known}; "
                         "or hf-hub:ORG/NAME, a weights file, none, or a clipleak artifact name)")


def resolve_pretrained(arch: str, weights: str, cache_dir: str | Path | None = None) -> PretrainedFile:
    """The cached weights file for a tag or ``hf-hub:ORG/NAME``, downloaded first when it is not cached and
    the hub can be reached (see the module's docstring)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    if weights.startswith(HF_PREFIX):
        return _resolve_repo(arch, weights, cache)
    cfg = open_clip.get_pretrained_cfg(arch, weights)
    if not cfg:
        raise unknown_tag_error(arch, weights)
    tag = weights.lower().replace("-", "_")  # open_clip's spelling of the tag
    hub = str(cfg.get("hf_hub") or "")
    if not hub:  # a URL-only entry (none in open_clip 3.3): open_clip's own download folder
        target = Path("~/.cache/clip").expanduser() / os.path.basename(str(cfg.get("url", "")))
        path = target if target.is_file() else _download(
            arch, tag, cache, lambda: open_clip.pretrained.download_pretrained(cfg, cache_dir=None))
        return PretrainedFile(tag, path, bool(cfg.get("quick_gelu", False)), _preprocess(cfg))
    repo, filename = os.path.split(hub)
    path_or_none = _cached(repo, filename or HF_WEIGHTS, cache)
    if path_or_none is None:
        path_or_none = _download(arch, tag, cache,
                                 lambda: open_clip.pretrained.download_pretrained(cfg, cache_dir=str(cache)))
    return PretrainedFile(tag, path_or_none, bool(cfg.get("quick_gelu", False)), _preprocess(cfg))


def _resolve_repo(arch: str, weights: str, cache: Path) -> PretrainedFile:
    repo = weights[len(HF_PREFIX):].strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ClipleakError(f"{weights!r}: a hub repository is named hf-hub:ORG/NAME")
    name = HF_PREFIX + repo
    path = _cached(repo, HF_WEIGHTS, cache)
    if path is None:
        path = _download(arch, name, cache, lambda: Path(
            open_clip.pretrained.download_pretrained_from_hf(repo, cache_dir=str(cache))))
    config = _repo_config(repo, cache)
    model_cfg = config.get("model_cfg") or {}
    return PretrainedFile(name, path, bool(model_cfg.get("quick_gelu", False)),
                          _preprocess(config.get("preprocess_cfg") or {}))


def _repo_config(repo: str, cache: Path) -> dict[str, Any]:
    """The repository's ``open_clip_config.json`` (QuickGELU, preprocessing), or {} when it has none."""
    hit = try_to_load_from_cache(repo, HF_CONFIG, cache_dir=str(cache))
    if hit is None and not hub_offline():
        try:
            hit = hf_hub_download(repo, HF_CONFIG, cache_dir=str(cache))
        except Exception:  # noqa: BLE001 - a repository without a config is served with the arch's defaults
            hit = None
    if not isinstance(hit, str):
        return {}
    try:
        config = json.loads(Path(hit).read_text())
    except (OSError, ValueError) as e:
        raise ClipleakError(f"cannot read {HF_CONFIG} of {repo} in the hub cache ({hit}): {e}") from e
    return config if isinstance(config, dict) else {}


def _cached(repo: str, filename: str, cache: Path) -> Path | None:
    """The cached file open_clip would load (the safetensors twin first, as open_clip prefers it)."""
    if filename == HF_WEIGHTS:
        twins = ["open_clip_model.safetensors"]
    elif filename.endswith((".bin", ".pth")):
        twins = [filename[:-4] + ".safetensors"]
    else:
        twins = []
    for name in (*twins, filename):
        hit = try_to_load_from_cache(repo, name, cache_dir=str(cache))
        if isinstance(hit, str):
            return Path(hit)
    return None


def _download(arch: str, name: str, cache: Path, fetch: Any) -> Path:
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else _hub_unreachable()
    if reason is not None:
        raise ClipleakError(_not_cached(arch, name, cache, reason))
    try:
        path = fetch()
    except Exception as e:  # noqa: BLE001 - huggingface_hub and urllib raise many types
        raise ClipleakError(_not_cached(arch, name, cache, f"the download failed: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''}")) from e
    if not path or not Path(path).is_file():
        raise ClipleakError(_not_cached(arch, name, cache, "open_clip returned no file"))
    return Path(path)


def _not_cached(arch: str, name: str, cache: Path, reason: str) -> str:
    made = (f"open_clip.create_model('{name}')" if name.startswith(HF_PREFIX)
            else f"open_clip.create_model('{arch}', pretrained='{name}')")
    where = str(cache).replace(str(Path.home()), "~", 1)
    return (f"pretrained weights '{name}' for {arch} are not in the Hugging Face cache ({where}) and {reason}; "
            f"run once online: python -c \"import open_clip; {made}\" or pass a local file")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None when it takes a connection within :data:`PROBE_SECONDS`.
    Behind a proxy (``HTTPS_PROXY``) a direct connection says nothing: the download itself is tried."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
        except OSError as e:
            result.append(f"{host} cannot be reached ({e})")
        else:
            result.append(None)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 1.0)
    return result[0] if result else f"{host} did not answer within {PROBE_SECONDS:.0f} s"


def _preprocess(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg}
