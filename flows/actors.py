"""The Ray actor that holds a model and computes shards. Plain data in, Arrow tables out.

Kept free of Prefect: Ray workers that imported it and touched Prefect's API would each start their own
temporary Prefect server on one SQLite file ("database is locked").
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from flows.engines import EngineIdentity, EngineOptions, ShardOutput, build_engine


class ShardWorker:
    """Loads one model once, then computes whichever shard the driver hands it next."""

    def __init__(self, kind: str, model: str, options: EngineOptions, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.engine = build_engine(kind, model, options)

    def identity(self) -> EngineIdentity:
        return self.engine.identity()

    def progress(self) -> int:
        """Residues finished so far in the shard being computed (answered while it runs: a threaded actor)."""
        return self.engine.progress

    def where(self) -> dict:
        """Host, process and Ray node of this actor, for the shard records and the spread test."""
        import ray

        context = ray.get_runtime_context()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def run_shard(self, shard_id: int, items: list[tuple[str, str]], run_id: str) -> ShardOutput:
        _maybe_die(shard_id)
        time.sleep(float(os.environ.get("PROTEOFLOW_SHARD_DELAY_S", 0)))  # test hook: a slow shard
        return self.engine.run(items, run_id)


def _maybe_die(shard_id: int) -> None:
    """Test hook: PROTEOFLOW_KILL_SHARD=N kills this actor's process (SIGKILL) the first time shard N starts.

    PROTEOFLOW_FAULT_DIR holds the marker that makes it happen once, as a real crash would: no cleanup.
    """
    target = os.environ.get("PROTEOFLOW_KILL_SHARD")
    marker_dir = os.environ.get("PROTEOFLOW_FAULT_DIR")
    if target is None or marker_dir is None or int(target) != shard_id:
        return
    marker = Path(marker_dir) / f"killed-shard-{shard_id}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
