"""Ray connection: join a cluster at ``--ray-address``, or start a local one for this run and stop it after.

When the driver already holds a Ray connection (tests, notebooks) it is reused and left open.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]


def runtime_env_for_remote() -> dict:
    """Ship this project's packages to a remote cluster's workers (the cluster image needs its deps)."""
    import esm_core
    import flows
    import storage

    return {"py_modules": [Path(m.__file__).parent for m in (esm_core, storage, flows)]}


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    ship_code: bool = False,
    quiet: bool = False,
) -> Iterator[dict]:
    """Yield a description of the Ray cluster in use; shut down only what this call started."""
    if ray.is_initialized():
        yield _describe(started=False)
        return
    kwargs: dict = {
        "logging_level": logging.ERROR if quiet else logging.WARNING,
        "include_dashboard": False,
        "log_to_driver": not quiet,  # quiet: workers' output stays in Ray's session logs
    }
    if address:
        kwargs["address"] = address
        if ship_code:
            kwargs["runtime_env"] = runtime_env_for_remote()
    else:
        # A fresh local instance for this run; never attach to some other cluster by accident.
        kwargs.update(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus)
    ray.init(**kwargs)
    try:
        yield _describe(started=not address)
    finally:
        ray.shutdown()


def _describe(started: bool) -> dict:
    resources = ray.cluster_resources()
    return {
        "started_local": started,
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
    }
