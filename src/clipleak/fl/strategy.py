"""The honest-but-curious server: any Flower strategy (FedAvg by default) that records every client update as
an observation and attacks it.

:class:`AttackingStrategy` wraps a Flower ``Strategy`` (``inner``), delegates all of its hooks to it and
changes nothing of what it computes; around two of them it records:

* ``configure_train`` keeps the round's global PEFT state (what every client starts from) and adds the
  absolute round number to the config;
* ``aggregate_train`` turns each reply into an :class:`~clipleak.records.Observation` with
  ``meta["kind"] = "update"``: ``gradients`` holds the update ``client state - global state``,
  ``peft_state`` the global state, and ``meta`` the recipe (E, B, eta), the client's ``num-examples``, the
  round, the node id and the defense (with the epsilon spent so far when the DP setting has a delta).
  Then the wrapped strategy aggregates the same replies, and the configured attack runs on the chosen
  updates (all of them, or a seeded sample per round).

:class:`AttackingFedAvg` is the wrapper around a plain ``FedAvg``; :func:`make_strategy` builds a wrapped
strategy by name (:data:`STRATEGIES`). It never sees the clients' images or seeds: only what Flower delivers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from ..errors import ClipleakError
from ..privacy import epsilon
from ..records import Observation, Reconstruction, distinct_images
from .settings import ROUND_KEY, Recipe, state_digest

AttackFn = Callable[[Observation], Reconstruction]

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
}
"""Flower 1.42 Message-API strategies ``make_strategy`` builds by name, all with their default settings.
They aggregate the clients' replies only; FedProx is left out because its proximal term is the clients'
job and clipleak's ClientApp does not add it (with ``proximal_mu = 0`` it is FedAvg)."""


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """The Flower strategy ``name`` (a key of :data:`STRATEGIES`) with ``kwargs`` (``fraction_train``,
    ``min_train_nodes``, ...) and no client-side evaluation unless ``fraction_evaluate`` is given."""
    if name not in STRATEGIES:
        raise ClipleakError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    kwargs.setdefault("fraction_evaluate", 0.0)
    return STRATEGIES[name](**kwargs)


def update_path(out_dir: str | Path, rnd: int, node_id: int) -> Path:
    return Path(out_dir) / "rounds" / f"round-{rnd:03d}" / "updates" / f"node-{node_id}.safetensors"


def attack_dir(out_dir: str | Path, rnd: int, node_id: int) -> Path:
    return Path(out_dir) / "rounds" / f"round-{rnd:03d}" / "attacks" / f"node-{node_id}"


def aggregate_attack_dir(out_dir: str | Path, rnd: int) -> Path:
    """Where the reconstruction from round ``rnd``'s aggregate is saved (secure aggregation)."""
    return Path(out_dir) / "rounds" / f"round-{rnd:03d}" / "attacks" / "aggregate"


def aggregate_path(out_dir: str | Path, rnd: int) -> Path:
    """Where round ``rnd``'s aggregate observation is saved (secure aggregation)."""
    return Path(out_dir) / "rounds" / f"round-{rnd:03d}" / "aggregate.safetensors"


def strategy_state_path(out_dir: str | Path, rnd: int) -> Path:
    """Where the wrapped strategy's own state after round ``rnd`` is saved."""
    return Path(out_dir) / "rounds" / f"round-{rnd:03d}" / "strategy.safetensors"


def _is_arrays(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, np.ndarray) for v in value)
    return False


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The state a Flower strategy carries from round to round, flattened for saving: every attribute that
    holds a dict or list of numpy arrays (FedAdam / FedYogi / FedAdagrad's moments ``m_t`` / ``v_t``, FedAvgM's
    ``momentum_vector``) except ``current_arrays`` (the global state, which ``configure_train`` sets again).
    Keys: ``ATTR/KEY`` for dicts, ``ATTR#I`` for lists. Strategies without such state give ``{}``."""
    out: dict[str, np.ndarray] = {}
    for name, value in sorted(vars(strategy).items()):
        if name == "current_arrays" or not _is_arrays(value):
            continue
        if isinstance(value, dict):
            out.update({f"{name}/{k}": np.ascontiguousarray(v) for k, v in value.items()})
        else:
            out.update({f"{name}#{i}": np.ascontiguousarray(v) for i, v in enumerate(value)})
    return out


def restore_strategy_state(strategy: Strategy, saved: dict[str, np.ndarray]) -> list[str]:
    """Set the attributes :func:`strategy_state` saved (dtypes kept); returns their names. An attribute the
    strategy does not have is an error (the run was saved with another strategy)."""
    dicts: dict[str, dict[str, np.ndarray]] = {}
    lists: dict[str, dict[int, np.ndarray]] = {}
    for key, v in saved.items():
        if "/" in key:
            name, sub = key.split("/", 1)
            dicts.setdefault(name, {})[sub] = v
        else:
            name, idx = key.rsplit("#", 1)
            lists.setdefault(name, {})[int(idx)] = v
    for name in [*dicts, *lists]:
        if not hasattr(strategy, name):
            raise ClipleakError(f"saved strategy state {name!r} does not belong to {type(strategy).__name__}")
    for name, d in dicts.items():
        setattr(strategy, name, d)
    for name, items in lists.items():
        setattr(strategy, name, [items[i] for i in range(len(items))])
    return sorted([*dicts, *lists])


def epsilon_so_far(defense: dict[str, Any] | None, rounds: int, local_steps: int, batch_size: int,
                   num_examples: int) -> float | None:
    """Epsilon a client has spent after ``rounds`` rounds of ``local_steps`` DP steps each (RDP or PRV as the
    setting says; a fixed batch of ``min(B, n)`` out of ``n`` accounted as Poisson sampling at that rate).
    ``None`` without a defense, a delta or noise."""
    if not defense or defense.get("delta") is None or not defense.get("noise_multiplier"):
        return None
    q = min(batch_size, num_examples) / num_examples
    k = 2.0 if defense["mechanism"] == "per-batch" else 1.0
    return float(epsilon(float(defense["noise_multiplier"]) / k, q, rounds * local_steps, float(defense["delta"]),
                         str(defense.get("accountant") or "rdp")))


def in_content_order(replies: Iterable[Message]) -> list[Message]:
    """The round's replies ordered by the SHA-256 of the state each carries (errors last, node id among equal
    states). Flower samples the nodes with Python's unseeded global generator and, in simulation, numbers them
    at random, so the order replies arrive in changes from run to run; a float sum in another order rounds
    differently, and the aggregate (and every later round) would not repeat bit for bit. The order of the
    contents does not depend on the run."""
    def key(m: Message) -> tuple[bool, str, int]:
        if m.has_error() or "arrays" not in m.content.array_records:  # the checks after say what is wrong
            return True, "", int(m.metadata.src_node_id)
        return False, state_digest(m.content.array_records["arrays"].to_torch_state_dict()), int(m.metadata.src_node_id)

    return sorted(replies, key=key)


class AttackingStrategy(Strategy):
    """A Flower strategy that records each client update of each round as an ``update`` observation and
    attacks it, and otherwise is the strategy it wraps.

    ``configure_train`` / ``aggregate_train`` record around the wrapped strategy's own hooks (it gets the
    same arguments and the same replies, in :func:`in_content_order` so that its float sums repeat, and its
    result is returned unchanged); ``configure_evaluate``, ``aggregate_evaluate`` and ``summary`` are its own.
    ``start`` is Flower's loop over these hooks.

    Args:
        recipe: the round's local training (E, B, eta, method, DP), sent to every client.
        base_meta: the public facts every observation carries (architecture, weights and their hash,
            PEFT config, class names, image size, data split).
        out_dir: where updates and reconstructions are saved (``None``: kept in memory only).
        attack: run on each chosen update (``None``: record only).
        attack_clients: how many updates to attack per round (``None``: all), a seeded sample.
        round_offset: rounds already done (a resumed run), added to Flower's round counter.
        inner: the strategy that configures rounds and aggregates (``None``: ``FedAvg(**fedavg)`` without
            client-side evaluation). It sees the absolute round number (so FedAdam's bias correction goes on
            after a resume), and with ``out_dir`` its own state after each round (:func:`strategy_state`:
            server momentum, Adam moments) is saved beside the round's updates, for
            :meth:`restore_inner_state` to load when the run resumes.
        fedavg: FedAvg's arguments, when ``inner`` is ``None``.
    """

    def __init__(self, recipe: Recipe, base_meta: dict[str, Any], inner: Strategy | None = None, *,
                 out_dir: str | Path | None = None, attack: AttackFn | None = None,
                 attack_clients: int | None = None, round_offset: int = 0, seed: int = 0,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None, **fedavg: Any) -> None:
        if inner is not None and fedavg:
            raise ClipleakError(f"FedAvg arguments {sorted(fedavg)} given with a strategy to wrap")
        self.inner = inner if inner is not None else make_strategy("fedavg", **fedavg)
        self.recipe = recipe
        self.base_meta = dict(base_meta)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.attack = attack
        self.attack_clients = attack_clients
        self.round_offset = int(round_offset)
        self.seed = int(seed)
        self.on_event = on_event or (lambda _kind, _info: None)
        self.global_states: dict[int, dict[str, torch.Tensor]] = {}
        self.observations: dict[int, list[Observation]] = {}
        self.reconstructions: dict[int, dict[int, Reconstruction]] = {}
        self.aggregates: dict[int, Observation] = {}
        self.aggregate_reconstructions: dict[int, Reconstruction] = {}
        self.round_info: dict[int, dict[str, Any]] = {}
        s = recipe.setting()
        self.defense = None if s is None else {**s.record(), "delta": None if recipe.dp is None else recipe.dp.delta,
                                               "per": f"local step ({recipe.local_steps} per round)"}
        self.update_defense = recipe.update_defense()

    def defense_record(self, epsilon_spent: float | None) -> dict[str, Any] | None:
        """What an observation records under ``meta["defense"]``: the DP mechanism with the epsilon spent so
        far, and the update defense every client applied (as :func:`clipleak.client.share` records them);
        ``None`` when the clients apply neither."""
        out: dict[str, Any] = {}
        if self.defense is not None:
            out = {**self.defense, "epsilon_so_far": epsilon_spent}
        if self.update_defense is not None:
            out.update(self.update_defense.record())
        return out or None

    def absolute(self, server_round: int) -> int:
        return self.round_offset + int(server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = self.absolute(server_round)
        self.global_states[rnd] = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        config[ROUND_KEY] = rnd
        return self.inner.configure_train(rnd, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(self.absolute(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(self.absolute(server_round), replies)

    def restore_inner_state(self, rnd: int) -> list[str]:
        """Load the wrapped strategy's state saved after round ``rnd`` (a resumed run); returns the restored
        attribute names (none for a strategy without state, or a run saved before this was kept)."""
        if self.out_dir is None:
            return []
        path = strategy_state_path(self.out_dir, rnd)
        if not path.is_file():
            return []
        return restore_strategy_state(self.inner, load_numpy(str(path)))

    def summary(self) -> None:
        log(INFO, "\t├──> clipleak: recording and attacking every update of %s", type(self.inner).__name__)
        self.inner.summary()

    def observe(self, rnd: int, reply: Message) -> Observation:
        """The ``update`` observation of one client's reply in round ``rnd``."""
        if rnd not in self.global_states:
            raise ClipleakError(f"no global state recorded for round {rnd}")
        start = self.global_states[rnd]
        state = reply.content.array_records["arrays"].to_torch_state_dict()
        if set(state) != set(start):
            raise ClipleakError(f"client reply has parameters {sorted(state)}, expected {sorted(start)}")
        metrics = reply.content.metric_records["metrics"]
        n = int(metrics["num-examples"])  # type: ignore[arg-type]
        r = self.recipe
        update = {k: (state[k].detach().float() - start[k].float()) for k in sorted(start)}
        meta = {**self.base_meta, "kind": "update", "local_steps": r.local_steps, "batch_size": r.batch_size,
                "lr": r.lr, "num_examples": n, "distinct_images": distinct_images(r.local_steps, r.batch_size, n),
                "round": rnd, "node_id": int(reply.metadata.src_node_id), "labels_included": False,
                "param_shapes": {k: list(v.shape) for k, v in update.items()}, "reply_sha256": state_digest(state)}
        defended = self.defense_record(epsilon_so_far(self.defense, rnd, r.local_steps, r.batch_size, n))
        if defended is not None:
            meta["defense"] = defended
        return Observation(gradients=update, meta=meta, peft_state={k: v.clone() for k, v in start.items()})

    def observe_aggregate(self, rnd: int, state: dict[str, torch.Tensor],
                          num_examples: dict[int, int]) -> Observation:
        """The ``update`` observation of round ``rnd``'s aggregate (all a server under secure aggregation
        reads): ``state`` is the FedAvg of the clients' new states, ``num_examples`` each client's weight.

        Seen as one client: ``gradients`` = aggregate - global state, one batch of all the clients'
        images (``batch_size`` the sum of their ``min(B, n)``, ``num_examples`` the sum of their ``n``,
        ``distinct_images`` the sum of theirs). With equal shards (equal FedAvg weights) and E = 1 that is
        exactly ``-eta`` times the mean gradient over the union of the batches; for E > 1, to first order,
        the E-step update of that union. ``meta["secure_aggregation"]`` lists the clients and weights."""
        if rnd not in self.global_states:
            raise ClipleakError(f"no global state recorded for round {rnd}")
        start = self.global_states[rnd]
        if set(state) != set(start):
            raise ClipleakError(f"aggregate has parameters {sorted(state)}, expected {sorted(start)}")
        r = self.recipe
        nodes = sorted(num_examples)
        ns = [int(num_examples[k]) for k in nodes]
        update = {k: (state[k].detach().float() - start[k].float()) for k in sorted(start)}
        meta = {**self.base_meta, "kind": "update", "local_steps": r.local_steps,
                "batch_size": sum(min(r.batch_size, n) for n in ns), "lr": r.lr, "num_examples": sum(ns),
                "distinct_images": sum(distinct_images(r.local_steps, r.batch_size, n) for n in ns),
                "round": rnd, "node_id": None, "labels_included": False,
                "param_shapes": {k: list(v.shape) for k, v in update.items()},
                "secure_aggregation": {"clients": nodes, "num_examples": ns,
                                       "fedavg_weights": [n / sum(ns) for n in ns]}}
        eps = [epsilon_so_far(self.defense, rnd, r.local_steps, r.batch_size, n) for n in ns]
        defended = self.defense_record(max((e for e in eps if e is not None), default=None))
        if defended is not None:
            meta["defense"] = defended
        return Observation(gradients=update, meta=meta, peft_state={k: v.clone() for k, v in start.items()})

    def attack_aggregate(self, rnd: int, obs: Observation) -> None:
        """Record round ``rnd``'s aggregate (saved under ``out_dir``) and attack it as one batch."""
        self.aggregates[rnd] = obs
        if self.out_dir is not None:
            obs.save(aggregate_path(self.out_dir, rnd))
        nodes = list(obs.meta["secure_aggregation"]["clients"])
        info: dict[str, Any] = {"clients": nodes, "attacked": [], "attack_seconds": 0.0, "aggregate_attacked": False,
                                "epsilon_so_far": (obs.meta.get("defense") or {}).get("epsilon_so_far")}
        if self.attack is not None:
            self.on_event("attack", {"round": rnd, "node_id": None, "index": 0, "total": 1})
            t0 = time.perf_counter()
            rec = self.attack(obs)
            rec.meta["attack_seconds"] = time.perf_counter() - t0
            info["attack_seconds"] = rec.meta["attack_seconds"]
            info["aggregate_attacked"] = True
            self.aggregate_reconstructions[rnd] = rec
            if self.out_dir is not None:
                rec.save(aggregate_attack_dir(self.out_dir, rnd))
        self.round_info[rnd] = info

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.absolute(server_round)
        replies = in_content_order(replies)
        valid = [m for m in replies if not m.has_error()]
        obs = [self.observe(rnd, m) for m in valid]
        obs.sort(key=lambda o: int(o.meta["node_id"]))
        self.observations[rnd] = obs
        if self.out_dir is not None:
            for o in obs:
                o.save(update_path(self.out_dir, rnd, int(o.meta["node_id"])))
        # recorded first: some strategies consume the replies (FedMedian pops their arrays)
        arrays, metrics = self.inner.aggregate_train(rnd, replies)
        if self.out_dir is not None:
            saved = strategy_state(self.inner)
            if saved:
                path = strategy_state_path(self.out_dir, rnd)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_numpy(saved, str(path))
        self.reconstructions[rnd] = {}
        chosen = self.choose(rnd, obs)
        info: dict[str, Any] = {"clients": [int(o.meta["node_id"]) for o in obs], "attacked": [],
                                "attack_seconds": 0.0}
        eps = [o.meta["defense"].get("epsilon_so_far") for o in obs if o.meta.get("defense")]
        info["epsilon_so_far"] = max((e for e in eps if e is not None), default=None)
        if self.attack is not None:
            for i, o in enumerate(chosen):
                node = int(o.meta["node_id"])
                self.on_event("attack", {"round": rnd, "node_id": node, "index": i, "total": len(chosen)})
                t0 = time.perf_counter()
                rec = self.attack(o)
                rec.meta["attack_seconds"] = time.perf_counter() - t0
                info["attack_seconds"] += rec.meta["attack_seconds"]
                self.reconstructions[rnd][node] = rec
                info["attacked"].append(node)
                if self.out_dir is not None:
                    rec.save(attack_dir(self.out_dir, rnd, node))
        self.round_info[rnd] = info
        return arrays, metrics

    def choose(self, rnd: int, obs: list[Observation]) -> list[Observation]:
        """The updates to attack this round: all, or a sample of ``attack_clients`` seeded by the round."""
        if self.attack_clients is None or self.attack_clients >= len(obs):
            return list(obs)
        rng = random.Random(f"{self.seed}-{rnd}")
        picked = sorted(rng.sample(range(len(obs)), self.attack_clients))
        return [obs[i] for i in picked]


class AttackingFedAvg(AttackingStrategy):
    """:class:`AttackingStrategy` around ``FedAvg(**fedavg)`` (no client-side evaluation by default)."""

    def __init__(self, recipe: Recipe, base_meta: dict[str, Any], *, out_dir: str | Path | None = None,
                 attack: AttackFn | None = None, attack_clients: int | None = None, round_offset: int = 0,
                 seed: int = 0, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 **fedavg: Any) -> None:
        super().__init__(recipe, base_meta, None, out_dir=out_dir, attack=attack, attack_clients=attack_clients,
                         round_offset=round_offset, seed=seed, on_event=on_event, **fedavg)
