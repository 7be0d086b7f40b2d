"""The training commands: pretrain a target, train a prior, fine-tune a client (with or without DP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ClipleakError, check_range
from .common import DeviceOpt, check_writable, command, console, helptext, progress_bar

MAX_THREADS = 1024
MAX_STEPS = 10_000_000


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
    split_seed: Annotated[int, typer.Option(help="seed of the public/validation/private split")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 400,
    resume: Annotated[bool, typer.Option(help="continue from the newest checkpoint")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (1 is faster on a busy machine)")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Pretrain a target CLIP on the PUBLIC split of a data set (contrastive, captions from templates).

    Reports zero-shot accuracy on the validation split (and the random init's) in OUT's model card. The
    defaults are the recipe of the tiny-mnist artifact.

    Example: clipleak pretrain --out runs/mine.safetensors --data mnist --time-budget 300 --threads 1
    """
    from ..devices import resolve_device
    from ..training import PretrainConfig
    from ..training import pretrain as run_pretrain

    dev = resolve_device(device)
    check_writable(out, folder=False)
    _check_common(threads=threads, steps=steps, batch_size=batch_size, lr=lr)
    check_range("--time-budget", time_budget, low=0, high=1e7, low_open=True)
    if steps is None and time_budget is None:
        steps = PretrainConfig.steps
    cfg = PretrainConfig(arch=arch, data=data, split_seed=split_seed, steps=steps, batch_size=batch_size,
                         lr=lr, warmup_steps=warmup_steps, seed=seed, augment=augment,
                         patch_dropout=patch_dropout, checkpoint_every=checkpoint_every,
                         time_budget_s=time_budget)
    with progress_bar() as cb:
        card = run_pretrain(cfg, out, resume=resume, progress=cb, threads=threads, device=dev)
    zs = card["zero_shot"]
    console.print(f"weights: [bold]{out}[/] ({card['steps_done']} steps, {card['train_seconds']:.0f} s "
                  f"of training, final loss {card['final_loss']:.3f})")
    if card["stopped_early"]:
        console.print(f"stopped early: {card['stopped_early']} (resume with --resume and a larger budget)")
    if zs is not None:
        console.print(f"zero-shot accuracy on {zs['n_images']} validation images ('{zs['prompt']}'): "
                      f"[bold]{zs['accuracy']:.1%}[/] (template ensemble {zs['ensemble_accuracy']:.1%}; "
                      f"random init {zs['random_init_accuracy']:.1%}, chance {zs['chance']:.1%})")
    console.print(f"model card: {out.with_name(out.stem + '.card.json')}")

def prior_train(
    kind: Annotated[str, typer.Option(help="vae (latent space for searches) | decoder (CLIP feature -> image) | "
                                      "cnn (GradViT's BatchNorm prior network)")],
    out: Annotated[Path, typer.Option(help="prior file to write (.safetensors; + .card.json beside it)")],
    data: Annotated[str, typer.Option(
        help="mnist | digits | sklearn-photos | skimage-photos | folder:PATH")] = "mnist",
    arch: Annotated[str, typer.Option(help="target architecture (sets the image size)")] = "tiny-32",
    weights: Annotated[str | None, typer.Option(
        help="target weights (decoder: required; a file or tiny-mnist)")] = None,
    seconds: Annotated[float | None, typer.Option(help="training time budget (fits the schedule to it)")]
    = None,
    steps: Annotated[int | None, typer.Option(help="steps (default 2000; --seconds stops early)")] = None,
    latent: Annotated[int, typer.Option(help="VAE latent dimension")] = 32,
    feature_noise: Annotated[float, typer.Option(
        help="decoder: train on features with Gaussian noise of this norm (0.05 suits features fitted to "
             "a CoOp gradient)")] = 0.0,
    augment_copies: Annotated[int, typer.Option(
        help="decoder: add this many small random affine copies of every public image (2 with --steps 4000 "
             "and --base 128: 21.5 dB on tiny-mnist's validation digits against 20.3 without)")] = 0,
    base: Annotated[int, typer.Option(help="decoder: widest channel count")] = 64,
    work_size: Annotated[int | None, typer.Option(
        help="decoder: the side its convolutions work at and its loss is taken at, its output resized to the "
             "image size (e.g. 28 for MNIST digits at 224 px; default: the image size)")] = None,
    split_seed: Annotated[int, typer.Option(help="seed of the public/validation/private split")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the init and the data order")] = 0,
    resume: Annotated[bool, typer.Option(
        help="continue from the checkpoint beside OUT (<stem>.ckpt/, written as it trains)")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (1 is faster on a busy machine)")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train an image prior on the PUBLIC split and save it with a card (quality on the validation split).

    Progress is saved beside OUT (<stem>.ckpt/, with a decoder's target features); after a kill, the same
    command with --resume continues where it stopped. The folder is removed once the prior is written.

    Example: clipleak prior train --kind decoder --weights tiny-mnist --out runs/decoder.safetensors --seconds 120

    Example: clipleak prior train --kind decoder --weights tiny-mnist-224 --arch tiny-224 --work-size 28 --augment-copies 2 --base 128 --steps 4000 --out runs/decoder224.safetensors

    Example: clipleak prior train --kind vae --out runs/vae.safetensors --steps 2000

    Example: clipleak prior train --kind cnn --out runs/cnn.safetensors --steps 600
    """  # noqa: E501
    from ..artifacts import resolve_path
    from ..devices import resolve_device
    from ..priors import save_prior
    from ..training import PriorCheckpoints, build_prior, checkpoint_dir

    dev = resolve_device(device)
    if out.suffix != ".safetensors":
        raise ClipleakError(f"--out must end in .safetensors, got {out}")
    check_writable(out, folder=False)
    _check_common(steps=steps, threads=threads)
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    check_range("--seconds", seconds, low=0, high=1e7, low_open=True)
    ckpt = PriorCheckpoints(checkpoint_dir(out), resume=resume)
    with progress_bar() as cb:
        prior = build_prior(kind, data=data, arch=arch, weights=resolve_path(weights, cb), split_seed=split_seed,
                            steps=steps, seconds=seconds, seed=seed, latent=latent, feature_noise=feature_noise,
                            augment_copies=augment_copies, base=base, work_size=work_size, progress=cb,
                            device=dev, checkpoints=ckpt)
    path = save_prior(prior, out)
    ckpt.clear()
    tr = prior.card["training"]
    console.print(f"{kind}: [bold]{path}[/] ({tr['steps_done']} steps, {tr['train_seconds']:.0f} s of training)")
    q = prior.card.get("quality", {})
    key = "validation_reencode_psnr_db" if kind == "vae" else "validation_decode_psnr_db"
    if "validation_accuracy" in q:
        console.print(f"validation split: {q['validation_accuracy']:.1%} accuracy; BN prior of batches of 4: "
                      f"{q['validation_bn_prior_batch4_mean']:.2f} "
                      f"(uniform noise {q['noise_bn_prior_batch4_mean']:.2f})")
    if key in q:
        console.print(f"validation split: {q[key]:.1f} dB PSNR (class-prototype baseline "
                      f"{q['validation_prototype_psnr_db']:.1f} dB)")
    console.print(f"card: {path.with_name(path.stem + '.card.json')}")


def train(
    out: Annotated[Path, typer.Option(help="output folder (PEFT: peft.safetensors + finetune.json; contrastive: "
                                      "model.safetensors + its card)")],
    method: Annotated[str, typer.Option(help="coop | adapter (PEFT fine-tuning)")] = "adapter",
    contrastive: Annotated[bool, typer.Option(help="fine-tune the whole target contrastively (Dp-CLIP) instead")]
    = False,
    dp: Annotated[str, typer.Option(help="none | per-example (PEFT: DP-SGD) | per-batch (contrastive: Dp-CLIP)")]
    = "none",
    dp_site: Annotated[str, typer.Option(
        help="per-example DP site: parameters (DP-SGD on the PEFT gradient) | text-features (coop only: clip + "
             "noise each example's gradient w.r.t. the class text features, then one text backward to the prompt; "
             "same epsilon, about the plain step's cost)")] = "parameters",
    epsilon: Annotated[float | None, typer.Option(help="target epsilon (sigma calibrated for this schedule)")]
    = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="sigma (instead of --epsilon)")] = None,
    delta: Annotated[float, typer.Option(help="delta of the (epsilon, delta) guarantee")] = 1e-5,
    clip: Annotated[float | None, typer.Option(help="clipping norm C (default 0.1 PEFT, 1.0 contrastive)")] = None,
    steps: Annotated[int, typer.Option(help="training steps")] = 200,
    batch_size: Annotated[int, typer.Option(help="expected batch size (Poisson) or batch size (fixed)")] = 25,
    sampling: Annotated[str, typer.Option(help="poisson (accounted exactly) | fixed (accounted as Poisson)")]
    = "poisson",
    lr: Annotated[float | None, typer.Option(help="learning rate (default: adapter 1e-2, coop 1e-2, "
                                             "contrastive 1e-5)")] = None,
    optimizer: Annotated[str, typer.Option(help="adam | sgd (momentum 0.9)")] = "adam",
    weights: Annotated[str, typer.Option(help="target weights (a file or tiny-mnist)")] = "tiny-mnist",
    data: Annotated[str, typer.Option(help="data set (its private split is the client's images)")] = "mnist",
    part: Annotated[str, typer.Option(help="private | validation (the client's images; validation for tuning)")]
    = "private",
    accountant: Annotated[str, typer.Option(help="rdp | prv")] = "rdp",
    seed: Annotated[int, typer.Option(help="seed of the batches and the noise")] = 0,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoint in OUT")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    defense: Annotated[str | None, typer.Option(
        help="PEFT: update defense on each step's gradient, after any DP: prune:FRACTION | quantize:BITS "
             "(1 = sign) | quantize:sign | clip:C (no noise)")] = None,
    prompt_template: Annotated[str, typer.Option(help="PEFT: class prompt, {} is the class name")]
    = "a photo of a {}.",
    device: DeviceOpt = "auto",
) -> None:
    """Fine-tune a client's CoOp or CLIP-Adapter on its images (optionally with per-example DP-SGD), or
    the whole target contrastively with Dp-CLIP's per-batch clipping (--contrastive).

    Prints accuracy on the validation split before and after, and the epsilon spent (RDP by default).
    Checkpoints in OUT; --resume continues an interrupted run.

    Example: clipleak train --method adapter --dp per-example --epsilon 3 --delta 1e-5 --clip 0.1 --steps 200 --out runs/ft-dp

    Example: clipleak train --method coop --dp per-example --dp-site text-features --epsilon 3 --clip 0.01 --lr 3e-3 --out runs/ft-coop-dp

    Example: clipleak train --contrastive --dp per-batch --epsilon 3 --steps 100 --out runs/dpclip
    """  # noqa: E501
    from .. import api
    from ..devices import resolve_device
    from ..peft import PeftConfig
    from ..training import ContrastiveConfig, FinetuneConfig, contrastive_dp, finetune_dp

    dev = resolve_device(device)
    check_writable(out, folder=True)
    _check_common(threads=threads, steps=steps, batch_size=batch_size, lr=lr)
    check_range("--clip", clip, low=0, low_open=True)
    check_range("--epsilon", epsilon, low=0, low_open=True)
    check_range("--noise-multiplier", noise_multiplier, low=0)
    check_range("--delta", delta, low=0, high=1, low_open=True)
    if contrastive:
        if defense is not None:
            raise ClipleakError("--defense is for PEFT fine-tuning, not --contrastive")
        if dp_site != "parameters":
            raise ClipleakError("--dp-site is for per-example DP-SGD of CoOp, not contrastive fine-tuning")
        if prompt_template != PeftConfig().template:
            raise ClipleakError("--prompt-template is for PEFT fine-tuning, not --contrastive")
        cdp = contrastive_dp(dp, clip=clip if clip is not None else 1.0, noise_multiplier=noise_multiplier,
                             epsilon=epsilon, delta=delta, accountant=accountant)
        ccfg = ContrastiveConfig(dp=cdp, steps=steps, batch_size=batch_size, lr=lr if lr is not None else 1e-5,
                                 seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        with progress_bar() as cb:
            card = api.contrastive_finetune_client(ccfg, out / "model.safetensors", weights=weights, data=data,
                                                   part=part, resume=resume, progress=cb, threads=threads,
                                                   device=dev)
        zs = card["zero_shot"]
        console.print(f"weights: [bold]{out / 'model.safetensors'}[/] ({card['steps_done']} steps, "
                      f"{card['train_seconds']:.0f} s)")
        if zs is not None:
            console.print(f"zero-shot accuracy on {zs['n_images']} validation images: [bold]{zs['accuracy']:.1%}[/]")
        pv = card.get("privacy")
        if pv:
            console.print(f"Dp-CLIP per-batch: C {pv['clip']:g}, sigma {pv['noise_multiplier']:.4g} (sensitivity "
                          f"2C), epsilon {pv['epsilon_at_steps_done']:.3g} at delta {pv['delta']:g} "
                          f"({pv['accountant']}; {pv['sampling']})")
        return
    if dp == "per-batch":
        raise ClipleakError("PEFT fine-tuning uses per-example DP-SGD (--dp per-example); per-batch is for "
                            "--contrastive")
    pdp = finetune_dp(dp, clip=clip if clip is not None else 0.1, noise_multiplier=noise_multiplier,
                      epsilon=epsilon, delta=delta, accountant=accountant, site=dp_site)
    cfg = FinetuneConfig(peft=PeftConfig(method=method, template=prompt_template), dp=pdp, steps=steps,
                         batch_size=batch_size, sampling=sampling, optimizer=optimizer,
                         lr=lr if lr is not None else 1e-2, seed=seed, defense=defense)
    with progress_bar() as cb:
        res = api.finetune_client(cfg, out, weights=weights, data=data, part=part, resume=resume, progress=cb,
                                  threads=threads, device=dev)
    console.print(f"{method}: [bold]{out / 'peft.safetensors'}[/] ({res['steps_done']} steps, "
                  f"{res['train_seconds']:.1f} s; {res['train']['n_images']} {part} images, "
                  f"{res['schedule']['sampling']} sampling, q {res['schedule']['sample_rate']:.3g})")
    console.print(f"accuracy on {res['held_out']['n_images']} validation images: {res['accuracy_before']:.1%} "
                  f"before, [bold]{res['accuracy']:.1%}[/] after")
    pv = res["privacy"]
    if pv:
        site = " at the text features" if pv.get("site") == "text-features" else ""
        console.print(f"DP-SGD per-example{site}: C {pv['clip']:g}, sigma {pv['noise_multiplier']:.4g}, epsilon spent "
                      f"[bold]{pv['epsilon_spent']:.3g}[/] at delta {pv['delta']:g} ({pv['accountant']})")
    if res.get("defense"):
        console.print(f"update defense on every step: {res['defense']['applied']}")
    console.print(f"result: {out / 'finetune.json'}")


def _check_common(*, threads: int | None = None, steps: int | None = None, batch_size: int | None = None,
                  lr: float | None = None) -> None:
    """The options every training command shares, checked before anything is loaded."""
    check_range("--threads", threads, low=1, high=MAX_THREADS, integer=True)
    check_range("--steps", steps, low=1, high=MAX_STEPS, integer=True)
    check_range("--batch-size", batch_size, low=1, high=65_536, integer=True)
    check_range("--lr", lr, low=0, high=1_000, low_open=True)


def register(app: typer.Typer) -> None:
    """Add ``pretrain``, ``train`` and the ``prior`` group to ``app``."""
    command(app)(pretrain)
    command(app)(train)
    prior_app = typer.Typer(help=helptext("Learned image priors (VAE, feature-to-image decoder, BN prior CNN) "
                                          "trained on PUBLIC data."), no_args_is_help=True)
    app.add_typer(prior_app, name="prior")
    command(prior_app, "train")(prior_train)
