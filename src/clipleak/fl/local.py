"""The client side of a federated run: its shard of the private split and its local SGD steps.

Everything here may touch private images (it imports :mod:`clipleak.client`); the attacking server
(:mod:`clipleak.fl.strategy`) never calls it. The evaluator reads the truth files the clients write.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .. import artifacts
from ..client import load_private
from ..data import DataSpec, ImageSet
from ..devices import check_device_spec, resolve_device
from ..errors import ClipleakError
from ..models import build_model
from ..peft import PeftConfig, Victim, build_victim
from ..privacy import Defense, DpSetting, apply_defense, privatise
from ..seeding import derive_seed


def parse_partition(text: str) -> tuple[str, float | None]:
    """``"iid"`` -> ``("iid", None)``; ``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)``."""
    if text == "iid":
        return "iid", None
    if text.startswith("dirichlet:"):
        try:
            alpha = float(text.split(":", 1)[1])
        except ValueError as e:
            raise ClipleakError(f"bad partition {text!r}: dirichlet:ALPHA needs a number") from e
        if not alpha > 0:
            raise ClipleakError(f"bad partition {text!r}: ALPHA must be > 0")
        return "dirichlet", alpha
    raise ClipleakError(f"unknown partition {text!r}: iid or dirichlet:ALPHA")


def partition_indices(labels: torch.Tensor, num_clients: int, partition: str, seed: int) -> list[torch.Tensor]:
    """Split ``range(len(labels))`` among ``num_clients`` (seeded). ``iid``: a random permutation cut into
    equal parts. ``dirichlet:ALPHA``: for each class, client shares drawn from Dirichlet(ALPHA) (small
    ALPHA: few classes per client); redrawn until every client holds at least one image."""
    kind, alpha = parse_partition(partition)
    n = int(labels.numel())
    if num_clients < 1 or num_clients > n:
        raise ClipleakError(f"cannot split {n} images among {num_clients} clients")
    if kind == "iid":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        return [c.sort().values for c in perm.tensor_split(num_clients)]
    assert alpha is not None
    rng = np.random.default_rng(int(seed))
    lab = labels.numpy()
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(lab):
            idx = rng.permutation(np.nonzero(lab == c)[0])
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in piece)
        if min(len(p) for p in parts) >= 1:
            return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]
    raise ClipleakError(f"dirichlet:{alpha} left a client without images in 1000 draws; use a larger ALPHA")


@dataclass
class ClientData:
    """What only the clients know: where their images come from and the seeds of every private choice.

    ``client_size`` caps each client's shard (its first images in a seeded order; ``None``: the whole
    shard). ``seed`` drives the partition, the cap, each round's batch order and the DP noise: it never
    travels to the server. ``truth_dir``: where each client writes the truth of every round (the
    evaluator reads it at the end; ``None``: nowhere).
    """

    weights: str | None = "tiny-mnist"
    arch: str = "tiny-32"
    data: str = "mnist"
    split_seed: int = 0
    part: str = "private"
    partition: str = "iid"
    client_size: int | None = None
    seed: int = 0
    truth_dir: str | None = None
    device: str = "auto"
    """Where the client computes (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``): not a fact about its
    data, so :meth:`to_dict` (what a resumed run must share) leaves it out."""

    def __post_init__(self) -> None:
        parse_partition(self.partition)
        if self.client_size is not None and self.client_size < 1:
            raise ClipleakError("client_size must be at least 1")
        check_device_spec(self.device)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("device")
        return d

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ClientData:
        """From a Flower node/run config (``client-size``, ``truth-dir``, ...; ``-`` or ``_``)."""
        known = {f: f for f in cls.__dataclass_fields__}
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            name = k.replace("-", "_")
            if name in known:
                out[name] = v
        if out.get("client_size") in (0, "", None):
            out["client_size"] = None
        if out.get("weights") in ("", "random"):
            out["weights"] = None
        if out.get("truth_dir") == "":
            out["truth_dir"] = None
        for k in ("split_seed", "seed"):
            if k in out:
                out[k] = int(out[k])
        if out.get("client_size") is not None:
            out["client_size"] = int(out["client_size"])
        return cls(**out)


def client_shard(private: ImageSet, data: ClientData, partition_id: int, num_partitions: int) -> torch.Tensor:
    """Indices into ``private`` that client ``partition_id`` holds (the cap applied)."""
    if not 0 <= partition_id < num_partitions:
        raise ClipleakError(f"partition id {partition_id} out of range for {num_partitions} partitions")
    parts = partition_indices(private.labels, num_partitions, data.partition, derive_seed(data.seed, "partition"))
    shard = parts[partition_id]
    if data.client_size is not None and data.client_size < shard.numel():
        g = torch.Generator().manual_seed(derive_seed(data.seed, "cap", partition_id))
        shard = shard[torch.randperm(shard.numel(), generator=g)[: data.client_size]]
    return shard


def step_positions(n: int, local_steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Positions (into the client's ``n`` images) of each local step's batch: a fresh permutation walked
    without replacement, ``min(B, n)`` per step, wrapping at the end."""
    b = min(int(batch_size), n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return [perm[torch.arange(t * b, (t + 1) * b) % n] for t in range(int(local_steps))]


@dataclass
class LocalResult:
    """A client's new PEFT state after its local steps, the positions each step used, and its mean loss."""

    state: dict[str, torch.Tensor]
    steps: list[torch.Tensor]
    loss: float

    def used(self) -> torch.Tensor:
        """Distinct positions used, in order of first use."""
        seen: dict[int, None] = {}
        for s in self.steps:
            for i in s.tolist():
                seen.setdefault(int(i), None)
        return torch.tensor(list(seen), dtype=torch.long)


def local_update(victim: Victim, images: torch.Tensor, labels: torch.Tensor, *, local_steps: int, batch_size: int,
                 lr: float, seed: int, dp: DpSetting | None = None, dp_seed: int | None = None,
                 defense: Defense | None = None) -> LocalResult:
    """E steps of plain SGD (``p <- p - eta g``) on the victim's PEFT parameters, from their current values.

    ``g`` is the victim's mean cross-entropy gradient on the step's batch (what ``client.share`` sends), or
    with ``dp`` the DP mechanism's noisy one (:func:`clipleak.privacy.privatise`, noise seeded per step from
    ``dp_seed``, else from ``seed``). With ``defense`` (:class:`~clipleak.privacy.Defense`) the round's
    update -- the new state minus the one received, what the client shares -- is pruned, quantised or clipped
    after the steps (after DP) and the victim is set to the received state plus the defended update. The
    victim is left at the new state.
    """
    if local_steps < 1 or batch_size < 1 or not lr > 0:
        raise ClipleakError(f"local steps {local_steps}, batch size {batch_size}, lr {lr}: all must be positive")
    n = int(images.shape[0])
    if n < 1:
        raise ClipleakError("the client holds no images")
    setting = dp.resolve() if dp is not None else None
    steps = step_positions(n, local_steps, batch_size, seed)
    params = victim.trainable()
    start = {name: p.detach().clone() for name, p in params.items()} if defense is not None else None
    losses = []
    for t, pos in enumerate(steps):
        # the batch goes where the victim is (the DP noise is then drawn there too)
        x, y = images.index_select(0, pos).to(victim.device), labels.index_select(0, pos).to(victim.device)
        if setting is None:  # the same operations as Victim.gradient (what client.share sends), loss kept
            loss = victim.loss(x, y)
            grads = torch.autograd.grad(loss, list(params.values()))
            g = {name: gr.detach() for name, gr in zip(params, grads, strict=True)}
            losses.append(float(loss.detach()))
        else:
            with torch.no_grad():
                losses.append(float(victim.loss(x, y)))
            g = privatise(victim, x, y, setting, derive_seed(seed if dp_seed is None else dp_seed, "dp", t))
        with torch.no_grad():
            for name, p in params.items():
                p.sub_(lr * g[name])
    if defense is not None:
        assert start is not None
        with torch.no_grad():
            update = apply_defense({name: p.detach() - start[name] for name, p in params.items()}, defense)
            for name, p in params.items():
                p.copy_(start[name] + update[name])
    return LocalResult(victim.peft_state(), steps, float(np.mean(losses)))


_CACHE: dict[str, tuple[Victim, ImageSet, torch.Tensor, dict[str, Any]]] = {}


def client_setup(data: ClientData, peft: dict[str, Any], partition_id: int,
                 num_partitions: int) -> tuple[Victim, ImageSet, torch.Tensor, dict[str, Any]]:
    """The client's victim (frozen CLIP + PEFT module, on ``data.device``), its private part, its shard and the
    data's public facts; memoised per process (a Flower simulation reuses its workers across rounds)."""
    device = resolve_device(data.device)
    key = repr((data.to_dict(), str(device), sorted(peft.items()), partition_id, num_partitions))
    if key not in _CACHE:
        path = artifacts.resolve_path(data.weights)
        clip = build_model(data.arch, path)
        spec = DataSpec.parse(data.data, split_seed=data.split_seed)
        private = load_private(spec, clip.image_size, data.part)
        victim = build_victim(clip, private.classnames, PeftConfig.from_dict(peft), device=device)
        shard = client_shard(private, data, partition_id, num_partitions)
        facts = {**spec.to_dict(), "grayscale": private.grayscale}
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (victim, private, shard, facts)
    return _CACHE[key]
