"""Intervals for every rate and mean clipleak reports, and the "at chance" decision they support.

Rates (re-identification, label accuracy) come with a 95% Wilson score interval. Its ``n`` is the number of
*images*: the distractor draws of one image are not independent trials, so counting them would make the
interval look narrower than the evidence is. A rate averaged over draws gives a fractional success count
(``rate * n``); the Wilson formula takes it as it is.

Means over images (PSNR, SSIM) come with a percentile bootstrap over the images (seeded, so a table is
reproducible).

"At chance" is decided by the interval: a rate is at chance when its interval reaches down to chance, and
above chance only when its lower end is above it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""

BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval and the number of images it rests on."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def pct(self) -> str:
        """``44% [18-74%] (n=8)``."""
        return f"{self.value:.0%} [{self.low * 100:.0f}-{self.high:.0%}] (n={self.n})"

    def db(self) -> str:
        """``16.1 [15.2-17.0] dB (n=8)``."""
        return f"{self.value:.1f} [{self.low:.1f}-{self.high:.1f}] dB (n={self.n})"


def wilson(successes: float, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of ``successes`` out of ``n`` (``successes`` may be fractional).

    >>> iv = wilson(7, 16); round(iv.low, 3), round(iv.high, 3)
    (0.231, 0.668)
    """
    if n < 1:
        raise ValueError("an interval needs at least one image (n >= 1)")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n]: got {successes} of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: rounding must not cut 1.0 to 0.99...
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(value=p, low=low, high=high, n=int(n))


def rate_interval(rate: float, n: int) -> Interval:
    """The Wilson interval of a rate measured on ``n`` images (``rate * n`` successes)."""
    return wilson(min(max(rate, 0.0), 1.0) * n, n)


def pooled_rate(rates: Sequence[float], sizes: Sequence[int]) -> Interval:
    """Pool per-batch rates (each over its batch's images) into one rate over all images, with its interval."""
    if len(rates) != len(sizes) or not rates:
        raise ValueError("need one batch size per rate, and at least one rate")
    n = int(sum(sizes))
    return rate_interval(sum(r * s for r, s in zip(rates, sizes, strict=True)) / n, n)


def bootstrap_mean(values: Sequence[float], *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """The mean of ``values`` (one per image) with a 95% percentile-bootstrap interval over the images."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("a mean needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return Interval(mean, float(lo), float(hi), int(x.size))


def at_chance(interval: Interval, chance: float) -> bool:
    """True when the interval does not exclude chance (its lower end is at or below it)."""
    return interval.low <= chance


def images_to_separate(rate: float, chance: float, *, z: float = Z95, limit: int = 100_000) -> int | None:
    """The smallest number of images at which a rate of ``rate`` would have a Wilson lower end above
    ``chance`` (None when ``rate <= chance`` or it would take more than ``limit`` images)."""
    if rate <= chance:
        return None

    def separated(n: int) -> bool:
        return wilson(rate * n, n, z).low > chance

    hi = 1
    while not separated(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2  # not separated (or 0); the lower end grows with n at a fixed rate
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if separated(mid) else (mid, hi)
    return hi
