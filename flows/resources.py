"""Default actor-pool sizing from what the Ray cluster in use actually has, and the check that the pool asked
for can be placed there at all (Ray would otherwise keep the actors pending forever, silently)."""

from __future__ import annotations

import math
from dataclasses import replace

from flows.errors import CliError
from flows.job import PoolOptions


class PoolDoesNotFit(CliError):
    """The cluster cannot place the requested actors; the message says what is missing, in one line."""


def resolve_pool(options: PoolOptions, cluster: dict) -> PoolOptions:
    """Fill unset pool options: one actor per GPU where the cluster has GPUs; on CPUs only, one actor using
    every core (one process with intra-op threads beats several competing for two cores)."""
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("gpus", 0) >= 1 else 0.0
    workers = options.workers
    if workers is None:
        workers = max(1, int(cluster["gpus"] / gpus)) if gpus else 1
    cpus = options.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if gpus else max(1.0, float(int(cluster.get("cpus", 1)) // workers))
    return replace(options, workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)


def placeable(cpus: float, gpus: float, nodes: list[dict]) -> int:
    """How many actors of ``cpus`` CPUs and ``gpus`` GPUs the nodes can hold at once (each node holds as many
    as both of its totals allow; identical actors pack exactly so)."""
    total = 0
    for node in nodes:
        fits = [math.floor(node.get("cpus", 0) / cpus + 1e-9) if cpus else math.inf,
                math.floor(node.get("gpus", 0) / gpus + 1e-9) if gpus else math.inf]  # fmt: skip
        total += int(min(fits)) if min(fits) != math.inf else 10**6
    return total


def check_fits(options: PoolOptions, cluster: dict) -> None:
    """A one-line :class:`PoolDoesNotFit` unless the cluster (``flows.cluster`` description, with
    ``node_resources``) has room for every actor of the resolved pool, counting its whole capacity (actors of
    other jobs may still make the pool wait; :meth:`flows.pool.ActorPool.identity` bounds that wait)."""
    workers = options.workers or 1
    cpus, gpus = options.cpus_per_worker or 0.0, options.gpus_per_worker or 0.0
    if gpus > 1 and gpus != int(gpus):
        raise PoolDoesNotFit(f"--gpus-per-worker {gpus:g}: above 1 it must be a whole number of GPUs")
    nodes = cluster.get("node_resources") or [
        {"cpus": cluster.get("cpus", 0), "gpus": cluster.get("gpus", 0)}
    ]
    fit = placeable(cpus, gpus, nodes)
    if fit >= workers:
        return
    need = [f"{cpus:g} CPU{'s' if cpus != 1 else ''}"] + (
        [f"{gpus:g} GPU{'s' if gpus != 1 else ''}"] if gpus else []
    )
    have = f"{_count(len(nodes), 'node')}, {cluster.get('cpus', 0):g} CPUs and {cluster.get('gpus', 0):g} GPUs in all"
    largest = max(nodes, key=lambda n: (n.get("gpus", 0), n.get("cpus", 0)), default={})
    if gpus and not cluster.get("gpus", 0):
        why = "it has no GPUs: drop --gpus-per-worker (or set it to 0) to compute on CPUs"
    elif fit == 0:
        why = (f"no node has that much (the largest has {largest.get('cpus', 0):g} CPUs, "
               f"{largest.get('gpus', 0):g} GPUs)")  # fmt: skip
    else:
        why = f"it can place {fit}: use --workers {fit} or fewer, or a smaller --cpus-per-worker"
    each = " + ".join(need) + (" each" if workers > 1 else "")
    raise PoolDoesNotFit(
        f"the pool ({_count(workers, 'worker')}, {each}) does not fit the Ray cluster ({have}); {why}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
