"""The Flower ClientApp: a client fine-tunes the CLIP's PEFT module on its shard and returns its new state.

Each train message carries the round's global PEFT state (``arrays``) and the recipe (``config``). The
client loads the state, runs E local SGD steps (:func:`clipleak.fl.local.local_update`), and replies with
its new state and ``num-examples`` (its shard size, FedAvg's weight). It writes the truth of the round
(the distinct images it used, in order of first use) to its own truth folder; nothing that identifies the
images goes into the reply.

Client-private settings (:class:`~clipleak.fl.local.ClientData`) come from the ClientApp's own defaults
(``make_client_app(data)``, used by the simulation) overridden by the node config (deployment:
``flower-supernode --node-config "partition-id=0 num-partitions=2 seed=7 truth-dir=..."``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..records import Truth
from ..seeding import derive_seed
from .local import ClientData, client_setup, local_update
from .settings import CONFIG_KEY, ROUND_KEY, Recipe, state_digest

SHARED_KEYS = ("weights", "arch", "data", "split-seed")
"""Run-config entries a client takes from the (server-visible) run config."""


def truth_path(truth_dir: str | Path, node_id: int, rnd: int) -> Path:
    """Where client ``node_id`` keeps the truth of round ``rnd``."""
    return Path(truth_dir) / f"node-{node_id}" / f"round-{rnd:03d}.truth.safetensors"


def _identity(msg: Message, context: Context, defaults: ClientData | None) -> tuple[ClientData, int, int, int]:
    """The client's data settings, partition id, number of partitions and the round of ``msg``."""
    cfg = msg.content.config_records["config"]
    rnd = int(cfg.get(ROUND_KEY, cfg.get("server-round", 1)))  # type: ignore[arg-type]
    node_cfg: dict[str, Any] = dict(context.node_config)
    # the run config (shared with the server) may name the model and the data set; everything private
    # (partition, cap, seed, truth folder) comes from the client's own defaults and node config
    shared = {k: v for k, v in dict(context.run_config).items() if k in SHARED_KEYS}
    # the node config's "device" (else the defaults') says where this client computes
    own = {**defaults.to_dict(), "device": defaults.device} if defaults else {}
    data = ClientData.from_config({**own, **shared, **node_cfg})
    return data, int(node_cfg.get("partition-id", 0)), int(node_cfg.get("num-partitions", 1)), rnd


def round_seed(msg: Message, context: Context, defaults: ClientData | None, purpose: str) -> int:
    """A seed for one private draw of this client in the round of ``msg`` (from the client's own seed)."""
    data, pid, _, rnd = _identity(msg, context, defaults)
    return derive_seed(data.seed, purpose, pid, rnd)


def client_train(msg: Message, context: Context, defaults: ClientData | None = None) -> Message:
    """One round of local training (the body of the ClientApp's ``train``)."""
    cfg = msg.content.config_records["config"]
    recipe = Recipe.from_json(str(cfg[CONFIG_KEY]))
    data, pid, nparts, rnd = _identity(msg, context, defaults)
    node_cfg: dict[str, Any] = dict(context.node_config)
    torch.set_num_threads(int(node_cfg.get("threads", 1)))
    peft = recipe.peft.to_dict()
    victim, private, shard, _facts = client_setup(data, peft, pid, nparts)
    global_state = {k: v.detach().clone() for k, v in msg.content.array_records["arrays"].to_torch_state_dict().items()}
    victim.load_peft_state(global_state)
    images, labels = private.images.index_select(0, shard), private.labels.index_select(0, shard)
    res = local_update(victim, images, labels, local_steps=recipe.local_steps, batch_size=recipe.batch_size,
                       lr=recipe.lr, seed=derive_seed(data.seed, "batches", pid, rnd),
                       dp=recipe.setting(), dp_seed=derive_seed(data.seed, "dp-noise", pid, rnd),
                       defense=recipe.update_defense())
    victim.load_peft_state(global_state)  # the cached victim goes back to a neutral state
    if data.truth_dir:
        used = res.used()
        idx = shard.index_select(0, used)
        Truth(images=private.images.index_select(0, idx), labels=private.labels.index_select(0, idx),
              meta={"private_indices": idx.tolist(), "round": rnd, "node_id": int(context.node_id),
                    "partition_id": pid, "part": data.part, "shard_size": int(shard.numel()),
                    "steps": [s.tolist() for s in res.steps], "data": _facts,
                    "reply_sha256": state_digest(res.state)}).save(
            truth_path(data.truth_dir, int(context.node_id), rnd))
    content = RecordDict({"arrays": ArrayRecord(res.state),
                          "metrics": MetricRecord({"num-examples": int(shard.numel()), "train-loss": res.loss})})
    return Message(content, reply_to=msg)


def make_client_app(defaults: ClientData | None = None) -> ClientApp:
    """A ClientApp whose clients use ``defaults`` (node config entries override them)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, defaults)

    return app


client_app = make_client_app()
"""The deployment ClientApp (``clipleak.fl.client_app:client_app``): settings from the node config."""
