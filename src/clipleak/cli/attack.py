"""The data-path commands: models, share, attack, evaluate, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOpt, check_writable, command, console, parse_ints, progress_bar


def models() -> None:
    """List the model architectures clipleak can build (open_clip's, plus clipleak's tiny ones).

    Example: clipleak models
    """
    from ..models import TINY_ARCHS, list_architectures

    console.print(f"clipleak tiny configs: {', '.join(TINY_ARCHS)}")
    typer.echo("\n".join(list_architectures()))

def share(
    out: Annotated[Path, typer.Option(help="where to write the observation (.safetensors + .json)")],
    arch: Annotated[str, typer.Option(help="open_clip architecture")] = "tiny-32",
    weights: Annotated[str | None, typer.Option(
        help="weights: a file (.safetensors, .pt/.pth/.bin state dict, open_clip training checkpoint), an "
             "artifact name (tiny-mnist), a pretrained tag open_clip knows for --arch (openai, laion2b_s34b_b79k) or "
             "hf-hub:ORG/NAME (read from the Hugging Face cache; downloaded when online; with HF_HUB_OFFLINE=1 or "
             "the hub unreachable, a missing file is an error naming how to fetch it); none or random (the "
             "default) = random init")] = None,
    init_seed: Annotated[int, typer.Option(help="seed of a random init")] = 0,
    data: Annotated[str, typer.Option(
        help="mnist | digits | sklearn-photos | skimage-photos | folder:PATH")] = "mnist",
    split_seed: Annotated[int, typer.Option(help="seed of the public/validation/private split")] = 0,
    method: Annotated[str, typer.Option(help="coop | adapter | full-visual | full")] = "coop",
    n_ctx: Annotated[int, typer.Option(help="CoOp context length M")] = 4,
    class_specific: Annotated[bool, typer.Option(help="CoOp: one context per class")] = False,
    classnames: Annotated[str | None, typer.Option(help="comma-separated class names")] = None,
    batch_size: Annotated[int, typer.Option(help="images in the client's batch")] = 1,
    classes: Annotated[str | None, typer.Option(help="draw only from these class indices, e.g. 3,5")] = None,
    distinct_classes: Annotated[bool, typer.Option(
        help="every image of the batch has a different label (one image of each of batch-size classes)")] = False,
    seed: Annotated[int, typer.Option(help="seed of the batch draw (kept in the truth file only)")] = 0,
    include_labels: Annotated[bool, typer.Option(help="the shared message carries the labels")] = False,
    truth_out: Annotated[Path | None, typer.Option(
        help="client-side ground truth file (default: OUT.truth)")] = None,
    dp: Annotated[str | None, typer.Option(
        help="differential privacy: per-example (DP-SGD; coop, adapter) | per-batch (Dp-CLIP)")] = None,
    clip: Annotated[float | None, typer.Option(help="DP: clipping norm C")] = None,
    clipping: Annotated[str, typer.Option(help="DP: flat (global norm) | per-tensor (each tensor to "
                                          "C/sqrt(T))")] = "flat",
    dp_site: Annotated[str, typer.Option(
        help="DP per-example: parameters (DP-SGD on the PEFT gradient) | text-features (coop: clip + noise the "
             "text-feature gradients, one text backward)")] = "parameters",
    noise_multiplier: Annotated[float | None, typer.Option(
        help="DP: noise standard deviation / C (or give --epsilon)")] = None,
    epsilon: Annotated[float | None, typer.Option(
        help="DP: target epsilon; calibrates the noise multiplier (needs --delta, --sample-rate, --steps)")]
    = None,
    delta: Annotated[float | None, typer.Option(help="DP: delta of the budget")] = None,
    sample_rate: Annotated[float | None, typer.Option(
        help="DP: batch size / data set size of the training schedule")] = None,
    steps: Annotated[int | None, typer.Option(help="DP: steps of the training schedule")] = None,
    accountant: Annotated[str, typer.Option(help="DP: rdp | prv")] = "rdp",
    dp_seed: Annotated[int | None, typer.Option(
        help="DP: seed of the noise (kept in the truth file only; default: a fresh secret one)")] = None,
    defense: Annotated[str | None, typer.Option(
        help="update defense applied after any DP: prune:FRACTION (top-k by magnitude) | quantize:BITS "
             "(1 = sign) | quantize:sign | clip:C (no noise); recorded in the observation")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Client side: draw a private batch, compute the update it would share, save it.

    The observation holds what the client sends (the gradient, the model and PEFT settings, the data
    split); the batch-draw seed and the drawn indices go to the truth file only.

    With --dp the shared gradient is privatised: per-example clips each image's gradient to C, adds
    Gaussian noise of standard deviation sigma*C to the sum and divides by the batch size; per-batch
    clips the batch gradient to C and adds the noise. Sigma is --noise-multiplier, or calibrated from
    --epsilon over the schedule (--delta, --sample-rate, --steps). The observation records the
    setting and its epsilon under "defense"; the noise seed goes to the truth file. --defense prunes,
    quantises or clips the shared gradient (after DP when both are given) and is recorded there too.

    Example: clipleak share --out runs/obs --weights tiny-mnist --method coop --batch-size 2

    Example: clipleak share --out runs/obs-dp --method adapter --batch-size 8 --dp per-example --clip 1 --epsilon 3 --delta 1e-5 --sample-rate 0.01 --steps 1000
    """  # noqa: E501
    from ..api import make_observation
    from ..devices import resolve_device
    from ..errors import ClipleakError
    from ..peft import PeftConfig
    from ..privacy import DpSetting, parse_defense
    from ..records import tensor_path

    dev = resolve_device(device)
    check_writable(tensor_path(out), folder=False)
    truth_path = tensor_path(truth_out if truth_out is not None else tensor_path(out).with_suffix(".truth"))
    check_writable(truth_path, folder=False, option="--truth-out")
    setting = None
    if dp is None:
        given = [n for n, v in (("--clip", clip), ("--noise-multiplier", noise_multiplier), ("--epsilon", epsilon),
                                ("--delta", delta), ("--sample-rate", sample_rate), ("--steps", steps),
                                ("--dp-seed", dp_seed)) if v is not None]
        if given:
            raise ClipleakError(f"{', '.join(given)}: DP options, used only with --dp per-example|per-batch")
    else:
        if clip is None:
            raise ClipleakError("--dp needs --clip C")
        if noise_multiplier is not None and epsilon is not None:
            raise ClipleakError("give --noise-multiplier or --epsilon, not both")
        setting = DpSetting(mechanism=dp, clip=clip, noise_multiplier=noise_multiplier, epsilon=epsilon,
                            delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant,
                            clipping=clipping, site=dp_site)

    with progress_bar() as cb:
        obs, truth = make_observation(
            arch=arch, weights=weights, init_seed=init_seed, data=data, split_seed=split_seed,
            peft=PeftConfig(method=method, n_ctx=n_ctx, class_specific=class_specific),
            classnames=classnames.split(",") if classnames else None, batch_size=batch_size,
            classes=parse_ints(classes), distinct_classes=distinct_classes, seed=seed,
            include_labels=include_labels, dp=setting, dp_seed=dp_seed,
            progress=cb, defense=parse_defense(defense), device=dev,
        )
    p = obs.save(out)
    tp = truth.save(truth_path)
    console.print(f"observation: [bold]{p}[/] (+ {p.with_suffix('.json').name})")
    defense = obs.meta.get("defense")
    if defense is not None and defense.get("kind") is not None:
        console.print(f"update defense: {defense['applied']}")
    if defense is not None and defense.get("mechanism") is not None:
        eps = f"epsilon {defense['epsilon']:.3g} at delta {defense['delta']:g}" if defense["epsilon"] is not None \
            else "no epsilon (no schedule given)"
        console.print(f"defense: {defense['mechanism']}, C {defense['clip']:g}, noise multiplier "
                      f"{defense['noise_multiplier']:.4g}, {eps}")
    console.print(f"ground truth (client side; never give it to the attacker): {tp}")

def attack(
    observation: Annotated[Path, typer.Argument(help="observation .safetensors (its .json beside it)")],
    out: Annotated[Path, typer.Option(help="reconstruction folder")] = Path("reconstruction"),
    name: Annotated[str, typer.Option("--attack", help="gradient matching presets: dlg | idlg | ig | gradvit; "
                                      "featmatch (recover the image features from the update, then decode or "
                                      "match them); full-visual/full ViT read-outs: closed-form | projection. "
                                      "`clipleak attacks` lists each one's source and defaults")] = "ig",
    prior: Annotated[str | None, typer.Option(help="none | tv | generative:VAE (file or name, e.g. "
                                              "generative:tiny-mnist-vae); default: the attack's")] = None,
    decoder: Annotated[str | None, typer.Option(help="featmatch/projection: feature-to-image decoder (file or "
                                                "name, e.g. tiny-mnist-decoder); --iterations 0 returns its "
                                                "output")] = None,
    bn_prior: Annotated[str | None, typer.Option(help="gradvit: prior CNN whose BN statistics are the image "
                                                 "prior (default tiny-mnist-cnn)")] = None,
    start: Annotated[str | None, typer.Option(help="dlg/idlg/ig/gradvit: where the images start: random | "
                                             "prototype (public mean image of the read label) | neighbours "
                                             "(mean of the public images of that label nearest the read "
                                             "feature) | decoder (with --decoder)")] = None,
    weights: Annotated[str | None, typer.Option(
        help="weights file, if not where the observation says (a pretrained tag or hf-hub:ORG/NAME is "
             "recorded in the observation and read from the Hugging Face cache)")] = None,
    iterations: Annotated[int | None, typer.Option(help="optimisation steps per restart")] = None,
    restarts: Annotated[int | None, typer.Option(help="seeded restarts; the best by gradient loss is kept")]
    = None,
    lr: Annotated[float | None, typer.Option(help="step size (Adam, or L-BFGS for dlg/idlg)")] = None,
    tv: Annotated[float | None, typer.Option(help="total-variation weight")] = None,
    labels: Annotated[str, typer.Option(help="auto | known | infer; for mip: auto | known | predicted (read "
                                        "off the gradient) | feature (zero-shot class of the recovered "
                                        "feature)")] = "auto",
    search: Annotated[int | None, typer.Option(help="mip: VAE latent-search steps after decoding (with --prior "
                                               "generative:VAE)")] = None,
    refine: Annotated[int | None, typer.Option(help="mip: gradient-matching steps from the decoded images")]
    = None,
    seed: Annotated[int, typer.Option(help="seed of the restarts")] = 0,
    resume: Annotated[bool, typer.Option(help="keep finished restarts in OUT/checkpoint and resume")] = True,
    device: DeviceOpt = "auto",
) -> None:
    """Attacker side: reconstruct the client's images from an observation.

    Settings left out keep the attack's defaults (each preset's come from its paper; see `clipleak attacks`).

    Example: clipleak attack runs/obs.safetensors --out runs/rec --iterations 300 --restarts 2

    Example: clipleak attack runs/obs.safetensors --attack featmatch --decoder tiny-mnist-decoder --iterations 0 --out runs/rec

    Example: clipleak attack runs/fv.safetensors --attack gradvit --iterations 200 --out runs/rec-gradvit

    Example: clipleak attack runs/fv.safetensors --attack gradvit --start neighbours --lr 0.01 --out runs/rec-gv

    Example: clipleak attack runs/fv.safetensors --attack closed-form --out runs/rec-cf

    Example: clipleak attack runs/obs.safetensors --attack mip --decoder tiny-mnist-decoder --out runs/rec-mip
    """  # noqa: E501
    from dataclasses import fields

    from ..api import attack_observation
    from ..attacks import attack_spec
    from ..devices import resolve_device

    dev = resolve_device(device)
    check_writable(out, folder=True)
    known = {f.name for f in fields(attack_spec(name).config)}
    if name == "mip" and labels == "infer":
        labels = "predicted"
    given = {"iterations": iterations, "restarts": restarts, "lr": lr, "tv_weight": tv, "labels": labels,
             "seed": seed, "prior": prior, "decoder": decoder, "bn_prior": bn_prior, "start": start, "search": search,
             "refine": refine,
             "checkpoint": str(out / "checkpoint") if resume else None}
    settings = {k: v for k, v in given.items() if k in known and (v is not None or k == "checkpoint")}
    for k in sorted(k for k, v in given.items() if v is not None and k not in known
                    and k not in ("checkpoint", "seed", "labels")):
        console.print(f"note: --{k.replace('_weight', '').replace('_', '-')} does not apply to --attack {name}; "
                      "ignored")
    with progress_bar() as cb:
        rec = attack_observation(observation, name=name, weights=weights, progress=cb, device=dev, **settings)
    rec.save(out)
    per_it = rec.meta.get("seconds_per_iteration") or 0.0
    console.print(f"reconstruction: [bold]{out}[/] ({rec.meta['seconds']:.1f} s"
                  + (f", {1000 * per_it:.1f} ms/iteration)" if per_it > 0 else ")"))
    for note in (rec.meta.get("feature_recovery") or {}).get("notes", []):
        console.print(f"note: {note}")


def attacks() -> None:
    """List the registered attacks: each one's source and defaults.

    Example: clipleak attacks
    """
    from ..attacks import ATTACKS

    for spec in ATTACKS.values():
        console.print(f"[bold]{spec.name}[/]: {spec.summary}", highlight=False)

def evaluate(
    reconstruction: Annotated[Path, typer.Argument(help="reconstruction folder from `clipleak attack`")],
    truth: Annotated[Path, typer.Option(help="client-side ground truth file from `clipleak share`")],
    out: Annotated[Path | None, typer.Option(help="report folder (default: the reconstruction folder)")] = None,
    reid_k: Annotated[int, typer.Option(help="re-identification pool size (true image + K-1 of its class)")]
    = 10,
    device: DeviceOpt = "auto",
) -> None:
    """Score a reconstruction against the truth and the honest baselines; write the report.

    The truth must be the one `clipleak share` wrote with the attacked observation: both files record the
    observation's digest, and a truth of another observation is refused. Files made before clipleak recorded
    digests are scored with a note that the pair could not be checked.

    Example: clipleak evaluate runs/rec --truth runs/obs.truth.safetensors
    """
    from ..api import evaluate_reconstruction
    from ..devices import resolve_device

    dev = resolve_device(device)
    check_writable(out or reconstruction, folder=True)
    report, ev = evaluate_reconstruction(reconstruction, truth, out or reconstruction, reid_k=reid_k, device=dev)
    if ev.get("truth_matches_observation") is None:
        console.print("note: the reconstruction or the truth predates observation digests, so nothing checks "
                      "that they belong to the same observation; rerun share and attack to have it checked")
    console.print(ev["verdict"]["text"])
    console.print(f"report: [bold]{report}[/]")

def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("clipleak-demo"),
    weights: Annotated[str, typer.Option(help="target weights: a file, a named artifact (tiny-mnist, built "
                                         "on first use), or 'random' for a random-init contrast")]
    = "tiny-mnist",
    method: Annotated[str, typer.Option(help="coop | adapter | full-visual | full")] = "coop",
    name: Annotated[str, typer.Option("--attack", help="featmatch | ig")] = "featmatch",
    prior: Annotated[str | None, typer.Option(help="none | tv | generative:VAE (default: the VAE on the "
                                              "trained target, tv on a random one)")] = None,
    decoder: Annotated[str | None, typer.Option(help="feature-to-image decoder for featmatch ('' for none)")]
    = "tiny-mnist-decoder",
    batch_size: Annotated[int, typer.Option(help="images in the client's batch")] = 1,
    iterations: Annotated[int | None, typer.Option(
        help="attack steps per restart (default: 0 for featmatch with a decoder, i.e. the decoder's "
             "output; else 150)")] = None,
    restarts: Annotated[int, typer.Option(help="attack restarts")] = 1,
    seed: Annotated[int, typer.Option(help="seed of the batch draw and the attack")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Run share -> attack -> evaluate on the built-in default and print where the report is.

    Default: the tiny CLIP pretrained by clipleak on public MNIST digits (tiny-mnist), a CoOp prompt,
    one private digit; the attacker fits the image feature and the label to the prompt gradient and
    turns the feature into a digit with a decoder trained on the public split (the best prior measured
    on this target; add --iterations 150 to refine it by a VAE latent search). The first run trains
    the target once (about 1.5 minutes on 2 cores; cached; the decoder ships with the package); later runs
    take under a minute.

    Example: clipleak demo --out runs/demo

    Example: clipleak demo --method adapter --out runs/demo-adapter

    Example: clipleak demo --weights random --attack ig --out runs/demo-random
    """
    from ..api import plan_demo, run_demo
    from ..devices import resolve_device

    dev = resolve_device(device)
    check_writable(out, folder=True)
    plan = plan_demo(weights=weights, method=method, attack=name, prior=prior, decoder=decoder,
                     iterations=iterations, restarts=restarts, seed=seed)
    with progress_bar() as cb:
        report, ev, seconds = run_demo(out, plan, batch_size=batch_size, seed=seed, progress=cb,
                                       say=lambda msg: console.print(f"[bold]{msg}[/]"), device=dev)
    console.print(ev["verdict"]["text"])
    reid = ev.get("reidentification") or {}
    if reid.get("attack") is not None:
        nn = f"public nearest neighbour {reid['public-nn']:.0%}, " if reid.get("public-nn") is not None else ""
        console.print(f"re-identification: {reid['attack']:.0%} (class prototype {reid['prototype']:.0%}, "
                      f"{nn}chance {reid['chance']:.0%})")
    console.print(f"done in {seconds:.0f} s. Report: [bold]{report}[/]")


def register(app: typer.Typer) -> None:
    """Add the data-path commands to ``app``."""
    for fn in (models, share, attack, attacks, evaluate, demo):
        command(app)(fn)
