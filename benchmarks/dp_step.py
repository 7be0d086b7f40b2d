"""Seconds per DP step vs. the plain (non-private) step, tiny-32 random init, one thread.

For CoOp and CLIP-Adapter at batch B it times
  * plain: the client's forward + backward of the PEFT gradient (``Victim.gradient``),
  * per-example: DP-SGD (per-example gradients with torch.func, per-example clipping, noise, / B),
  * per-batch: Dp-CLIP's mechanism on the same cross-entropy gradient (clip the batch gradient, noise),
  * per-example-text-features (CoOp): clip + noise each example's text-feature gradient, one backward
    of the text encoder (``DpSetting(site="text-features")``),
and the FLOPs of each (torch's FlopCounterMode: machine-independent, unlike the times),
the training step of ``clipleak train`` for CoOp (``train``: plain, DP-SGD on the prompt, the text-features
site; the images are encoded once there, so a step is the text tower, the classifier and Adam),
and, for Dp-CLIP's own setting, the contrastive loss of the whole tiny CLIP (image-caption pairs): plain
forward + backward vs. the same plus per-batch clipping and noise, and the Gaussian sampling alone
(noise-only: one N(0, 1) draw per trained parameter). ``contrastive`` trains what clipleak's contrastive
trainer trains (every parameter, the token embedding only in the rows the public captions use);
``contrastive-all-rows`` trains all 49,408 token rows too (noise for 7.8M parameters).

Timings are interleaved (plain, DP, plain, DP, ...) so that load from other processes hits both alike;
the median and the minimum over the repeats are reported, with the ratio of each to plain's (on a
shared machine the minima are the steadier estimate of the cost). Rows (one per group and variant) and
the run's provenance go to benchmarks/results/<name>.json.

    python benchmarks/dp_step.py                                     # every group, batch 32, 15 repeats
    python benchmarks/dp_step.py --batch 8 --repeats 5 --only peft,train --name dp_step-b8
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clipleak.models import TextTower, build_model
from clipleak.peft import PeftConfig, build_victim
from clipleak.privacy import DpSetting, dp_clip, gaussian_noise, privatise
from clipleak.report.results import markdown_table, provenance, write_results
from clipleak.training.pretrain import DEFAULT_TEMPLATES

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLUMNS = [("group", "group"), ("variant", "variant"), ("median_ms", "median ms"), ("min_ms", "min ms"),
           ("ratio_text", "/ plain (medians)"), ("ratio_min_text", "/ plain (minima)"), ("gflop", "GFLOP"),
           ("flop_ratio_text", "FLOPs / plain")]
"""Ratios are shown with two decimals (the numbers stay in ``ratio``, ``ratio_min``, ``flop_ratio``)."""


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = random.Random(0)
    for _ in range(repeats):
        keys = list(fns)
        order.shuffle(keys)  # no variant always runs right after the memory-hungry one
        for k in keys:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _summary(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {k: {"median_ms": 1000 * med[k], "min_ms": 1000 * low[k], "ratio": med[k] / med[base],
                "ratio_min": low[k] / low[base]} for k in times}


def _flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peft_rows(batch: int, repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    clip = build_model("tiny-32", init_seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, clip.image_size, clip.image_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    per_example = DpSetting("per-example", clip=1.0, noise_multiplier=1.0).resolve()
    text_site = DpSetting("per-example", clip=1.0, noise_multiplier=1.0, site="text-features").resolve()
    per_batch = DpSetting("per-batch", clip=1.0, noise_multiplier=1.0).resolve()
    out = {}
    for method in ("coop", "adapter"):
        v = build_victim(clip, NAMES, PeftConfig(method=method))
        fns: dict[str, Callable[[], object]] = {
            "plain": lambda v=v: v.gradient(x, y),
            "per-example": lambda v=v: privatise(v, x, y, per_example, seed=0),
            "per-batch": lambda v=v: privatise(v, x, y, per_batch, seed=0),
        }
        if method == "coop":
            fns["per-example-text-features"] = lambda v=v: privatise(v, x, y, text_site, seed=0)
        row = _summary(_interleaved(fns, repeats), "plain")
        flops = {k: _flops(fn) for k, fn in fns.items()}
        for k in fns:
            row[k]["gflop"] = flops[k] / 1e9
            row[k]["flop_ratio"] = flops[k] / flops["plain"]
        out[method] = row
    return out


def train_rows(batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """One step of ``clipleak train``'s CoOp loop (``training.finetune``: images encoded once, so a step is
    the text tower and the classifier; fixed batches of ``batch`` from 10 x batch encoded images; Adam):
    non-private vs per-example DP-SGD on the prompt vs per-example at the text features."""
    from clipleak.training import FinetuneConfig, FinetuneRun, finetune_dp

    clip = build_model("tiny-32", init_seed=0)
    g = torch.Generator().manual_seed(0)
    n = 10 * batch
    x = torch.rand(n, 3, clip.image_size, clip.image_size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    base = dict(peft=PeftConfig(method="coop"), steps=10**6, batch_size=batch, sampling="fixed", lr=1e-3)
    cfgs = {"plain": FinetuneConfig(**base),
            "per-example": FinetuneConfig(**base, dp=finetune_dp("per-example", clip=1.0, noise_multiplier=1.0)),
            "per-example-text-features": FinetuneConfig(**base, dp=finetune_dp(
                "per-example", site="text-features", clip=1.0, noise_multiplier=1.0))}
    fns: dict[str, Callable[[], object]] = {}
    for name, cfg in cfgs.items():
        v = build_victim(clip, NAMES, PeftConfig(method="coop"))
        with torch.no_grad():
            raw = v.raw_image_features(x)
        run = FinetuneRun(cfg, v, raw, y, cfg.dp_setting(n))
        counter = iter(range(10**9))
        fns[name] = lambda run=run, counter=counter: run.step(next(counter), None)
    row = _summary(_interleaved(fns, repeats), "plain")
    flops = {k: _flops(fn) for k, fn in fns.items()}
    for k in fns:
        row[k]["gflop"] = flops[k] / 1e9
        row[k]["flop_ratio"] = flops[k] / flops["plain"]
    return row


def contrastive_row(batch: int, repeats: int, vocabulary: str = "captions") -> dict[str, dict[str, float]]:
    """Dp-CLIP's setting: the contrastive loss of the whole tiny CLIP, plain vs. per-batch clip + noise.

    ``vocabulary="captions"`` mirrors clipleak's contrastive trainer (``training/pretrain.py``): every
    parameter is trained except the token embedding, of which only the rows of the tokens that the public
    caption templates x class names use are trained (a data-independent choice, so the other rows need no
    noise). ``"all"`` trains every row of the 49,408-token embedding (6.3M of the 7.8M parameters): the
    clipped gradient is noised in every coordinate, used or not.
    """
    clip = build_model("tiny-32", init_seed=0)
    model = clip.model
    model.requires_grad_(True)
    tower = TextTower(model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, clip.image_size, clip.image_size, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g).tolist()
    tokens = clip.tokenizer([f"a photo of a {NAMES[i]}." for i in labels])
    if vocabulary == "captions":
        emb = tower.t.token_embedding.weight
        emb.requires_grad_(False)
        used = torch.unique(clip.tokenizer([t.format(n) for t in DEFAULT_TEMPLATES for n in NAMES]))
        rows = nn.Parameter(emb.detach()[used].clone())
        local = torch.searchsorted(used, tokens)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad} | {"token_rows": rows}

        def text() -> torch.Tensor:
            return tower.encode_embeddings(rows[local], tower.pool_index(tokens))
    else:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}

        def text() -> torch.Tensor:
            return model.encode_text(tokens)

    def grads() -> dict[str, torch.Tensor]:
        fi = F.normalize(model.encode_image(clip.normalize(x)), dim=-1)
        ft = F.normalize(text(), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.t()
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))

    gen = torch.Generator().manual_seed(0)
    like = {n: p.detach() for n, p in params.items()}
    times = _interleaved({"plain": grads, "per-batch": lambda: dp_clip(grads(), 1.0, 1.0, gen),
                          "noise-only": lambda: gaussian_noise(like, 1.0, gen)}, repeats)
    row = _summary(times, "plain")
    row["parameters"] = {"count": float(sum(p.numel() for p in params.values()))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="peft,train,contrastive,contrastive-all-rows",
                    help="comma-separated rows: peft, train (clipleak train's CoOp step), contrastive, "
                         "contrastive-all-rows")
    ap.add_argument("--name", default="dp_step", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = {t.strip() for t in args.only.split(",")}
    prov = provenance(split="none (timing)", draw_seeds=[], images=0, threads=args.threads)
    groups: list[tuple[str, dict[str, dict[str, float]]]] = []
    if "peft" in only:
        groups += list(peft_rows(args.batch, args.repeats).items())
    if "train" in only:
        groups.append(("train-coop", train_rows(args.batch, args.repeats)))
    for name, vocab in (("contrastive", "captions"), ("contrastive-all-rows", "all")):
        if name in only:
            groups.append((name, contrastive_row(args.batch, args.repeats, vocab)))
    rows = []
    for group, variants in groups:
        count = variants.get("parameters", {}).get("count")
        for variant, s in variants.items():
            if "median_ms" in s:
                texts = {f"{k}_text": f"{s[k]:.2f}x" for k in ("ratio", "ratio_min", "flop_ratio") if k in s}
                rows.append({"group": group, "variant": variant, "batch": args.batch, "repeats": args.repeats,
                             **({"parameters": int(count)} if count is not None else {}), **s, **texts})
    notes = (f"tiny-32, random init, batch {args.batch}, {args.repeats} interleaved repeats in shuffled order per "
             "variant; median and minimum per step, each as a ratio to the plain step of its group; FLOPs from "
             "torch's FlopCounterMode (machine-independent).")
    path = write_results(args.name, rows, prov, title="DP step against the plain step", columns=COLUMNS,
                         notes=notes)
    print(markdown_table([h for _, h in COLUMNS], [[r.get(k) for k, _ in COLUMNS] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
