"""Shard planning: which sequences of a run still need results, cut into cost-balanced shards.

Sequences are sorted longest first and packed greedily up to a target cost per shard, so each shard holds
similar lengths (little padding in its batches) and the longest shards are dispatched first, which keeps
the tail of a run short under dynamic dispatch. The plan is written once per run and reused on resume,
so shard ids are stable across attempts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.catalog import fetch_arrow, file_list
from storage.layout import ParquetSink, Store
from storage.schemas import PLAN_SCHEMA

SHARDS_PER_WORKER = 4
MAX_SHARD_SEQUENCES = 2048


def embedding_cost(length: int) -> float:
    """Relative cost of embedding one sequence: per-token work plus the quadratic attention term."""
    return length + length * length / 1024


def folding_cost(length: int) -> float:
    """Relative cost of folding one sequence: the trunk's triangular updates grow with the cube of length."""
    return length + length**3 / 65536


@dataclass
class Plan:
    """A run's shards: ``shard_id -> (count, residues, cost)`` and where the rows live."""

    path: Path
    shards: dict[int, tuple[int, int, float]]

    @property
    def sequences(self) -> int:
        return sum(n for n, _, _ in self.shards.values())

    @property
    def residues(self) -> int:
        return sum(r for _, r, _ in self.shards.values())

    def hashes(self) -> pa.Array:
        """Every planned ``seq_hash``."""
        return pq.read_table(self.path, columns=["seq_hash"]).column(0).combine_chunks()

    def items(self, shard_id: int) -> list[tuple[str, str]]:
        """The ``(seq_hash, sequence)`` pairs of one shard (one row group of the plan file)."""
        table = pq.ParquetFile(self.path).read_row_group(shard_id, columns=["seq_hash", "sequence"])
        return list(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))


def cut_shards(lengths: list[int], cost: Callable[[int], float], workers: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into shards, longest first, of roughly equal cost."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    costs = [cost(lengths[i]) for i in order]
    total = sum(costs)
    if not order:
        return []
    count = max(1, min(len(order), workers * SHARDS_PER_WORKER, math.ceil(total / max(costs[0], 1e-9))))
    target = total / count
    shards: list[list[int]] = [[]]
    acc = 0.0
    for index, c in zip(order, costs, strict=True):
        if shards[-1] and (acc + c > target * 1.05 or len(shards[-1]) >= MAX_SHARD_SEQUENCES):
            shards.append([])
            acc = 0.0
        shards[-1].append(index)
        acc += c
    return shards


def pending_sequences(store: Store, run_ids: list[str], done: pa.Array, skip: pa.Array) -> pa.Table:
    """Distinct sequences of the given ingest runs, minus those already done or isolated as rejected."""
    con = duckdb.connect(":memory:")
    members = [p for run in run_ids for p in store.run_dir("members", run).glob("*.parquet")]
    if not members:
        return PLAN_SCHEMA.empty_table().drop_columns(["shard_id"])
    con.register("done_hashes", pa.table({"seq_hash": done}))
    con.register("skip_hashes", pa.table({"seq_hash": skip}))
    sequences = store.files("sequences")
    return fetch_arrow(
        con,
        f"""
        WITH wanted AS (SELECT DISTINCT seq_hash FROM read_parquet({file_list(members)}))
        SELECT s.seq_hash, s.length, s.sequence
        FROM read_parquet({file_list(sequences)}) s SEMI JOIN wanted USING (seq_hash)
        WHERE s.seq_hash NOT IN (SELECT seq_hash FROM done_hashes)
          AND s.seq_hash NOT IN (SELECT seq_hash FROM skip_hashes)
        ORDER BY s.length DESC, s.seq_hash
    """,
    )


def write_plan(store: Store, run_id: str, todo: pa.Table, cost: Callable[[int], float], workers: int) -> Plan:
    """Cut ``todo`` into shards and write the plan (one row group per shard) atomically."""
    path = store.root / "plans" / f"{run_id}.parquet"
    lengths = todo.column("length").to_pylist()
    sink = ParquetSink(path, PLAN_SCHEMA, "plan", {"run_id": run_id}, row_group_rows=MAX_SHARD_SEQUENCES + 1)
    try:
        for shard_id, indices in enumerate(cut_shards(lengths, cost, workers)):
            rows = todo.take(pa.array(indices, pa.int64()))
            ids = pa.array([shard_id] * len(indices), pa.int32())
            sink.write(rows.add_column(0, "shard_id", ids).select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA))
            sink.flush()  # one row group per shard: a shard is read back with read_row_group(shard_id)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    return load_plan(path, cost)


def load_plan(path: Path, cost: Callable[[int], float]) -> Plan:
    """Read back a plan's shard summary from its row groups."""
    shards: dict[int, tuple[int, int, float]] = {}
    pf = pq.ParquetFile(path)
    for rg in range(pf.metadata.num_row_groups):
        lengths = pf.read_row_group(rg, columns=["length"]).column(0)
        shards[rg] = (len(lengths), pc.sum(lengths).as_py() or 0, sum(cost(n) for n in lengths.to_pylist()))
    return Plan(path, shards)
