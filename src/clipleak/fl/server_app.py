"""The Flower ServerApp: FedAvg rounds with the attacking strategy, resumable round by round.

``OUT/run.json`` holds the run's settings, ``OUT/state.json`` the finished rounds (global accuracy on the
validation split, who was attacked, epsilon so far, seconds) and ``OUT/rounds/round-RRR/`` each round's
updates, reconstructions and the aggregated global state (``global.safetensors``). With secure aggregation
(``RunSpec.secagg``) the rounds run through Flower's SecAgg+ workflow (:mod:`clipleak.fl.secagg`):
``state.json`` records ``secure_aggregation`` (its settings), and a round holds no per-client update, only
``aggregate.safetensors`` (the aggregate seen as one update) and its reconstruction (``attacks/aggregate``).
A round counts as finished once its global state and its entry in ``state.json`` are written; a rerun with
the same settings starts after the last finished round (a finished round is never recomputed) and refuses
different settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from safetensors.torch import load_file, save_file

from .. import artifacts
from ..attacks import make_config, run_attack
from ..data import DataSpec, load_public, load_validation
from ..errors import ClipleakError
from ..models import build_model
from ..peft import Victim, build_victim, rebuild_victim
from ..records import Observation, Reconstruction, gradient_view, write_text_atomic
from .settings import CONFIG_KEY, Recipe
from .strategy import STRATEGIES, AttackFn, AttackingStrategy, make_strategy

EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class RunSpec:
    """The server's settings of a federated run (all public: the server chose them)."""

    out: str
    clients: int = 4
    rounds: int = 3
    recipe: Recipe = field(default_factory=Recipe)
    data: str = "mnist"
    split_seed: int = 0
    attack: str | None = "featmatch"
    attack_settings: dict[str, Any] = field(default_factory=lambda: {"decoder": "tiny-mnist-decoder",
                                                                     "iterations": 0})
    attack_clients: int | None = None
    seed: int = 0
    threads: int = 1
    strategy: str = "fedavg"
    secagg: dict[str, Any] | None = None
    malicious: dict[str, Any] | None = None  # {"groups": G, "seed": S}: a malicious server (fl.malicious)

    def __post_init__(self) -> None:
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        if self.clients < 1 or self.rounds < 1:
            raise ClipleakError("need at least one client and one round")
        if self.attack_clients is not None and self.attack_clients < 0:
            raise ClipleakError("attack_clients must be >= 0")
        if self.strategy not in STRATEGIES:
            raise ClipleakError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.secagg is not None:
            from .secagg import SecAggSettings

            if self.strategy != "fedavg":
                raise ClipleakError(f"secure aggregation (SecAgg+) computes FedAvg's weighted mean; strategy "
                                    f"{self.strategy!r} needs the individual updates")
            self.secagg = SecAggSettings(**self.secagg).to_dict()
            SecAggSettings(**self.secagg).check_clients(self.clients)
        if self.malicious is not None:
            groups = int(self.malicious.get("groups", 1))
            if self.recipe.peft.method != "adapter":
                raise ClipleakError("the malicious server crafts CLIP-Adapter weights: use --method adapter")
            if self.secagg is not None:
                raise ClipleakError("--malicious reads each client's update; under --secagg the server has none")
            if groups < 1:
                raise ClipleakError(f"--malicious takes the number of weight groups (>= 1), got {groups}")
            self.malicious = {"groups": groups, "seed": int(self.malicious.get("seed", 0))}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recipe": self.recipe.to_dict()}

    def same_run(self, other: dict[str, Any]) -> bool:
        """Whether ``other`` (a saved spec) describes the same run; the number of rounds may grow."""
        a, b = self.to_dict(), dict(other)
        if isinstance(b.get("recipe"), dict):  # a run saved before the recipe was composed: its flat form
            try:
                b["recipe"] = Recipe.from_dict(b["recipe"]).to_dict()
            except (ClipleakError, TypeError, ValueError):
                return False
        b.setdefault("strategy", "fedavg")  # runs saved before the strategy was a setting
        b.setdefault("secagg", None)  # runs saved before secure aggregation was a setting
        b.setdefault("malicious", None)  # runs saved before the malicious server was a setting
        for d in (a, b):
            d.pop("rounds", None)
            d.pop("threads", None)
        return json.loads(json.dumps(a)) == b

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> RunSpec:
        """From a Flower run config (deployment: ``[tool.flwr.app.config]`` / ``flwr run --run-config``)."""
        recipe = Recipe.from_dict({"method": str(cfg.get("method", "adapter")),
                                   "local_steps": int(cfg.get("local-steps", 1)),
                                   "batch_size": int(cfg.get("batch-size", 1)), "lr": float(cfg.get("lr", 0.1)),
                                   "weights": str(cfg.get("weights", "tiny-mnist")) or None,
                                   "dp": json.loads(str(cfg["dp"])) if cfg.get("dp") else None})
        attack = str(cfg.get("attack", "featmatch")) or None
        sample = int(cfg.get("attack-clients", -1))
        return cls(out=str(cfg.get("out", "runs/fl")), clients=int(cfg.get("clients", 2)),
                   rounds=int(cfg.get("rounds", 1)), recipe=recipe, attack=None if attack == "none" else attack,
                   attack_clients=None if sample < 0 else sample, seed=int(cfg.get("server-seed", 0)),
                   threads=int(cfg.get("threads", 1)), strategy=str(cfg.get("strategy", "fedavg")))


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def global_path(out: str | Path, rnd: int) -> Path:
    return Path(out) / "rounds" / f"round-{rnd:03d}" / "global.safetensors"


def load_state(out: str | Path) -> dict[str, Any]:
    p = Path(out) / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {"rounds": {}}


def finished_rounds(state: dict[str, Any]) -> int:
    """Rounds 1..k all finished: k."""
    k = 0
    while str(k + 1) in state["rounds"]:
        k += 1
    return k


class Server:
    """The server side of a run: the global model, its validation accuracy, the observation's public facts
    and the attack."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        r = spec.recipe
        self.weights = artifacts.resolve_path(r.weights)
        clip = build_model(r.arch, self.weights)
        ds = DataSpec.parse(spec.data, split_seed=spec.split_seed)
        self.validation = load_validation(ds, clip.image_size)
        self.victim: Victim = build_victim(clip, self.validation.classnames, r.peft)
        with torch.no_grad():
            self.val_raw = self.victim.raw_image_features(self.validation.images)
        self.base_meta: dict[str, Any] = {
            "loss": "cross_entropy", "arch": clip.arch, "weights": clip.weights, "weights_sha256": clip.weights_sha256,
            "peft": self.victim.cfg.to_dict(), "classnames": self.victim.classnames, "image_size": clip.image_size,
            "data": {**ds.to_dict(), "grayscale": self.validation.grayscale},
        }
        settings = dict(spec.attack_settings)
        if settings.get("decoder"):
            settings["decoder"] = artifacts.resolve_path(str(settings["decoder"]))
        if str(settings.get("prior", "")).startswith("generative:"):
            settings["prior"] = "generative:" + str(artifacts.resolve_path(str(settings["prior"]).split(":", 1)[1]))
        self.attack_settings = settings

    def accuracy(self, state: dict[str, torch.Tensor]) -> float:
        """Accuracy of the global model (frozen CLIP + PEFT ``state``) on the validation split."""
        self.victim.load_peft_state(state)
        with torch.no_grad():
            pred = self.victim.logits_from_raw(self.val_raw).argmax(-1)
        return float((pred == self.validation.labels).float().mean())

    def malicious_strategy(self, inner: Strategy, common: dict[str, Any]) -> AttackingStrategy:
        """The malicious server's strategy (:mod:`.malicious`): adapter weights crafted from the public split
        (same architecture and width as the task) sent every round, each reply read by the imprint read-out and
        decoded with the run's decoder (``attack_settings["decoder"]``; none: features only, blank images)."""
        from ..priors import FeatureDecoder, check_prior, load_prior
        from .malicious import MaliciousServer, MaliciousStrategy

        assert self.spec.malicious is not None
        decoder = None
        if self.attack_settings.get("decoder"):
            prior = load_prior(str(self.attack_settings["decoder"]))
            if not isinstance(prior, FeatureDecoder):
                raise ClipleakError(f"{self.attack_settings['decoder']} is not a feature-to-image decoder")
            check_prior(prior, self.victim.clip_info.image_size, weights_sha256=self.victim.clip_info.weights_sha256,
                        kind="decoder", data=self.base_meta["data"])
            decoder = prior
        ds = DataSpec.parse(self.spec.data, split_seed=self.spec.split_seed)
        public = load_public(ds, self.victim.clip_info.image_size)
        crafted = MaliciousServer.craft(self.victim, public, groups=int(self.spec.malicious["groups"]),
                                        seed=int(self.spec.malicious["seed"]), decoder=decoder)
        return MaliciousStrategy(crafted, self.victim, self.spec.recipe, self.base_meta, inner, **common)

    def attack_fn(self) -> AttackFn | None:
        if self.spec.attack is None:
            return None
        name = self.spec.attack

        def attack(obs: Observation) -> Reconstruction:
            victim = rebuild_victim(gradient_view(obs), self.weights)  # at the round's global state
            return run_attack(name, obs, victim, make_config(name, **self.attack_settings))

        return attack


def server_main(grid: Grid, spec: RunSpec, on_event: EventFn | None = None,
                context: Context | None = None) -> dict[str, Any]:
    """Run the rounds that are not finished yet; returns ``state.json``'s content. ``context``: the
    ServerApp's (secure aggregation builds Flower's legacy context from it; ``None``: a fresh one)."""
    tell = on_event or (lambda _k, _i: None)
    torch.set_num_threads(max(1, spec.threads))
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.is_file():
        saved = json.loads(run_file.read_text())
        if not spec.same_run(saved):
            raise ClipleakError(f"{out} holds a different run (see {run_file}); use another --out")
    _write_json(run_file, spec.to_dict())
    state = load_state(out)
    done = finished_rounds(state)
    tell("start", {"done": done, "rounds": spec.rounds})
    if done >= spec.rounds:
        return state
    server = Server(spec)
    if done == 0:
        initial = server.victim.peft_state()
    else:
        initial = load_file(str(global_path(out, done)))
    inner = make_strategy(spec.strategy, fraction_train=1.0, min_train_nodes=spec.clients,
                          min_available_nodes=spec.clients)
    common: dict[str, Any] = {"out_dir": out, "attack_clients": spec.attack_clients, "round_offset": done,
                              "seed": spec.seed, "on_event": tell}
    strategy: AttackingStrategy
    if spec.malicious is not None:
        strategy = server.malicious_strategy(inner, common)
    else:
        strategy = AttackingStrategy(spec.recipe, server.base_meta, inner, attack=server.attack_fn(), **common)
    if done:
        strategy.restore_inner_state(done)  # e.g. FedAdam's moments, so the resumed run goes on as one run
    t_round = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        rnd = done + server_round
        st = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        acc = server.accuracy(st)
        if server_round == 0:
            if done == 0:
                state["initial_accuracy"] = acc
                _write_json(out / "state.json", state)
            tell("round", {"round": 0, "accuracy": acc})
        else:
            p = global_path(out, rnd)
            p.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in st.items()}, str(p))
            now = time.perf_counter()
            entry = {**strategy.round_info.get(rnd, {}), "accuracy": acc, "seconds": now - t_round[0]}
            t_round[0] = now
            state["rounds"][str(rnd)] = entry
            _write_json(out / "state.json", state)
            tell("round", {"round": rnd, **entry})
        return MetricRecord({"accuracy": acc})

    if spec.secagg is not None:
        from .secagg import SecAggSettings, run_secagg_rounds

        state["secure_aggregation"] = spec.secagg
        _write_json(out / "state.json", state)
        run_secagg_rounds(grid, context, SecAggSettings(**spec.secagg), strategy, initial, spec.clients,
                          spec.rounds - done, spec.recipe.to_json(),
                          lambda rnd, st: float(evaluate_fn(rnd, ArrayRecord(st))["accuracy"]))  # type: ignore[arg-type]
        return state
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=spec.rounds - done,
                   train_config=ConfigRecord({CONFIG_KEY: spec.recipe.to_json()}), evaluate_fn=evaluate_fn)
    return state


def make_server_app(spec: RunSpec | None = None, on_event: EventFn | None = None) -> ServerApp:
    """A ServerApp running ``spec`` (``None``: read it from the run config, as in deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_main(grid, spec if spec is not None else RunSpec.from_run_config(dict(context.run_config)), on_event,
                    context)

    return app


server_app = make_server_app()
"""The deployment ServerApp (``clipleak.fl.server_app:server_app``): settings from the run config."""
