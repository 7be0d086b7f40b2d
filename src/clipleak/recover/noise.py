"""What an observation's DP metadata says about the noise in its gradient, for the fits that read it.

A defended observation records its mechanism, C and sigma (``obs.meta["defense"]``, written by
:meth:`clipleak.privacy.DpSetting.record`). At the parameters site the shared gradient is the clipped
signal plus i.i.d. N(0, s^2) per coordinate, with ``s = sigma C / B`` for per-example DP-SGD (the noisy sum
is divided by the batch size B) and ``s = sigma C`` for the per-batch mechanism. So a model that explains
the signal exactly still leaves a residual of norm about ``s sqrt(d)`` over d fitted numbers: iterating a
fit below it fits the noise (the discrepancy principle stops there), and a fit that stays far above it does
not explain the update. The noise being i.i.d. with one scale, weighting the least-squares residual by
``1 / s^2`` is a constant factor: the fits' unweighted residuals already are the maximum-likelihood ones.
"""

from __future__ import annotations

import math

from ..records import Observation


def noise_std(obs: Observation) -> float | None:
    """Per-coordinate standard deviation of the DP noise in the shared gradient, or ``None``: undefended,
    or noise that is not i.i.d. per parameter coordinate (the ``text-features`` site)."""
    d = obs.meta.get("defense")
    if not d or d.get("site", "parameters") != "parameters":
        return None
    std = float(d.get("noise_std") or 0.0)
    if std <= 0:
        return None
    return std / obs.batch_size if d.get("mechanism") == "per-example" else std


def modelled_clip(obs: Observation) -> float | None:
    """The per-example clipping norm C a fit can model exactly, or ``None``: undefended, per-batch (one clip
    of the whole batch gradient), per-tensor clipping, or the ``text-features`` site (C bounds the text-feature
    gradient there, not the parameters')."""
    d = obs.meta.get("defense")
    if (not d or d.get("mechanism") != "per-example" or d.get("site", "parameters") != "parameters"
            or d.get("clipping", "flat") != "flat" or not d.get("clip")):
        return None
    return float(d["clip"])


def relative_noise_floor(obs: Observation, numbers: int, observed_norm: float) -> float:
    """The relative residual the noise alone leaves over ``numbers`` i.i.d. coordinates of an observed
    vector of norm ``observed_norm`` (``sqrt(numbers) s / observed_norm``); 0 when there is no such noise.
    For coordinates that are an orthonormal projection of the gradient (CoOp's reduced coordinates) the
    noise stays i.i.d. with the same s, so ``numbers`` is the projection's rank."""
    s = noise_std(obs)
    if s is None or observed_norm <= 0:
        return 0.0
    return s * math.sqrt(numbers) / observed_norm


def floor_note(residual: float, floor: float, obs: Observation) -> str:
    """One line comparing a fit's relative residual with the noise floor."""
    d = obs.meta.get("defense") or {}
    head = (f"relative residual {residual:.3g} against {floor:.3g} expected from the DP noise alone "
            f"({d.get('mechanism')}, sigma {d.get('noise_multiplier', 0):.3g}, C {d.get('clip', 0):g})")
    if floor >= SIGNAL_FREE:
        return head + (": the noise alone accounts for the update's norm, so there is almost no signal to fit and "
                       "reaching the floor says nothing about the features")
    if residual <= NOISE_MARGIN * floor:
        return head + ": the fit explains the update down to its noise (going lower would fit the noise)"
    return head + (": the fit stays above the noise floor, so its model does not explain the update (a wrong "
                   "label or local minimum, clipping where the fit does not model it, or noise that moved the "
                   "spans the fit searches in)")


NOISE_MARGIN = 1.5
"""A fit within this factor of the noise floor counts as having reached it."""
SIGNAL_FREE = 0.9
"""A relative noise floor from which on the update is (almost) all noise: its signal is < ~45% of its norm."""
