from __future__ import annotations

import pytest
import torch

from clipleak.models import build_model

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny():
    """Random-init tiny-32 CLIP (fast; attack *mechanics* only, never leakage claims)."""
    return build_model("tiny-32", init_seed=0)


@pytest.fixture(scope="session")
def digits() -> list[str]:
    return list(DIGITS)
