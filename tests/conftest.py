from __future__ import annotations

import os
from pathlib import Path

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


# A short pretraining run, one thread (bitwise reproducible on a given CPU type, and not slowed down by
# other busy processes the way two threads are). Measured: zero-shot 0.668 on the 1,000 private digits
# (chance 0.10) in 18 s of training with another job on the second core; 150 steps at batch 32 gave 0.394,
# 150 steps at batch 16 / lr 7e-4 gave 0.349.
SHORT = dict(arch="tiny-32", data="mnist", steps=200, batch_size=32, lr=1e-3, warmup_steps=20,
             augment=False, patch_dropout=0.0, checkpoint_every=10**6)
SHORT_MIN_ACCURACY = 0.50


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> tuple[Path, dict]:
    """A small TRAINED target (weights file, model card): the fixture for leakage claims in tests."""
    from clipleak.training.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrain") / "short.safetensors"
    card = pretrain(PretrainConfig(**SHORT), out, threads=1)  # restores the thread count afterwards
    return out, card


@pytest.fixture(scope="session")
def short_decoder(short_run, tmp_path_factory) -> Path:
    """A feature decoder for the short trained target, 400 steps on the public split (a saved file)."""
    from clipleak.data import DataSpec, load_public
    from clipleak.priors import save_prior
    from clipleak.training import train_decoder

    clip = build_model("tiny-32", short_run[0])
    dec = train_decoder(clip, load_public(DataSpec(), 32), steps=400, batch=32, seed=0)
    dec.card["data_spec"] = DataSpec().to_dict()
    return save_prior(dec, tmp_path_factory.mktemp("decoder") / "short-decoder.safetensors")


@pytest.fixture
def audit_calls(monkeypatch) -> list:
    """``api.audit`` replaced by a recorder: the CLI's parsing is tested without running an audit; the list
    holds the AuditConfig of every call."""
    from clipleak import api

    seen: list = []

    def fake(cfg, out, **kw):
        seen.append(cfg)
        return {"computed": 0, "seconds_this_run": 0.0, "findings": [],
                "files": {"chart": "c", "markdown": "m", "html": "h"}}

    monkeypatch.setattr(api, "audit", fake)
    return seen


def _three_class_folder(root: Path, n: int = 30) -> list[str]:
    """``root/<class>/<i>.png``: 3 classes of ``n`` small RGB images, each class a bright patch in its own colour
    channel over dim noise. Returns the class names as a folder data set reads them (sorted, "_" as " ")."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(["red_square", "green_bar", "blue_dot"]):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = (rng.random((40, 48, 3)) * 60).astype(np.uint8)
            img[8 + i % 7: 28, 10: 30 + i % 9, k] = 255
            Image.fromarray(img).save(root / name / f"{i}.png")
    return ["blue dot", "green bar", "red square"]


@pytest.fixture
def refusal(capsys):
    """A function that runs ``clipleak ARGS``, asserts it exits 2 with one line on stderr, and returns that line."""
    from clipleak.cli import main

    def run(args: list[str]) -> str:
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, (args, code, err)
        return err

    return run


@pytest.fixture
def image_folder():
    """A function that writes a small 3-class image folder (``folder:PATH`` data) under the path it is given."""
    return _three_class_folder
