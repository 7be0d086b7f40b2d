"""``clipleak privacy``: the accountant on the command line (epsilon for a schedule, sigma for a budget)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .common import command, helptext

ACCOUNTANT_HELP = "rdp (Renyi DP, an upper bound, fast) | prv (privacy random variables: tighter, seconds)"


def epsilon(
    noise_multiplier: Annotated[float, typer.Option(help="noise standard deviation over the clipping norm C")],
    sample_rate: Annotated[float, typer.Option(help="batch size / data set size, in (0, 1]")],
    steps: Annotated[int, typer.Option(help="number of noisy steps (training iterations)")],
    delta: Annotated[float, typer.Option(help="delta of (epsilon, delta)-DP, in (0, 1)")] = 1e-5,
    accountant: Annotated[str, typer.Option(help=ACCOUNTANT_HELP)] = "rdp",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (epsilon and the inputs)")]
    = False,
) -> None:
    """The epsilon spent by STEPS steps of the Poisson-subsampled Gaussian mechanism (DP-SGD).

    The noise multiplier is the one the accountant sees: for Dp-CLIP's per-batch mechanism, whose
    sensitivity is 2C, pass half the noise multiplier applied.

    Example: clipleak privacy epsilon --noise-multiplier 1.0 --sample-rate 0.01 --steps 1000 --delta 1e-5
    """
    from ..privacy import epsilon as compute

    eps = compute(noise_multiplier, sample_rate, steps, delta, accountant)
    out: dict[str, Any] = {"epsilon": eps, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                           "steps": steps, "delta": delta, "accountant": accountant}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"epsilon = {eps:.4g} at delta {delta:g} ({accountant.upper()}) after {steps} steps, noise "
                   f"multiplier {noise_multiplier:g}, sample rate {sample_rate:g}")


def noise(
    target_epsilon: Annotated[float, typer.Option("--epsilon", help="the privacy budget epsilon")],
    sample_rate: Annotated[float, typer.Option(help="batch size / data set size, in (0, 1]")],
    steps: Annotated[int, typer.Option(help="number of noisy steps (training iterations)")],
    delta: Annotated[float, typer.Option(help="delta of (epsilon, delta)-DP, in (0, 1)")] = 1e-5,
    accountant: Annotated[str, typer.Option(help=ACCOUNTANT_HELP)] = "rdp",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (noise_multiplier, its "
                                          "epsilon and the inputs)")] = False,
) -> None:
    """The smallest noise multiplier whose epsilon over the schedule stays within the budget.

    Calibrated by bisection to within 0.5% below the target epsilon (never above it).

    Example: clipleak privacy noise --epsilon 3 --delta 1e-5 --sample-rate 0.01 --steps 1000
    """
    from ..privacy import epsilon as compute
    from ..privacy import noise_multiplier

    sigma = noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    spent = compute(sigma, sample_rate, steps, delta, accountant)
    out: dict[str, Any] = {"noise_multiplier": sigma, "epsilon": spent, "target_epsilon": target_epsilon,
                           "sample_rate": sample_rate, "steps": steps, "delta": delta, "accountant": accountant}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"noise multiplier = {sigma:.4g} (epsilon {spent:.4g} <= {target_epsilon:g} at delta {delta:g}, "
                   f"{accountant.upper()}, {steps} steps, sample rate {sample_rate:g})")


def register(app: typer.Typer) -> None:
    """Add ``clipleak privacy epsilon|noise``."""
    group = typer.Typer(help=helptext("""Differential-privacy accounting (Opacus's RDP and PRV accountants).

    Example: clipleak privacy epsilon --noise-multiplier 1.0 --sample-rate 0.01 --steps 1000"""),
                        no_args_is_help=True)
    app.add_typer(group, name="privacy")
    command(group, "epsilon")(epsilon)
    command(group, "noise")(noise)
