"""A small convolutional VAE trained on the public split, and its latent space as an engine parametrisation.

:class:`LatentImages` plugs the latent space into :func:`clipleak.engine.optimise`, so any attack can
search latent codes instead of pixels (``render() = vae.decode(z)``, GIAS-style).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import Term
from ..errors import ClipleakError
from .common import expand_gray, layout


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
        start, n = layout(image_size)
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
        return expand_gray(torch.sigmoid(self.decode_logits(z)))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """``(logits, mu, logvar)`` with a reparametrised sample (noise from ``generator``)."""
        mu, logvar = self.encode(images)
        # drawn where the generator is (a CPU generator keeps training runs identical across devices)
        gen_device = generator.device if generator is not None else mu.device
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=gen_device).to(mu.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode_logits(z), mu, logvar


def vae_codes(vae: ConvVAE, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The VAE's mean codes ``mu`` ``(B, latent)`` of images in [0, 1] (no gradient)."""
    vae.eval()
    with torch.no_grad():
        return torch.cat([vae.encode(images[i : i + batch])[0] for i in range(0, images.shape[0], batch)])


def latent_prior_loss(z: torch.Tensor) -> torch.Tensor:
    """``mean(z**2)``: keeps latent codes where the VAE's N(0, I) prior puts its mass."""
    return z.pow(2).mean()


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
        self.starts = [s.detach().float().cpu().clone() for s in starts] if starts is not None else None
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
        # drawn on the CPU (the same codes on every device), then put where the VAE is
        self.z = z.to(next(self.vae.parameters()).device).requires_grad_(True)
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
