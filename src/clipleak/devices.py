"""The one place a device is chosen: ``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda``,
``cuda:N`` or ``mps``. The CLI and the API resolve it once and pass the ``torch.device`` down; files on disk
(records, artifacts) always hold CPU tensors so any machine reads them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ClipleakError

if TYPE_CHECKING:  # torch is imported lazily: a bad --device is refused before the heavy imports
    import torch

DEVICE_HELP = "where to compute: auto (a GPU when there is one: CUDA, then MPS, else CPU), cpu, cuda, cuda:N, mps"


def check_device_spec(spec: str | None) -> str:
    """The spelling of ``spec`` checked without importing torch (so a typo fails at once); returns it
    lower-cased, ``auto`` for None or empty."""
    s = (spec or "auto").strip().lower()
    if s in ("auto", "cpu", "cuda", "mps"):
        return s
    if s.startswith("cuda:") and s[5:].isdigit():
        return s
    raise ClipleakError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A ``torch.device`` for ``spec``; an unavailable one (``cuda`` on a machine without CUDA, ``cuda:3``
    with two GPUs, ``mps`` off Apple silicon) is refused with one line naming what there is."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    s = check_device_spec(spec)
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ClipleakError(f"--device {s}: CUDA is not available here ({available_devices()})")
        index = int(s[5:]) if ":" in s else 0
        n = torch.cuda.device_count()
        if index >= n:
            raise ClipleakError(f"--device {s}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
        return torch.device(s)
    if not _mps_available():
        raise ClipleakError(f"--device mps: Apple MPS is not available here ({available_devices()})")
    return torch.device("mps")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> str:
    """What this machine offers, in words (for errors and provenance)."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return "available: " + ", ".join(found)


def describe(device: torch.device) -> str:
    """A device in words for results' provenance: ``cpu``, ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type
