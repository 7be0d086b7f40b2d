"""``clipleak fl run``: a federated run on Flower with an attacking server, and its report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..records import ProgressEvent, ProgressFn
from .common import DeviceOpt, check_writable, command, console, helptext, progress_bar

if TYPE_CHECKING:
    from ..privacy import DpSetting

EventFn = Callable[[str, dict[str, Any]], None]


def run(
    out: Annotated[Path, typer.Option(help="run folder (resumable: rerun the same command to continue)")],
    clients: Annotated[int, typer.Option(help="number of clients N (all train every round)")] = 4,
    rounds: Annotated[int, typer.Option(help="FedAvg rounds R")] = 3,
    local_steps: Annotated[int, typer.Option(help="local SGD steps E per round")] = 1,
    batch_size: Annotated[int, typer.Option(help="local batch size B")] = 1,
    lr: Annotated[float, typer.Option(help="local learning rate eta")] = 0.1,
    method: Annotated[str, typer.Option(help="coop | adapter")] = "adapter",
    partition: Annotated[str, typer.Option(help="iid | dirichlet:ALPHA (non-IID by class)")] = "iid",
    client_size: Annotated[int | None, typer.Option(
        help="images each client holds (its shard capped; default: the whole shard)")] = None,
    data_seed: Annotated[int, typer.Option(
        help="the clients' secret seed: which private digits each client holds (the partition and the shard "
             "cap), the order of its local batches and its DP noise; recorded in the report's metrics.json "
             "(client_data)")] = 0,
    dp: Annotated[str | None, typer.Option(help="DP on every local step: per-example (DP-SGD) | per-batch")] = None,
    clip: Annotated[float | None, typer.Option(help="DP: clipping norm C")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="DP: noise standard deviation / C")] = None,
    delta: Annotated[float, typer.Option(help="DP: delta for the epsilon spent so far")] = 1e-5,
    defense: Annotated[str | None, typer.Option(
        help="an update defense every client applies to its round's update (after DP): prune:FRACTION, "
             "quantize:BITS (1 = sign), clip:NORM")] = None,
    attack: Annotated[str, typer.Option(help="the server's attack on each update: featmatch | ig | none")]
    = "featmatch",
    decoder: Annotated[str | None, typer.Option(
        help="featmatch: feature-to-image decoder: auto (tiny-mnist-decoder for tiny-mnist on mnist, else one "
             "trained on the public split for these weights within --decoder-seconds and cached), a file or a "
             "registered name; '' for none")] = "auto",
    decoder_seconds: Annotated[float, typer.Option(
        help="--decoder auto: training time budget of a decoder that is not cached yet")] = 300.0,
    iterations: Annotated[int, typer.Option(help="attack iterations (featmatch with a decoder: 0 = its "
                                            "output)")] = 0,
    attack_clients: Annotated[int | None, typer.Option(help="attack this many updates per round (a seeded "
                                                       "sample; default all)")] = None,
    weights: Annotated[str, typer.Option(help="the frozen CLIP: weights file or artifact name")] = "tiny-mnist",
    data_name: Annotated[str, typer.Option(
        "--data", help="the clients' images: mnist, digits, sklearn-photos, skimage-photos or folder:PATH (class "
                       "names from the sub-folders); clients hold its PRIVATE split, the server evaluates on its "
                       "validation split")]
    = "mnist",
    split_seed: Annotated[int, typer.Option(help="seed of the public / validation / private split")] = 0,
    engine: Annotated[str, typer.Option(help="simulation (Flower + Ray) | inprocess (same apps, no Ray)")]
    = "simulation",
    parallel: Annotated[int, typer.Option(help="simulation: clients trained at once (1 CPU each)")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads of the server (attacks)")] = 1,
    truth_dir: Annotated[Path | None, typer.Option(
        help="the clients' own folder for their truth (default OUT/clients); the server never reads it")] = None,
    seed: Annotated[int, typer.Option(help="the server's seed (which updates to attack)")] = 0,
    strategy: Annotated[str, typer.Option(help="the Flower strategy the server aggregates with (default "
                                          "settings): fedavg | fedavgm | fedadam | fedyogi | fedadagrad | "
                                          "fedmedian | fedtrimmedavg | krum")] = "fedavg",
    secagg: Annotated[bool, typer.Option(
        "--secagg", help="secure aggregation: every round runs through Flower's SecAgg+ workflow and client mod; "
                         "the server reads only the aggregate and attacks it as one batch of all clients' images "
                         "(needs 2+ clients and --strategy fedavg)")] = False,
    secagg_shares: Annotated[float, typer.Option(
        help="SecAgg+: shares per client secret (a whole number > 2, or a fraction <= 1 of the round's clients)")]
    = 1.0,
    secagg_threshold: Annotated[float, typer.Option(
        help="SecAgg+: shares needed to rebuild a secret (a whole number, or a fraction <= 1 of the shares)")] = 0.5,
    secagg_clip: Annotated[float, typer.Option(help="SecAgg+: clipping range of the quantised values")] = 8.0,
    secagg_quantization: Annotated[int, typer.Option(
        help="SecAgg+: quantisation levels over [-clip, clip] (clients x levels must stay below 2**32)")] = 2**24,
    secagg_max_weight: Annotated[float | None, typer.Option(
        help="SecAgg+: the weight num_examples is divided by, at least the largest shard (default: --client-size "
             "when given, else 1024; a power of two keeps the FedAvg weights exact)")] = None,
    malicious: Annotated[int, typer.Option(
        help="a MALICIOUS server with this many groups of crafted weights (0: honest-but-curious): every round "
             "it sends CLIP-Adapter weights crafted from the public split (same width as the task) so that each "
             "client update gives back its batch's image features, reads them off and decodes them with "
             "--decoder (needs --method adapter; docs/threat-models.md)")] = 0,
    malicious_seed: Annotated[int, typer.Option(help="seed of the crafted weights' random directions")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Federated fine-tuning of a CLIP PEFT module on Flower, with an attacking FedAvg server that records
    every client update and attacks it (honest-but-curious; under --secagg it sees only the aggregate; with
    --malicious it crafts the weights it sends).

    Each client holds a shard of the private split (IID or Dirichlet by class), runs E local SGD steps at
    batch B and learning rate eta (optionally with DP on each step) and sends its new PEFT state. The server
    aggregates exactly as FedAvg, records each update (E, B, eta, the round's global state, the defense) and
    attacks it. The clients write which images they used to their own folder; after the last round the
    evaluator pairs them with the reconstructions and writes OUT/report/report.html: the global accuracy on
    the validation split per round and, per attacked update, truth, reconstruction, class prototype and
    public nearest neighbour with re-identification, every rate with its 95% interval over the attacked
    images. A finished round is never recomputed; resuming with other client settings (another --data-seed)
    is refused.

    Example: clipleak fl run --clients 4 --rounds 3 --local-steps 1 --batch-size 1 --method adapter --partition iid --attack featmatch --out runs/fl

    Example: clipleak fl run --clients 2 --rounds 2 --local-steps 5 --method coop --partition dirichlet:0.5 --dp per-example --clip 1 --noise-multiplier 1 --out runs/fl-dp

    Example: clipleak fl run --clients 4 --rounds 1 --batch-size 2 --client-size 2 --method adapter --secagg --out runs/fl-secagg

    Example: clipleak fl run --clients 2 --rounds 1 --batch-size 16 --client-size 16 --method adapter --malicious 1 --out runs/fl-malicious

    Example: clipleak fl run --clients 2 --rounds 1 --method adapter --defense prune:0.01 --out runs/fl-pruned
    """  # noqa: E501
    from ..attacks import make_config
    from ..data import DataSpec
    from ..devices import resolve_device
    from ..fl import ClientData, Recipe, RunSpec
    from ..fl.run import evaluate_run, run_federated
    from ..peft import PeftConfig

    dev = resolve_device(device)  # the clients' device
    check_writable(out, folder=True)
    recipe = Recipe(peft=PeftConfig(method=method), local_steps=local_steps, batch_size=batch_size, lr=lr,
                    dp=_dp_config(dp, clip, noise_multiplier, delta), defense=defense,
                    weights=None if weights == "random" else weights)
    settings: dict[str, Any] = {"iterations": iterations}
    found = _check_target(recipe.weights, recipe.arch, data_name, split_seed,
                          decoder if attack == "featmatch" else None, decoder_seconds)
    if found:
        settings["decoder"] = found
    if attack != "none":
        make_config(attack, **settings)  # an unknown attack or setting is refused before round 1
    images = DataSpec.parse(data_name, split_seed=split_seed)  # a folder is recorded by its absolute path
    spec = RunSpec(out=str(out), clients=clients, rounds=rounds, recipe=recipe, data=images.name,
                   split_seed=split_seed,
                   attack=None if attack == "none" else attack, attack_settings=settings,
                   attack_clients=attack_clients, seed=seed, threads=threads, strategy=strategy,
                   secagg=secagg_config(secagg, secagg_shares, secagg_threshold, secagg_clip, secagg_quantization,
                                         secagg_max_weight, client_size),
                   malicious={"groups": malicious, "seed": malicious_seed} if malicious else None)
    tdir = truth_dir if truth_dir is not None else out / "clients"
    data = ClientData(weights=recipe.weights, data=images.name, split_seed=split_seed, partition=partition,
                      client_size=client_size, seed=data_seed,
                      truth_dir=str(tdir.resolve()), device=str(dev))
    with progress_bar() as cb:
        state = run_federated(spec, data, engine=engine, parallel=parallel, on_event=_round_events(cb, rounds))
    _print_outcome(state, evaluate_run(out, tdir), out)


def _check_target(weights: str | None, arch: str, data_name: str, split_seed: int, decoder: str | None,
                  seconds: float) -> str | None:
    """Before round 1: the target must not have been trained on another split of the clients' data (its card
    says), and the attack's decoder must fit the target and the data (``auto``: the shipped one or one trained
    on the public split, :func:`clipleak.audit.decoder.choose_decoder`). Returns what the run records as its
    decoder: a registered artifact by its name (as runs started before ``auto`` existed recorded it, so they
    still resume), any other file by its path."""
    from .. import artifacts
    from ..audit.decoder import choose_decoder
    from ..data import DataSpec, check_same_split, load_public
    from ..models import build_model, read_card

    with progress_bar() as cb:
        path = artifacts.resolve_path(weights, cb)
        spec = DataSpec.parse(data_name, split_seed=split_seed)
        if path is not None:
            check_same_split(spec, read_card(path), f"the target {Path(path).name}")
        if not decoder:
            return None
        clip = build_model(arch, path)
        found = choose_decoder(decoder, clip=clip, weights=weights, path=path, spec=spec, same_as=spec,
                               public=load_public(spec, clip.image_size), seconds=seconds, progress=cb)
    registered = {str(artifacts.path_of(name)): name for name in artifacts.names()}
    return registered.get(found, found)


def _whole(x: float) -> int | float:
    """A whole number above 1 as an int (SecAgg+ reads an int as a count and a float as a fraction)."""
    return int(x) if float(x).is_integer() and x > 1 else float(x)


def secagg_config(on: bool, shares: float, threshold: float, clip: float, levels: int, max_weight: float | None,
                   client_size: int | None) -> dict[str, Any] | None:
    """The run's SecAgg+ settings (None without ``--secagg``)."""
    if not on:
        return None
    weight = max_weight if max_weight is not None else float(client_size) if client_size else 1024.0
    return {"num_shares": _whole(shares), "reconstruction_threshold": _whole(threshold), "clipping_range": clip,
            "quantization_range": levels, "max_weight": weight}


def _dp_config(dp: str | None, clip: float | None, noise_multiplier: float | None,
               delta: float) -> DpSetting | None:
    """The recipe's DP setting from the DP options (None without ``--dp``); a half-given setting is an error."""
    from ..errors import ClipleakError

    if dp is None:
        if clip is not None or noise_multiplier is not None:
            raise ClipleakError("--clip and --noise-multiplier are DP options: use them with --dp")
        return None
    if clip is None or noise_multiplier is None:
        raise ClipleakError("--dp needs --clip and --noise-multiplier")
    from ..privacy import DpSetting

    return DpSetting(dp, clip=clip, noise_multiplier=noise_multiplier, delta=delta, awaiting_schedule=True)


def _round_events(cb: ProgressFn, rounds: int) -> EventFn:
    """The run's events (start or resume, each attack, each finished round) as progress-bar updates."""

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "start":
            cb(ProgressEvent("fl rounds", int(info["done"]), rounds,
                             note=f"resuming after round {info['done']}" if info["done"] else "starting"))
        elif kind == "attack":
            cb(ProgressEvent("fl rounds", int(info["round"]) - 1, rounds,
                             note=f"round {info['round']}: attacking update {info['index'] + 1}/{info['total']}"))
        elif kind == "round" and int(info["round"]) > 0:
            eps = info.get("epsilon_so_far")
            cb(ProgressEvent("fl rounds", int(info["round"]), rounds,
                             note=f"round {info['round']}: accuracy {info['accuracy']:.1%}"
                             + (f", epsilon {eps:.3g}" if eps is not None else "")))

    return on_event


def _print_outcome(state: dict[str, Any], metrics: dict[str, Any], out: Path) -> None:
    """The global accuracy per round, the leakage per round and over the run (with 95% intervals over the
    attacked images), and where the report is."""
    from ..report.page import interval_text

    per_round = ", ".join(f"round {r} {state['rounds'][r]['accuracy']:.1%}" for r in sorted(state["rounds"], key=int))
    console.print(f"global accuracy (validation split): start {state.get('initial_accuracy', float('nan')):.1%}, "
                  f"{per_round}")
    for r, s in sorted(metrics["by_round"].items(), key=lambda t: int(t[0])):
        if s["scored"]:
            console.print(f"round {r}: {s['scored']} update(s), {s['images']} image(s): re-identification "
                          f"{interval_text(s['reid_interval']['attack'])}")
    s = metrics["summary"]
    if s["scored"]:
        where = "at chance" if s["at_chance"] else "above chance"
        reid, psnr = s["reid_interval"], s["psnr_interval"]
        console.print(f"attacked updates: {s['scored']}; re-identification {interval_text(reid['attack'])} ({where} "
                      f"by its 95% interval; public NN {interval_text(reid['public-nn'])}, prototype "
                      f"{interval_text(reid['prototype'])}; chance {s['chance']:.0%}), PSNR "
                      f"{interval_text(psnr['attack'], 'db')} (prototype {s['psnr']['prototype']:.1f} dB)")
    console.print(f"report: [bold]{out / 'report' / 'report.html'}[/]")


def register(app: typer.Typer) -> None:
    """Add ``clipleak fl run``."""
    group = typer.Typer(help=helptext("""Federated runs on Flower with an attacking server.

    Example: clipleak fl run --clients 4 --rounds 3 --method adapter --out runs/fl"""), no_args_is_help=True)
    app.add_typer(group, name="fl")
    command(group, "run")(run)
