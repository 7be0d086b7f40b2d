"""An audit's cells on Ray workers (``--workers N``): locally by default, or on an existing Ray cluster
(``--ray-address``); one GPU per worker where the cluster has GPUs.

Every cell is a pure function of the audit's config and its key (its seeds are derived from them), so the
cells may run in any order on any worker: each worker builds the audit's context once and computes the
cells it is handed, and the driver writes each finished cell to ``cells.json`` as it arrives (a killed run
resumes from there, with or without workers). This module knows nothing of what a cell is: the sweep
hands it a context factory and a cell function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ClipleakError

MAX_WORKERS = 256


def run_parallel(make_context: Callable[[Any], Any], compute: Callable[[Any, Any], Any], keys: list[Any], *,
                 workers: int, address: str | None = None, device: str = "auto",
                 threads: int = 1) -> Iterator[tuple[Any, Any]]:
    """Yield ``(key, compute(context, key))`` for every key as the workers finish them (not in key order).

    ``make_context(device)`` runs once per worker (``device``: where it computes, resolved on the worker:
    its GPU when it was given one); ``threads``: torch threads per worker."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ClipleakError(f"--workers must be a whole number from 1 to {MAX_WORKERS}, got {workers!r}")
    try:
        import ray
    except ImportError:  # pragma: no cover - ray ships with flwr[simulation]
        raise ClipleakError("--workers needs Ray (pip install 'flwr[simulation]')") from None
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers * max(1, int(threads)), include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClipleakError(f"cannot start Ray{f' at {address}' if address else ''}: {e}") from None
        started = True
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0
        actor = ray.remote(num_cpus=max(1, int(threads)), num_gpus=gpus)(_Worker)
        pool: list[Any] = [actor.remote(make_context, compute, device, int(threads)) for _ in range(workers)]
        pending: dict[Any, tuple[Any, Any]] = {}
        queue = list(keys)
        for w in pool:
            if queue:
                k = queue.pop(0)
                pending[w.compute.remote(k)] = (w, k)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            w, k = pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as e:  # a worker died (out of memory, killed): finished cells are kept
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ClipleakError(f"a Ray worker failed on cell {k}: {first[:300]}; the finished cells are in "
                                    "cells.json, rerun to resume (with fewer --workers if memory ran out)") from None
            if queue:
                nk = queue.pop(0)
                pending[w.compute.remote(nk)] = (w, nk)
            yield k, value
    finally:
        if started:
            ray.shutdown()


class _Worker:
    """One Ray worker: the audit's context, built once, and the cells it computes."""

    def __init__(self, make_context: Callable[[Any], Any], compute: Callable[[Any, Any], Any], device: str,
                 threads: int):
        import torch

        from ..devices import resolve_device

        torch.set_num_threads(max(1, threads))
        self.compute_fn = compute
        self.context = make_context(resolve_device(device))

    def compute(self, key: Any) -> Any:
        return self.compute_fn(self.context, key)
