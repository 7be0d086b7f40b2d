"""Empirical epsilon lower bound from a canary audit in one training run (Steinke, Nasr, Jagielski 2023,
simplified).

m canaries, each included in training with probability 1/2; after the run the auditor ranks them by a
score (:mod:`clipleak.training.finetune`: the sum over steps of the privatised update's projection on
the canary's direction), guesses "included" for the ``k`` highest and "excluded" for the ``k`` lowest,
and abstains on the rest. For an epsilon-DP run the number of correct guesses among the ``r = 2k`` is
stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) (SNJ 2023, Theorem 5.2 with delta = 0).
So with confidence 1 - beta, epsilon is at least the largest eps at which observing ``v`` or more
correct guesses has probability <= beta. Simplifications, stated: the delta term of the theorem is
left out (the bound is for the pure-epsilon part), and ``k`` is fixed in advance (m / 10 on each side),
not chosen after seeing the scores.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ClipleakError

GUESS_FRACTION = 0.1
BETA = 0.05


def epsilon_lower_bound(guesses: int, correct: int, beta: float = BETA) -> float:
    """The largest eps with P[Binomial(guesses, e^eps / (1 + e^eps)) >= correct] <= beta (0 if none)."""
    if guesses < 1 or not 0 <= correct <= guesses:
        raise ClipleakError(f"need 0 <= correct <= guesses, guesses >= 1; got {correct} of {guesses}")

    def tail(eps: float) -> float:
        p = math.exp(eps) / (1 + math.exp(eps))
        from scipy.stats import binom  # on first use: scipy.stats takes about a second to import

        return float(binom.sf(correct - 1, guesses, p))  # P[X >= correct]

    if tail(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= beta and hi < 100:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if tail(mid) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def canary_audit(scores: list[float], included: list[bool], fraction: float = GUESS_FRACTION,
                 beta: float = BETA) -> dict[str, Any]:
    """Guesses from canary scores (top ``fraction`` in, bottom ``fraction`` out) and the epsilon lower bound."""
    m = len(scores)
    if m != len(included) or m < 2:
        raise ClipleakError("need one membership per canary score, at least 2 canaries")
    k = max(1, int(m * fraction))
    order = sorted(range(m), key=lambda j: scores[j])
    guessed_out, guessed_in = order[:k], order[-k:]
    correct = sum(included[j] for j in guessed_in) + sum(not included[j] for j in guessed_out)
    return {"canaries": m, "guesses": 2 * k, "correct": int(correct), "accuracy": correct / (2 * k),
            "beta": beta, "epsilon_lower_bound": epsilon_lower_bound(2 * k, int(correct), beta),
            "method": f"SNJ 2023 one-run audit, simplified: top/bottom {fraction:.0%} guessed in/out, "
                      "delta term omitted, confidence 1 - beta"}
