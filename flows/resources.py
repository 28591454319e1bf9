"""Default actor-pool sizing from what the Ray cluster in use actually has."""

from __future__ import annotations

from dataclasses import replace

from flows.job import PoolOptions


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
