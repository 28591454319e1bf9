"""The Ray actor that holds a model and computes shards: a :class:`ShardTask` in, the shard's result tables
committed to the store by the actor itself, a small :class:`ShardResult` (the manifest) back to the driver.

The driver stays out of the data path: result rows go from the actor straight to the store (a local path,
a shared mount or an object store), and only paths, row counts and sizes travel back. The commit order is
unchanged: the actor's outputs are whole (written atomically) before the driver writes the shard record,
so an actor that dies after writing leaves outputs without a record, which the retry overwrites (same
path) or the next attempt quarantines (:func:`storage.shards.quarantine_leftovers`).

Kept free of Prefect: Ray workers that imported it and touched Prefect's API would each start their own
temporary Prefect server on one SQLite file ("database is locked").
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from pathlib import Path

from flows.engines import EngineIdentity, EngineOptions, ShardResult, ShardTask, build_engine
from storage import results
from storage.layout import Store


class StoreWriteError(Exception):
    """The store refused a shard's outputs (full disk, read-only, permissions, an unreachable object store).
    The pool stops the run with the file system's own error, as when the driver wrote the outputs: another
    try on another actor would meet the same store."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


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

    def run_shard(self, task: ShardTask) -> ShardResult:
        """Compute one shard, commit its result tables to the store (without the rows ``task.existing``
        names), and return the manifest; the driver then records the shard."""
        _maybe_die(task.shard_id, "start")
        time.sleep(float(os.environ.get("PROTEOFLOW_SHARD_DELAY_S", 0)))  # test hook: a slow shard
        model = self.engine.identity().model
        if model != task.model:
            raise RuntimeError(f"this worker loaded weights {model.sha}, the run plans for {task.model.sha}")
        output = self.engine.run(task.items, task.run_id)
        started = time.perf_counter()
        try:
            outputs = results.write_shard_outputs(
                Store(task.store), model, task.run_id, task.shard_id, output.tables, task.existing
            )
        except OSError as exc:
            raise StoreWriteError(exc) from exc
        _maybe_die(task.shard_id, "written")
        result = ShardResult(outputs, output.errors, output.fallbacks, output.residues, output.seconds,
                             time.perf_counter() - started, sum(t.nbytes for t in output.tables.values()))  # fmt: skip
        result.driver_bytes = len(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return result


def _maybe_die(shard_id: int, stage: str) -> None:
    """Test hook: PROTEOFLOW_KILL_SHARD=N kills this actor's process (SIGKILL) the first time shard N starts;
    ``N@written`` kills it once shard N's outputs are committed, before the driver hears of them.

    PROTEOFLOW_FAULT_DIR holds the marker that makes it happen once, as a real crash would: no cleanup.
    """
    target = os.environ.get("PROTEOFLOW_KILL_SHARD")
    marker_dir = os.environ.get("PROTEOFLOW_FAULT_DIR")
    if target is None or marker_dir is None:
        return
    shard, _, when = target.partition("@")
    if int(shard) != shard_id or (when or "start") != stage:
        return
    marker = Path(marker_dir) / f"killed-shard-{shard_id}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
