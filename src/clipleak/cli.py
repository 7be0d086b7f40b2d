"""The ``clipleak`` command line, a thin layer over the public API.

User errors (:class:`~clipleak.errors.ClipleakError`) print one line and exit with code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from . import __version__
from .errors import ClipleakError

app = typer.Typer(
    name="clipleak",
    help="How much do CLIP federated-learning updates leak about a client's images?\n\n"
    "Example: clipleak demo --out runs/demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

DEFAULT_CLASSNAMES_NOTE = "class names of the data set (override with --classnames)"


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=False,
    )


def _parse_ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ClipleakError(f"expected comma-separated integers, got {text!r}") from e


# ---------------------------------------------------------------------------------------------------
@app.command()
def models() -> None:
    """List the model architectures clipleak can build (open_clip's, plus clipleak's tiny ones).

    Example: clipleak models
    """
    from .models import TINY_ARCHS, list_architectures

    archs = list_architectures()
    console.print(f"clipleak tiny configs: {', '.join(TINY_ARCHS)}")
    typer.echo("\n".join(archs))


@app.command()
def share(
    out: Annotated[Path, typer.Option(help="where to write the observation (.safetensors + .json)")],
    arch: Annotated[str, typer.Option(help="open_clip architecture")] = "tiny-32",
    weights: Annotated[str | None, typer.Option(help="local weights file; none = random init")] = None,
    init_seed: Annotated[int, typer.Option(help="seed of a random init")] = 0,
    data: Annotated[str, typer.Option(help="mnist | digits | sklearn-photos | skimage-photos | folder:PATH")] = "mnist",
    split_seed: Annotated[int, typer.Option(help="seed of the public/private split")] = 0,
    method: Annotated[str, typer.Option(help="coop | adapter | full-visual | full")] = "coop",
    n_ctx: Annotated[int, typer.Option(help="CoOp context length M")] = 4,
    class_specific: Annotated[bool, typer.Option(help="CoOp: one context per class")] = False,
    classnames: Annotated[str | None, typer.Option(help="comma-separated class names")] = None,
    batch_size: Annotated[int, typer.Option(help="images in the client's batch")] = 1,
    classes: Annotated[str | None, typer.Option(help="draw only from these class indices, e.g. 3,5")] = None,
    seed: Annotated[int, typer.Option(help="seed of the batch draw")] = 0,
    include_labels: Annotated[bool, typer.Option(help="the shared message carries the labels")] = False,
    truth_out: Annotated[Path | None, typer.Option(help="client-side ground truth file (default: OUT.truth)")] = None,
) -> None:
    """Client side: draw a private batch, compute the update it would share, save it.

    Example: clipleak share --out runs/obs --method coop --batch-size 2 --data mnist
    """
    from .api import make_observation

    obs, truth = make_observation(
        arch=arch, weights=weights, init_seed=init_seed, data=data, split_seed=split_seed, method=method,
        n_ctx=n_ctx, class_specific=class_specific,
        classnames=classnames.split(",") if classnames else None, batch_size=batch_size,
        classes=_parse_ints(classes), seed=seed, include_labels=include_labels,
    )
    p = obs.save(out)
    tp = truth.save(truth_out if truth_out is not None else p.with_suffix(".truth"))
    console.print(f"observation: [bold]{p}[/] (+ {p.with_suffix('.json').name})")
    console.print(f"ground truth (client side; never give it to the attacker): {tp}")


@app.command()
def attack(
    observation: Annotated[Path, typer.Argument(help="observation .safetensors (its .json beside it)")],
    out: Annotated[Path, typer.Option(help="reconstruction folder")] = Path("reconstruction"),
    name: Annotated[str, typer.Option("--attack", help="ig (Inverting Gradients) | featmatch (recover the "
                                      "image features from the update, then match them)")] = "ig",
    prior: Annotated[str, typer.Option(help="none | tv | generative:VAE (file or name, e.g. "
                                       "generative:tiny-mnist-vae)")] = "tv",
    decoder: Annotated[str | None, typer.Option(help="featmatch: feature-to-image decoder (file or name, e.g. "
                                                "tiny-mnist-decoder); --iterations 0 returns its output")] = None,
    weights: Annotated[str | None, typer.Option(help="weights file, if not where the observation says")] = None,
    iterations: Annotated[int, typer.Option(help="optimisation steps per restart")] = 300,
    restarts: Annotated[int, typer.Option(help="seeded restarts; the best by gradient loss is kept")] = 2,
    lr: Annotated[float, typer.Option(help="Adam step size")] = 0.1,
    tv: Annotated[float, typer.Option(help="total-variation weight")] = 0.05,
    labels: Annotated[str, typer.Option(help="auto | known | infer")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the restarts")] = 0,
    resume: Annotated[bool, typer.Option(help="keep finished restarts in OUT/checkpoint and resume")] = True,
) -> None:
    """Attacker side: reconstruct the client's images from an observation.

    Example: clipleak attack runs/obs.safetensors --out runs/rec --iterations 300 --restarts 2

    Example: clipleak attack runs/obs.safetensors --attack featmatch --decoder tiny-mnist-decoder
    --prior generative:tiny-mnist-vae --out runs/rec
    """
    rec = _run_attack_with_progress(observation, out, name, weights, iterations, restarts, lr, tv, labels,
                                    seed, resume, prior=prior, decoder=decoder)
    console.print(f"reconstruction: [bold]{out}[/] ({rec.meta['seconds']:.1f} s, "
                  f"{1000 * rec.meta['seconds_per_iteration']:.1f} ms/iteration)")


def _run_attack_with_progress(observation: Path, out: Path, name: str, weights: str | None, iterations: int,
                              restarts: int, lr: float, tv: float, labels: str, seed: int, resume: bool,
                              prior: str = "tv", decoder: str | None = None):
    from .api import attack_observation

    with _progress() as prog:
        task = prog.add_task(f"attack {name}", total=max(1, iterations * restarts), info="")

        def cb(r: int, it: int, total: int, values: dict[str, float]) -> None:
            key = "gradient" if "gradient" in values else "feature"
            g = values.get(key)
            prog.update(task, completed=r * total + it + 1,
                        info=f"restart {r + 1}/{restarts}" + (f" {key} {g:.4f}" if g is not None else ""))

        rec = attack_observation(
            observation, name=name, weights=weights, iterations=iterations, restarts=restarts, lr=lr,
            tv_weight=tv, labels=labels, seed=seed,
            checkpoint=str(out / "checkpoint") if resume else None, progress=cb, prior=prior, decoder=decoder,
        )
        prog.update(task, completed=max(1, iterations * restarts))
    rec.save(out)
    return rec


@app.command()
def evaluate(
    reconstruction: Annotated[Path, typer.Argument(help="reconstruction folder from `clipleak attack`")],
    truth: Annotated[Path, typer.Option(help="client-side ground truth file from `clipleak share`")],
    out: Annotated[Path | None, typer.Option(help="report folder (default: the reconstruction folder)")] = None,
    reid_k: Annotated[int, typer.Option(help="re-identification pool size (true image + K-1 of its class)")] = 10,
) -> None:
    """Score a reconstruction against the truth and the honest baselines; write the report.

    Example: clipleak evaluate runs/rec --truth runs/obs.truth.safetensors
    """
    from .api import evaluate_reconstruction

    report, ev = evaluate_reconstruction(reconstruction, truth, out or reconstruction, reid_k=reid_k)
    console.print(ev["verdict"]["text"])
    console.print(f"report: [bold]{report}[/]")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("clipleak-demo"),
    weights: Annotated[str, typer.Option(help="target weights: a file, a named artifact (tiny-mnist, built on "
                                         "first use), or 'random' for a random-init contrast")] = "tiny-mnist",
    method: Annotated[str, typer.Option(help="coop | adapter | full-visual | full")] = "coop",
    name: Annotated[str, typer.Option("--attack", help="featmatch | ig")] = "featmatch",
    prior: Annotated[str, typer.Option(help="none | tv | generative:VAE")] = "generative:tiny-mnist-vae",
    decoder: Annotated[str | None, typer.Option(help="feature-to-image decoder for featmatch ('' for none)")]
    = "tiny-mnist-decoder",
    batch_size: Annotated[int, typer.Option(help="images in the client's batch")] = 1,
    iterations: Annotated[int | None, typer.Option(
        help="attack steps per restart (default: 0 for featmatch with a decoder, i.e. the decoder's output; "
             "else 150)")] = None,
    restarts: Annotated[int, typer.Option(help="attack restarts")] = 1,
    seed: Annotated[int, typer.Option(help="seed of the batch draw and the attack")] = 0,
) -> None:
    """Run share -> attack -> evaluate on the built-in default and print where the report is.

    Default: the tiny CLIP pretrained by clipleak on public MNIST digits (tiny-mnist), a CoOp prompt,
    one private digit; the attacker fits the image feature and the label to the prompt gradient and
    turns the feature into a digit with a decoder trained on the public split (the best prior measured
    on this target; add --iterations 150 to refine it by a VAE latent search). The first run trains
    the target and the priors once (5-10 minutes on 2 cores, cached); later runs take well under 3 minutes.

    Example: clipleak demo --out runs/demo

    Example: clipleak demo --method adapter --iterations 150 --out runs/demo-adapter

    Example: clipleak demo --weights random --attack ig --prior tv --out runs/demo-random
    """
    from .api import evaluate_reconstruction, make_observation

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    w = None if weights == "random" else weights
    dec = decoder or None
    if w is None and name == "featmatch":
        dec = None  # the named priors belong to the trained target
    if w is None and prior.startswith("generative:tiny-mnist"):
        prior = "tv"
    if iterations is None:
        iterations = 0 if (name == "featmatch" and dec) else 150
    console.print(f"[bold]1/3 client[/]: tiny-32 ({weights}), {method}, {batch_size} private MNIST digit(s)")
    obs, truth = make_observation(weights=w, method=method, batch_size=batch_size, seed=seed)
    obs_path = obs.save(out / "observation")
    truth_path = truth.save(out / "truth")
    how = f"decoder {dec} (its output, no search)" if (dec and name == "featmatch" and iterations == 0) else \
        f"prior {prior}" + (f", decoder {dec}" if dec else "") + f", {iterations} steps"
    console.print(f"[bold]2/3 attacker[/]: {name}, {how}")
    _run_attack_with_progress(obs_path, out / "reconstruction", name, None, iterations, restarts,
                              0.1 if name == "ig" and prior in ("none", "tv") else 0.05, 0.05, "auto", seed,
                              False, prior=prior, decoder=dec)
    console.print("[bold]3/3 evaluation[/]")
    report, ev = evaluate_reconstruction(out / "reconstruction", truth_path, out / "report")
    console.print(ev["verdict"]["text"])
    reid = ev.get("reidentification") or {}
    if reid.get("attack") is not None:
        nn = f"public nearest neighbour {reid['public-nn']:.0%}, " if reid.get("public-nn") is not None else ""
        console.print(f"re-identification: {reid['attack']:.0%} (class prototype {reid['prototype']:.0%}, "
                      f"{nn}chance {reid['chance']:.0%})")
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Report: [bold]{report}[/]")


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="weights file to write (.safetensors; + .card.json beside it)")],
    arch: Annotated[str, typer.Option(help="open_clip architecture")] = "tiny-32",
    data: Annotated[str, typer.Option(help="mnist | digits | folder:PATH | csv:PATH")] = "mnist",
    steps: Annotated[int | None, typer.Option(help="schedule length (default 1500 or fit to budget)")] = None,
    time_budget: Annotated[float | None, typer.Option(help="seconds of training; stops there")] = None,
    batch_size: Annotated[int, typer.Option(help="image-caption pairs per step")] = 32,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="linear warmup steps (at most 10% of the steps)")] = 200,
    augment: Annotated[bool, typer.Option(help="random shift/rotation/scale of each image")] = True,
    patch_dropout: Annotated[float, typer.Option(help="fraction of patches dropped in training steps")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed of the init, data order, captions, augmentation")] = 0,
    split_seed: Annotated[int, typer.Option(help="seed of the public/private split")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 400,
    resume: Annotated[bool, typer.Option(help="continue from the newest checkpoint")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (1 is faster on a busy machine)")] = None,
) -> None:
    """Pretrain a target CLIP on the PUBLIC split of a data set (contrastive, captions from templates).

    Reports zero-shot accuracy on the private split (and the random init's) in OUT's model card. The
    defaults are the recipe of the tiny-mnist artifact.

    Example: clipleak pretrain --out runs/mine.safetensors --data mnist --time-budget 300 --threads 1
    """
    from .pretrain import PretrainConfig
    from .pretrain import pretrain as run_pretrain

    if steps is None and time_budget is None:
        steps = PretrainConfig.steps
    cfg = PretrainConfig(arch=arch, data=data, split_seed=split_seed, steps=steps, batch_size=batch_size,
                         lr=lr, warmup_steps=warmup_steps, seed=seed, augment=augment,
                         patch_dropout=patch_dropout, checkpoint_every=checkpoint_every,
                         time_budget_s=time_budget)
    with _progress() as prog:
        task = prog.add_task("pretrain", total=steps, info="loading data")

        def cb(step: int, total: int, info: dict) -> None:
            phase = info.get("phase")
            if phase == "train":
                prog.update(task, completed=step, total=total or None,
                            info=f"loss {info['loss']:.3f} lr {info['lr']:.2e}")
            elif phase == "eval":
                prog.update(task, completed=step, info="zero-shot accuracy on the private split")

        card = run_pretrain(cfg, out, resume=resume, progress=cb, threads=threads)
    zs = card["zero_shot"]
    console.print(f"weights: [bold]{out}[/] ({card['steps_done']} steps, {card['train_seconds']:.0f} s "
                  f"of training, final loss {card['final_loss']:.3f})")
    if card["stopped_early"]:
        console.print(f"stopped early: {card['stopped_early']} (resume with --resume and a larger budget)")
    if zs is not None:
        console.print(f"zero-shot accuracy on {zs['n_images']} private images ('{zs['prompt']}'): "
                      f"[bold]{zs['accuracy']:.1%}[/] (template ensemble {zs['ensemble_accuracy']:.1%}; "
                      f"random init {zs['random_init_accuracy']:.1%}, chance {zs['chance']:.1%})")
    console.print(f"model card: {out.with_name(out.stem + '.card.json')}")


prior_app = typer.Typer(help="Learned image priors (VAE, feature-to-image decoder) trained on PUBLIC data.",
                        no_args_is_help=True)
app.add_typer(prior_app, name="prior")


@prior_app.command("train")
def prior_train(
    kind: Annotated[str, typer.Option(help="vae (latent space for searches) | decoder (CLIP feature -> image)")],
    out: Annotated[Path, typer.Option(help="prior file to write (.safetensors; + <stem>.json card beside it)")],
    data: Annotated[str, typer.Option(help="mnist | digits | sklearn-photos | skimage-photos | folder:PATH")] = "mnist",
    arch: Annotated[str, typer.Option(help="target architecture (sets the image size)")] = "tiny-32",
    weights: Annotated[str | None, typer.Option(help="target weights (decoder: required; e.g. tiny-mnist)")] = None,
    seconds: Annotated[float | None, typer.Option(help="training time budget (fits the schedule to it)")] = None,
    steps: Annotated[int | None, typer.Option(help="steps (default 2000; --seconds stops early)")] = None,
    latent: Annotated[int, typer.Option(help="VAE latent dimension")] = 32,
    feature_noise: Annotated[float, typer.Option(
        help="decoder: train on features with Gaussian noise of this norm (0.05 suits features fitted to a "
             "CoOp gradient: measured 89% -> 95% re-identification there, 0.5 dB less on exact ones)")] = 0.0,
    split_seed: Annotated[int, typer.Option(help="seed of the public/private split")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the init and the data order")] = 0,
) -> None:
    """Train an image prior on the PUBLIC split and save it with a card (quality on the private split).

    Example: clipleak prior train --kind decoder --weights tiny-mnist --out runs/decoder.safetensors --seconds 120

    Example: clipleak prior train --kind decoder --weights tiny-mnist --feature-noise 0.05 --out runs/coop.safetensors
    """
    from .priors import build_prior, save_prior

    if out.suffix != ".safetensors":
        raise ClipleakError(f"--out must end in .safetensors, got {out}")
    if kind not in ("vae", "decoder"):
        raise ClipleakError(f"unknown prior kind {kind!r}; choose vae or decoder")
    with _progress() as prog:
        task = prog.add_task(f"train {kind}", total=steps, info="loading")

        def cb(step: int, total: int, info: dict) -> None:
            if info.get("phase") == "features":
                prog.update(task, info="CLIP features of the public images")
            else:
                prog.update(task, completed=step, total=total or None,
                            info=f"loss {info['loss']:.4f}" + (" (evaluating)" if info.get("phase") == "done" else ""))

        prior = build_prior(kind, data=data, arch=arch, weights=weights, split_seed=split_seed, steps=steps,
                            seconds=seconds, seed=seed, latent=latent, feature_noise=feature_noise, progress=cb)
    path = save_prior(prior, out)
    tr = prior.card["training"]
    console.print(f"{kind}: [bold]{path}[/] ({tr['steps_done']} steps, {tr['train_seconds']:.0f} s of training)")
    q = prior.card.get("quality", {})
    key = "private_reencode_psnr_db" if kind == "vae" else "private_decode_psnr_db"
    if key in q:
        console.print(f"private split: {q[key]:.1f} dB PSNR (class-prototype baseline "
                      f"{q['private_prototype_psnr_db']:.1f} dB)")
    console.print(f"card: {path.with_name(path.stem + '.json')}")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors -> one line on stderr, exit code 2."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        app(args=argv, standalone_mode=False)
    except ClipleakError as e:
        console.print(Text.assemble(("error: ", "red"), str(e)), soft_wrap=True, highlight=False)
        return 2
    except typer.Abort:
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Exit):
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

