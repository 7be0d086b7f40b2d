"""An FGLA-style decoder from a target CLIP's image feature to the image, trained on public pairs.

It is tied to the target's weights: a decoder trained for one CLIP is meaningless for another, so its
card records the target's SHA-256 and :func:`clipleak.priors.check_prior` refuses a mismatch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipleakError
from .common import expand_gray, layout


class FeatureDecoder(nn.Module):
    """FGLA-style decoder: normalised CLIP image feature ``(B, E)`` -> image ``(B, 3, H, W)`` in [0, 1].

    ``Linear(E -> start x start x 64)``, then one block per doubling (2x nearest upsample, 3x3 conv,
    BatchNorm, ReLU; 64, 32, 16, 16, ... channels), a 3x3 conv to the image channels and a sigmoid.
    0.19M parameters for E = 128 at 32 px (three blocks); 64 px adds one block. With ``work_size`` the stack
    works at that side and its output (before the sigmoid) is resized bilinearly to ``image_size``.
    """

    kind = "decoder"
    # buffers registered in __init__ when whiten=True
    in_mean: torch.Tensor
    in_proj: torch.Tensor

    def __init__(self, embed_dim: int = 128, image_size: int = 32, channels: int = 1, base: int = 64,
                 whiten: bool = False, work_size: int | None = None):
        super().__init__()
        if channels not in (1, 3):
            raise ClipleakError(f"channels must be 1 (grayscale) or 3, got {channels!r}")
        if embed_dim < 1 or base < 4:
            raise ClipleakError("embed_dim must be positive and base at least 4")
        if work_size is not None and not 8 <= int(work_size) <= int(image_size):
            raise ClipleakError(f"work_size must be between 8 and the image size {image_size}, got {work_size!r}")
        # the side the convolution stack works at; the output is resized to image_size (bilinear). A 224 px
        # target's MNIST digits are 28 px ones upsampled: decoding at 28 px loses nothing and costs ~1/64.
        self.work_size = None if work_size is None or int(work_size) == int(image_size) else int(work_size)
        start, n = layout(self.work_size or image_size)
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
        out = {"embed_dim": self.embed_dim, "image_size": self.image_size, "channels": self.channels,
               "base": self.base, "whiten": self.whiten}
        if self.work_size is not None:
            out["work_size"] = self.work_size
        return out

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

    def work_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output ``(B, channels, S, S)`` at the side the convolutions work at (``work_size``, else
        the image size), from normalised features ``(B, E)``."""
        if features.dim() != 2 or features.shape[1] != self.embed_dim:
            raise ClipleakError(f"this decoder takes (B, {self.embed_dim}) features, got {tuple(features.shape)}")
        if self.whiten:
            features = (features - self.in_mean) @ self.in_proj
        h = self.fc(features).view(features.shape[0], self.base, self.start, self.start)
        return self.head(self.blocks(h))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] from normalised features ``(B, E)``."""
        out = self.work_logits(features)
        if self.work_size is not None:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return expand_gray(torch.sigmoid(out))


def decoder_images(decoder: FeatureDecoder, features: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` decoded from CLIP image features (normalised here; no gradient)."""
    decoder.eval()
    with torch.no_grad():
        f = F.normalize(features.float(), dim=-1)
        return torch.cat([decoder(f[i : i + batch]) for i in range(0, f.shape[0], batch)])
