from __future__ import annotations

import os

import pytest
import torch

from clipleak.models import build_model

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(autouse=True)
def _threads():
    # CI has 2 idle cores; set CLIPLEAK_TEST_THREADS=1 when another job holds a core (OpenMP
    # spin-waiting on a busy core makes torch tens of times slower).
    torch.set_num_threads(int(os.environ.get("CLIPLEAK_TEST_THREADS", "2")))
    yield


@pytest.fixture(scope="session")
def tiny():
    """Random-init tiny-32 CLIP (fast; attack *mechanics* only, never leakage claims)."""
    return build_model("tiny-32", init_seed=0)


@pytest.fixture(scope="session")
def digits() -> list[str]:
    return list(DIGITS)
