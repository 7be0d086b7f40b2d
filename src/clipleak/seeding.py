"""Seed derivation: every random draw in clipleak (batch order, DP noise, partitions, canaries) gets its own
seed, a pure function of a base seed and a label, so a run resumed at step ``s`` draws what it would have."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that is a pure function of ``(seed, parts)`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr((int(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
