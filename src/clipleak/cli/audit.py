"""``clipleak audit``: re-identification and PSNR of the strongest cheap attack against epsilon, beside
the accuracy DP fine-tuning keeps, and a canary audit's epsilon lower bound."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import check_range
from .common import DeviceOpt, check_writable, command, console, parse_ints, progress_bar


def audit(
    out: Annotated[Path, typer.Option(help="output folder (cells.json, audit.json/.md/.png/.html)")],
    epsilons: Annotated[str | None, typer.Option(
        help="comma-separated epsilons; inf = no defense (default inf,100,30,10,3,1; with --defense: inf)")] = None,
    defense: Annotated[str | None, typer.Option(
        help="sweep an update defense without noise instead of epsilon: prune:1,0.1,0.01,0.001 (fraction kept) | "
             "quantize:32,8,4,1 (bits; 32 = none, 1 = sign) | clip:inf,1,0.1 (norm C)")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated PEFT methods (adapter, coop)")] = "adapter,coop",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes of the attacked observations")] = "1",
    attack: Annotated[str, typer.Option(help="attack: featmatch (with the decoder: the strongest cheap one) | mip "
                                        "(the same feature recovery, decoded; --iterations = its refinement steps) "
                                        "| another registered attack")]
    = "featmatch",
    images: Annotated[int, typer.Option(help="observations (private digit batches) per point")] = 8,
    decoder: Annotated[str, typer.Option(
        help="the attack's feature decoder: auto (tiny-mnist-decoder for tiny-mnist on mnist, else one trained on "
             "the public split for these weights within --decoder-seconds and cached), a file or a registered "
             "name; '' for none")] = "auto",
    decoder_seconds: Annotated[float, typer.Option(
        help="--decoder auto: training time budget of a decoder that is not cached yet")] = 300.0,
    iterations: Annotated[int, typer.Option(help="attack iterations (0: decoder output only)")] = 0,
    reid_k: Annotated[int, typer.Option(
        help="re-identification candidates of the true class (chance 1/K; a class needs K private images)")] = 10,
    arch: Annotated[str | None, typer.Option(
        help="target architecture (tiny-32, ViT-B-32, ...; default: the one the weights' card records, else "
             "tiny-32)")] = None,
    weights: Annotated[str, typer.Option(help="target weights: a registered name, a file, or none (random init)")]
    = "tiny-mnist",
    data: Annotated[str, typer.Option(
        help="images: mnist, digits, sklearn-photos, skimage-photos or folder:PATH (PATH/<class>/<images>; class "
             "names from the folder names); the audit attacks its PRIVATE split")] = "mnist",
    split_seed: Annotated[int, typer.Option(help="seed of the public / validation / private split")] = 0,
    prompt_template: Annotated[str, typer.Option(help="class prompt, {} is the class name")] = "a photo of a {}.",
    classnames: Annotated[str | None, typer.Option(
        help="comma-separated class names in label order (a folder's sorted sub-folders); default: the data's "
             "own (a folder's sub-folder names)")] = None,
    device: DeviceOpt = "auto",
    clip: Annotated[float, typer.Option(help="clipping norm C of the schedule")] = 0.01,
    steps: Annotated[int, typer.Option(help="DP-SGD steps of the client's schedule")] = 200,
    batch_size: Annotated[int, typer.Option(help="expected batch size of the schedule (q = B / N)")] = 25,
    lr: Annotated[float, typer.Option(help="fine-tuning learning rate (Adam)")] = 1e-2,
    delta: Annotated[float, typer.Option(help="delta")] = 1e-5,
    class_specific: Annotated[bool, typer.Option(
        "--class-specific", help="coop: one context per class (the observations and the DP fine-tuning)")] = False,
    dp_site: Annotated[str, typer.Option(
        help="coop: per-example DP site, parameters (DP-SGD on the prompt) | text-features")] = "parameters",
    canaries: Annotated[int, typer.Option(help="canaries per DP run for the lower bound (0: none)")] = 1000,
    seed: Annotated[int, typer.Option(
        help="seeds the DP noise of the attacked observations, the DP fine-tuning's batches and noise, and the "
             "canaries; it does not pick the digits (--draw-seed does)")] = 0,
    draw_seed: Annotated[int, typer.Option(
        help="picks which private digits are attacked: the IMAGES batches of every point are drawn with seeds "
             "DRAW_SEED, DRAW_SEED+1, ..., DRAW_SEED+IMAGES-1 (the same digits at every epsilon); a folder "
             "holds one draw seed")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch threads (per worker with --workers)")] = None,
    workers: Annotated[int, typer.Option(
        help="compute the cells on N Ray workers (the table is a serial run's; resumable either way)")] = 1,
    ray_address: Annotated[str | None, typer.Option(
        help="with --workers: an existing Ray cluster (e.g. ray://HOST:10001); default a local Ray")] = None,
    restart: Annotated[bool, typer.Option(
        "--restart", help="delete OUT/cells.json first and start the audit over (e.g. when it is damaged)")] = False,
) -> None:
    """Sweep epsilon x PEFT method x batch size: defended observations of private digits attacked and scored
    (re-identification, PSNR) beside the class prototype and chance; validation accuracy of DP fine-tuning on
    the same schedule; a canary audit's empirical epsilon lower bound. Every rate comes with its 95% interval
    over the images of the point, and "at chance" means the interval reaches chance (1/10). Resumable:
    finished cells are kept in OUT/cells.json and a rerun skips them (a rerun with other settings, another
    --draw-seed included, is refused).

    --defense sweeps pruning, quantisation or clipping without noise instead of epsilon (no DP, no canaries):
    the observations carry the defense and the fine-tuning applies it to every step's gradient.

    Writes one chart (OUT/audit.png), a table (audit.json, audit.md) and a page (audit.html), each with the
    verdict in words: it leaks / no leakage beyond the class prototype / the epsilon from which
    re-identification is at chance, and the accuracy that costs.

    Your model and images: --arch and --weights name the target, --data folder:PATH the images (the audit
    attacks the private split of the folder's seeded split, recorded in OUT/cells.json). The attack's
    decoder is trained on the public split for those weights (--decoder auto, --decoder-seconds) and
    cached. Everything is checked before any work.

    Example: clipleak audit --epsilons inf,100,30,10,3,1 --methods adapter,coop --batch-sizes 1 --attack featmatch --images 8 --out runs/audit

    Example: clipleak audit --methods adapter --epsilons inf,1e6,1e5,3 --images 16 --draw-seed 1000 --out runs/audit-draw1000

    Example: clipleak audit --defense prune:1,0.1,0.01,0.001 --methods adapter,coop --batch-sizes 1,4 --canaries 0 --out runs/audit-prune

    Example: clipleak audit --arch ViT-B-32 --weights vitb32.pt --data folder:my_images --epsilons inf,8,3,1 --methods coop,adapter --device auto --out runs/audit-mine

    Example: clipleak audit --methods coop --class-specific --attack mip --batch-sizes 2 --epsilons inf,1e6,1e5,1e4,100,3 --lr 3e-3 --out runs/audit-coop-cs
    """  # noqa: E501
    from .. import api
    from ..audit import AuditConfig, parse_epsilons
    from ..data import DataSpec

    check_writable(out, folder=True)
    check_range("--threads", threads, low=1, high=256, integer=True)
    ft: dict[str, object] = {"steps": steps, "batch_size": batch_size, "clip": clip, "lr": lr, "sampling": "poisson"}
    if class_specific:  # only when set: audits run before these options existed stay resumable
        ft["class_specific"] = True
    if dp_site != "parameters":
        ft["dp_site"] = dp_site
    if epsilons is None:
        epsilons = "inf" if defense else "inf,100,30,10,3,1"
    spec = DataSpec.parse(data, split_seed=split_seed)  # a folder is recorded by its absolute path
    cfg = AuditConfig(epsilons=parse_epsilons(epsilons), defense=defense or None,
                      methods=[m.strip() for m in methods.split(",") if m.strip()],
                      batch_sizes=parse_ints(batch_sizes) or [1], attack=attack, images=images,
                      decoder=decoder or None, iterations=iterations, weights=weights, delta=delta,
                      finetune=ft, canaries=canaries, seed=seed, draw_seed=draw_seed, data=spec.name,
                      split_seed=split_seed, arch=arch, prompt_template=prompt_template,
                      classnames=None if classnames is None else [c.strip() for c in classnames.split(",")],
                      decoder_seconds=decoder_seconds, reid_k=reid_k)
    if restart:
        (out / "cells.json").unlink(missing_ok=True)
    with progress_bar() as cb:
        summary = api.audit(cfg, out, progress=cb, threads=threads, device=device, workers=workers,
                            ray_address=ray_address)
    console.print(f"{summary['computed']} cell(s) computed ({summary['seconds_this_run']:.0f} s), the rest resumed")
    for v in summary.get("verdict", []):
        console.print(f"[bold]Verdict:[/] {v}")
    for f in summary["findings"]:
        console.print(f)
    console.print(f"chart: [bold]{summary['files']['chart']}[/]; table: {summary['files']['markdown']}; "
                  f"page: {summary['files']['html']}")


def register(app: typer.Typer) -> None:
    """Add ``audit`` to ``app``."""
    command(app)(audit)
