"""A compute run's plan: the sequences it still has to compute, cut into shards, one Parquet row group each.

The plan is written once per run and reused on resume, so shard ids are stable across attempts. Each plan
carries a ``plan_id`` in its footer; a shard record is trusted only for the plan it was computed under, so a
plan that is lost and rebuilt never inherits the old plan's shard records.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from storage import objects
from storage.catalog import fetch_arrow, file_list
from storage.layout import ParquetSink, Store
from storage.locks import leases
from storage.schemas import PLAN_SCHEMA

MAX_SHARD_SEQUENCES = 2048


@dataclass(frozen=True)
class ShardSummary:
    """Size of one planned shard: sequences, residues and the planner's relative cost."""

    sequences: int
    residues: int
    cost: float


@dataclass
class Plan:
    """A run's shards, read back from its plan file."""

    path: Path
    plan_id: str
    shards: dict[int, ShardSummary]
    first_shard: int = 0  # shard ids are first_shard + row group index (see write_plan)

    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.shards.values())

    @property
    def residues(self) -> int:
        return sum(s.residues for s in self.shards.values())

    def hashes(self, shard_ids: list[int] | None = None) -> pa.Array:
        """The planned ``seq_hash`` values (of the given shards, or all)."""
        pf = objects.parquet_file(self.path)
        if shard_ids is None:
            return pf.read(columns=["seq_hash"]).column(0).combine_chunks()
        if not shard_ids:
            return pa.array([], pa.string())
        groups = sorted(s - self.first_shard for s in shard_ids)
        return pf.read_row_groups(groups, columns=["seq_hash"]).column(0).combine_chunks()

    def items(self, shard_id: int) -> list[tuple[str, str]]:
        """The ``(seq_hash, sequence)`` pairs of one shard (one row group of the plan file)."""
        table = objects.parquet_file(self.path).read_row_group(
            shard_id - self.first_shard, columns=["seq_hash", "sequence"]
        )
        return list(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))


def pending_sequences(store: Store, ingest_runs: list[str], exclude: pa.Array) -> pa.Table:
    """Distinct sequences of the given ingest runs, minus ``exclude``, longest first (seq_hash, length, sequence)."""
    members = [p for run in ingest_runs for p in store.run_dir("members", run).glob("*.parquet")]
    if not members:
        return PLAN_SCHEMA.empty_table().drop_columns(["shard_id"])
    con = objects.duckdb_connection()
    con.register("excluded", pa.table({"seq_hash": exclude.cast(pa.string())}))
    return fetch_arrow(
        con,
        f"""
        WITH wanted AS (SELECT DISTINCT seq_hash FROM read_parquet({file_list(members)}))
        SELECT s.seq_hash, s.length, s.sequence
        FROM read_parquet({file_list(store.files("sequences"))}) s SEMI JOIN wanted USING (seq_hash)
        WHERE s.seq_hash NOT IN (SELECT seq_hash FROM excluded)
        ORDER BY s.length DESC, s.seq_hash
    """,
    )


def write_plan(
    store: Store,
    run_id: str,
    todo: pa.Table,
    shards: list[list[int]],
    cost: Callable[[int], float],
    first_shard: int = 0,
) -> Plan:
    """Write ``todo`` cut into ``shards`` (lists of row indices) as the run's plan, atomically.

    A plan that replaces a lost or stale one numbers its shards from ``first_shard``, after every shard id
    the run has used, so its outputs and records never overwrite those of the plan before it."""
    path = store.plan_path(run_id)
    plan_id = uuid.uuid4().hex[:16]
    sink = ParquetSink(
        path,
        PLAN_SCHEMA,
        "plan",
        {"run_id": run_id, "plan_id": plan_id, "first_shard": first_shard},
        row_group_rows=MAX_SHARD_SEQUENCES + 1,
    )
    try:
        for shard_id, indices in enumerate(shards):
            rows = todo.take(pa.array(indices, pa.int64()))
            ids = pa.array([first_shard + shard_id] * len(indices), pa.int32())
            sink.write(rows.add_column(0, "shard_id", ids).select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA))
            sink.flush()  # one row group per shard: a shard is read back with read_row_group(shard_id)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    plan = load_plan(store, run_id, cost)
    assert plan is not None
    return plan


def load_plan(store: Store, run_id: str, cost: Callable[[int], float]) -> Plan | None:
    """The run's plan with each shard's size and cost, or None when the run has no plan."""
    path = store.plan_path(run_id)
    if not path.exists():
        return None
    pf = objects.parquet_file(path)
    provenance = json.loads((pf.schema_arrow.metadata or {}).get(b"proteoflow.provenance", b"{}"))
    first = int(provenance.get("first_shard", 0))
    shards: dict[int, ShardSummary] = {}
    for rg in range(pf.metadata.num_row_groups):
        lengths = pf.read_row_group(rg, columns=["length"]).column(0)
        total = pc.sum(lengths).as_py() or 0
        shards[first + rg] = ShardSummary(len(lengths), total, sum(cost(n) for n in lengths.to_pylist()))
    return Plan(path, provenance.get("plan_id", ""), shards, first)


def covers(plan: Plan, hashes: pa.Array) -> bool:
    """Whether every one of ``hashes`` is in the plan (else the plan is stale: rebuild it)."""
    return pc.all(pc.is_in(hashes, value_set=plan.hashes())).as_py() is not False


def claimed_by_others(store: Store, model_sha: str, run_id: str) -> pa.Array:
    """Sequences in the plans of other runs that hold a live lease on these weights."""
    claimed = [pa.array([], pa.string())]
    for lease in leases(store, model_sha):
        if lease.run_id != run_id and lease.live():
            path = store.plan_path(lease.run_id)
            if path.exists():
                claimed.append(objects.read_table(path, columns=["seq_hash"]).column(0).combine_chunks())
    return pa.concat_arrays(claimed)
