"""Federated runs on Flower: clients that fine-tune CLIP PEFT modules on shards of the private split, and
an honest-but-curious server (FedAvg, or any wrapped Flower strategy) that records every update as an
observation and attacks it.

* :mod:`.local` -- client side: partitions (IID, Dirichlet), shards, local SGD (the only module here that
  touches private images, through :mod:`clipleak.client`);
* :mod:`.client_app` -- the Flower ClientApp; :mod:`.server_app` -- the ServerApp (resumable per round);
* :mod:`.strategy` -- :class:`AttackingStrategy` (around any Flower strategy), :class:`AttackingFedAvg`;
  :mod:`.run` -- simulation / in-process runs and the evaluator's report.
"""

from .client_app import client_app, make_client_app, truth_path
from .inprocess import InProcessGrid, server_identity
from .local import ClientData, client_shard, local_update, partition_indices, step_positions
from .server_app import RunSpec, make_server_app, server_app, server_main
from .settings import Recipe
from .strategy import STRATEGIES, AttackingFedAvg, AttackingStrategy, epsilon_so_far, make_strategy

__all__ = [
    "STRATEGIES", "AttackingFedAvg", "AttackingStrategy", "ClientData", "InProcessGrid", "Recipe", "RunSpec",
    "client_app", "client_shard", "epsilon_so_far", "local_update", "make_client_app", "make_server_app",
    "make_strategy", "partition_indices", "server_app", "server_identity", "server_main", "step_positions",
    "truth_path",
]
