"""Secure aggregation on Flower: the rounds run through Flower's own SecAgg+ protocol, and the attacking
server reads only the aggregate.

Flower ships SecAgg+ for its (legacy) workflow API: the ServerApp runs ``DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))`` on a ``LegacyContext`` with a legacy ``Strategy``, and every ClientApp carries
``secaggplus_mod``. Each client quantises ``dq_i * state_i`` (``dq_i = n_i / max_weight``, rounded to
``1 / quantization_range``; values clipped to ``[-clipping_range, clipping_range]``, stochastic rounding),
adds pairwise and private masks and uploads the masked integers; the server unmasks only their sum, divides
by ``sum_i dq_i`` and hands that one vector to the strategy in place of every client's parameters. So
:class:`SecAggFedAvg` (Flower's FedAvg) sees, per client, only the node id and ``num_examples``, and
aggregates identical copies of the aggregate; it keeps the round's global state, records the aggregate as
one ``update`` observation (:meth:`~clipleak.fl.strategy.AttackingStrategy.observe_aggregate`) and attacks
it as one batch of all the clients' images. No per-client update exists on the server.

* :class:`SecAggSettings` -- the protocol's numbers, with :meth:`~SecAggSettings.tolerance`, the bound on
  ``|SecAgg+ aggregate - plain FedAvg|`` that its quantisation allows;
* :func:`secagg_client_app` -- the ClientApp with ``secaggplus_mod`` (the same local training as
  :func:`clipleak.fl.client_app.client_train`, its messages translated to and from the legacy records);
* :func:`run_secagg_rounds` -- the server side, called by :func:`clipleak.fl.server_app.server_main`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from ..errors import ClipleakError
from .settings import CONFIG_KEY, ROUND_KEY
from .strategy import AttackingStrategy

if TYPE_CHECKING:
    from .local import ClientData

NAMES_KEY = "clipleak-names"
"""The fit-config entry naming the PEFT tensors (legacy parameters are an unnamed list, in this order)."""


@dataclass
class SecAggSettings:
    """SecAgg+'s numbers (``flwr.server.workflow.SecAggPlusWorkflow``).

    ``num_shares``: an int > 2, the shares each client's secrets are split into, or a float in (0, 1], that
    fraction of the round's clients (1.0: every client). ``reconstruction_threshold``: an int, the shares
    needed to rebuild a secret, or a float, that fraction of ``num_shares`` (at least 2). Quantisation:
    each client's ``dq_i * state_i`` is clipped to ``[-clipping_range, clipping_range]`` and rounded
    stochastically to ``quantization_range`` levels over that interval; the sum of all clients' integers
    must stay below ``modulus_range`` (a power of two, at most 2**32), so ``clients * quantization_range <
    modulus_range``. ``max_weight``: the weight ``num_examples`` is divided by (a client with more examples
    risks clipping); a power of two keeps the FedAvg weights exact, and the smaller it is (but at least the
    largest shard) the finer the aggregate (:meth:`tolerance`).
    """

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.5
    clipping_range: float = 8.0
    quantization_range: int = 2**24
    modulus_range: int = 2**32
    max_weight: float = 1024.0

    def __post_init__(self) -> None:
        self.clipping_range = float(self.clipping_range)
        self.max_weight = float(self.max_weight)
        if not self.clipping_range > 0:
            raise ClipleakError(f"secagg clipping range must be > 0, got {self.clipping_range}")
        if self.modulus_range > 2**32:
            raise ClipleakError(f"secagg modulus range must be at most 2**32, got {self.modulus_range}")
        try:
            self.workflow()
        except (TypeError, ValueError) as e:
            raise ClipleakError(f"secagg settings: {e}") from e

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ fit workflow with these numbers."""
        return SecAggPlusWorkflow(num_shares=self.num_shares, reconstruction_threshold=self.reconstruction_threshold,
                                  max_weight=self.max_weight, clipping_range=self.clipping_range,
                                  quantization_range=self.quantization_range, modulus_range=self.modulus_range)

    def check_clients(self, clients: int) -> None:
        """SecAgg+ needs at least two clients, and their summed integers must not wrap the modulus."""
        if clients < 2:
            raise ClipleakError("secure aggregation needs at least 2 clients (SecAgg+ sums over several)")
        if clients * self.quantization_range >= self.modulus_range:
            raise ClipleakError(f"secagg: {clients} clients x quantization range {self.quantization_range} reach "
                                f"the modulus {self.modulus_range}; lower the quantization range")

    def weights(self, num_examples: list[int]) -> list[float]:
        """The weights SecAgg+ actually applies: ``n / max_weight`` rounded to ``1 / quantization_range``."""
        q = self.quantization_range
        return [round(n / self.max_weight * q) / q for n in num_examples]

    def tolerance(self, num_examples: list[int], max_abs: float) -> float:
        """A bound on ``|SecAgg+ aggregate - plain FedAvg|`` per entry, for clients with ``num_examples``
        whose new states lie within ``[-max_abs, max_abs]`` (and ``dq_i * max_abs`` within the clipping
        range, else clipping breaks the sum).

        Three parts: each client's stochastic rounding is off by less than one level ``2 clipping_range /
        quantization_range``, and the server divides the sum of ``k`` of them by ``sum dq_i``; the weights
        ``dq_i`` are rounded (zero when ``max_weight`` is a power of two no larger than
        ``quantization_range``), which moves the mean by at most ``max_abs * sum |w'_i - w_i|``; the float32
        state the server keeps rounds by ``2**-23`` relative (counted twice for margin)."""
        dq = self.weights(num_examples)
        if min(dq) <= 0:
            raise ClipleakError(f"secagg: a client with {min(num_examples)} examples gets weight 0 at max weight "
                                f"{self.max_weight}")
        total, n = sum(dq), sum(num_examples)
        step = 2 * self.clipping_range / self.quantization_range
        rounding = len(num_examples) * step / total
        weights = max_abs * sum(abs(d / total - k / n) for d, k in zip(dq, num_examples, strict=True))
        return rounding + weights + 2 * max_abs * 2.0**-23

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def legacy_train(msg: Message, context: Context, defaults: ClientData | None = None) -> Message:
    """A legacy ``FitIns`` message (what the SecAgg+ workflow sends) through :func:`client_train`; the reply
    as a legacy ``FitRes`` (``secaggplus_mod`` masks its parameters and clears them before it leaves)."""
    from .client_app import client_train, round_seed  # the client side only: the server never imports it

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config: dict[str, Any] = dict(fitins.config)
    names = json.loads(str(config.pop(NAMES_KEY)))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ClipleakError(f"the server sent {len(arrays)} arrays for {len(names)} named PEFT tensors")
    state = {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(names, arrays, strict=True)}
    original = msg.content
    msg.content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
    try:
        reply = client_train(msg, context, defaults)
        # secaggplus_mod quantises the reply next, rounding stochastically with numpy's global generator:
        # seeded from the client's own seed, the round's aggregate (and what the server reads) repeats
        np.random.seed(round_seed(msg, context, defaults, "secagg-rounding") % 2**32)
    finally:
        msg.content = original
    new = reply.content.array_records["arrays"].to_torch_state_dict()
    metrics = reply.content.metric_records["metrics"]
    fitres = FitRes(status=Status(code=Code.OK, message="ok"),
                    parameters=ndarrays_to_parameters([new[k].detach().cpu().numpy() for k in names]),
                    num_examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
                    metrics={"train-loss": float(metrics["train-loss"])})  # type: ignore[arg-type]
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def secagg_client_app(defaults: ClientData | None = None) -> ClientApp:
    """A ClientApp that trains as :func:`clipleak.fl.client_app.make_client_app`'s does, behind Flower's
    ``secaggplus_mod``: its new state leaves only quantised and masked."""
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return legacy_train(msg, context, defaults)

    return app


EvaluateFn = Callable[[int, dict[str, torch.Tensor]], float]


class SecAggFedAvg(FedAvg):
    """Flower's (legacy) FedAvg as the SecAgg+ workflow drives it, with the attacking server watching.

    ``watch`` (an :class:`AttackingStrategy`) keeps each round's global state, records the aggregate
    (:meth:`~AttackingStrategy.observe_aggregate`) and attacks it; ``evaluate(server_round, state)`` returns
    the global model's accuracy (and saves the round). Parameters travel as a list in the order of ``names``.
    """

    def __init__(self, watch: AttackingStrategy, names: list[str], clients: int,
                 initial: dict[str, torch.Tensor], recipe_json: str, evaluate: EvaluateFn) -> None:
        self.watch = watch
        self.names = list(names)
        self.recipe_json = recipe_json
        self.evaluate_state = evaluate
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                         min_evaluate_clients=clients, min_available_clients=clients,
                         initial_parameters=self.to_parameters(initial), on_fit_config_fn=self.fit_config)

    def to_parameters(self, state: dict[str, torch.Tensor]) -> Parameters:
        return ndarrays_to_parameters([state[k].detach().cpu().float().numpy() for k in self.names])

    def to_state(self, parameters: Parameters) -> dict[str, torch.Tensor]:
        arrays = parameters_to_ndarrays(parameters)
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for k, a in zip(self.names, arrays,
                                                                                            strict=True)}

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        return {CONFIG_KEY: self.recipe_json, ROUND_KEY: self.watch.absolute(server_round),
                NAMES_KEY: json.dumps(self.names)}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.watch.global_states[self.watch.absolute(server_round)] = self.to_state(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures:
            raise ClipleakError(f"round {self.watch.absolute(server_round)}: {len(failures)} client(s) failed "
                                f"under secure aggregation: {failures[0]!r}")
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return None, metrics
        state = self.to_state(params)
        counts = {int(proxy.node_id): int(res.num_examples) for proxy, res in results}
        rnd = self.watch.absolute(server_round)
        self.watch.attack_aggregate(rnd, self.watch.observe_aggregate(rnd, state, counts))
        return self.to_parameters(state), metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        acc = self.evaluate_state(server_round, self.to_state(parameters))
        return 0.0, {"accuracy": acc}


def run_secagg_rounds(grid: Grid, context: Context | None, settings: SecAggSettings, watch: AttackingStrategy,
                      initial: dict[str, torch.Tensor], clients: int, rounds: int, recipe_json: str,
                      evaluate: EvaluateFn) -> SecAggFedAvg:
    """``rounds`` FedAvg rounds of ``clients`` clients through ``DefaultWorkflow(fit_workflow=
    SecAggPlusWorkflow(...))`` (``evaluate`` is called with round 0 on ``initial``, then after every round)."""
    settings.check_clients(clients)
    if context is None:  # the in-process grid: a fresh server context
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    if getattr(grid, "run", None) is None and hasattr(grid, "set_run"):
        bare: Any = grid  # Flower's client manager asks the grid's run id: only its id is read
        bare.set_run(SimpleNamespace(run_id=context.run_id))
    strategy = SecAggFedAvg(watch, sorted(initial), clients, initial, recipe_json, evaluate)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=settings.workflow())(grid, legacy)
    return strategy
