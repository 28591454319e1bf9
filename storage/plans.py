"""A compute run's plan: the sequences it still has to compute, cut into shards, one Parquet row group each.

The plan is written once per run and reused on resume, so shard ids are stable across attempts. Each plan
carries a ``plan_id`` in its footer; a shard record is trusted only for the plan it was computed under, so a
plan that is lost and rebuilt never inherits the old plan's shard records.

Planning streams: :class:`Pending` is the run's pending set as a DuckDB query over the store, never held in
memory. :func:`length_counts` reads only its lengths (one count per distinct length), the cutting policy
(``flows.planning.shard_sizes``) turns them into shard sizes, and :func:`write_pending_plan` streams the
rows longest first into the plan file, one row group per shard. DuckDB works under
:data:`PLAN_MEMORY_LIMIT` and spills its joins and sort to a scratch directory, so the driver's memory
stays flat whatever the number of sequences (bench/scale.py measures it on 10^7).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from storage import objects
from storage.catalog import fetch_arrow, file_list
from storage.layout import ParquetSink, Store, staging
from storage.locks import leases
from storage.schemas import PLAN_SCHEMA

MAX_SHARD_SEQUENCES = 2048
PLAN_MEMORY_LIMIT = "256MB"  # DuckDB's memory while planning; past it, its joins and sort spill to disk
PLAN_BATCH_ROWS = MAX_SHARD_SEQUENCES  # rows per batch streamed from DuckDB into the plan file


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


@dataclass(frozen=True)
class Pending:
    """The distinct sequences of ``ingest_runs`` minus ``exclude``: what a run still has to compute, as a
    query over the store that each reader streams (see the module docstring)."""

    store: Store
    ingest_runs: list[str]
    exclude: pa.Array

    def members(self) -> list:
        return [p for run in self.ingest_runs for p in self.store.run_dir("members", run).glob("*.parquet")]

    def sql(self, columns: str, ordered: bool) -> str:
        """The pending rows (``columns`` of ``s``, the sequences table), longest first when ``ordered``
        (ties by seq_hash: the order of the plan); ``excluded`` is the registered ``exclude``."""
        order = "ORDER BY s.length DESC, s.seq_hash" if ordered else ""
        return f"""
            WITH wanted AS (SELECT DISTINCT seq_hash FROM read_parquet({file_list(self.members())}))
            SELECT {columns}
            FROM read_parquet({file_list(self.store.files("sequences"))}) s SEMI JOIN wanted USING (seq_hash)
            WHERE s.seq_hash NOT IN (SELECT seq_hash FROM excluded)
            {order}
        """

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection holding ``excluded``, its memory bounded, spilling to a scratch directory
        (in the store on a local disk, in the local temporary directory for an object store)."""
        with staging(self.store, "plan") as scratch:
            con = objects.duckdb_connection()
            try:
                con.execute(f"SET memory_limit = '{PLAN_MEMORY_LIMIT}'")
                con.execute("SET temp_directory = " + "'" + str(scratch).replace("'", "''") + "'")
                con.register("excluded", pa.table({"seq_hash": self.exclude.cast(pa.string())}))
                yield con
            finally:
                con.close()


def pending_sequences(store: Store, ingest_runs: list[str], exclude: pa.Array) -> pa.Table:
    """Distinct sequences of the given ingest runs, minus ``exclude``, longest first (seq_hash, length, sequence),
    as one table in memory: for small sets (a run's missing sequences); a plan streams them (:class:`Pending`)."""
    pending = Pending(store, ingest_runs, exclude)
    if not pending.members():
        return PLAN_SCHEMA.empty_table().drop_columns(["shard_id"])
    con = objects.duckdb_connection()
    try:
        con.register("excluded", pa.table({"seq_hash": exclude.cast(pa.string())}))
        return fetch_arrow(con, pending.sql("s.seq_hash, s.length, s.sequence", ordered=True))
    finally:
        con.close()


def length_counts(pending: Pending) -> list[tuple[int, int]]:
    """``(length, sequences)`` of the pending set, longest first: all the shard cutting policy needs."""
    if not pending.members():
        return []
    with pending.connection() as con:
        rows = con.execute(
            f"SELECT length, count(*) FROM ({pending.sql('s.length', ordered=False)}) GROUP BY length "
            "ORDER BY length DESC"
        ).fetchall()
    return [(int(length), int(count)) for length, count in rows]


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


def write_pending_plan(
    store: Store,
    run_id: str,
    pending: Pending,
    sizes: list[int],
    cost: Callable[[int], float],
    first_shard: int = 0,
) -> Plan:
    """Write ``pending``, longest first, as the run's plan, atomically: shard ``first_shard + i`` (row group
    ``i``) takes the next ``sizes[i]`` sequences. The rows stream from DuckDB into the file, a shard at a
    time; ``sizes`` must add up to the pending set (cut from :func:`length_counts` of the same set)."""
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
        if sizes:
            with pending.connection() as con:
                relation = con.sql(pending.sql("s.seq_hash, s.length, s.sequence", ordered=True))
                reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
                for shard_id, rows in enumerate(_cut_stream(iter(reader(PLAN_BATCH_ROWS)), sizes)):
                    ids = pa.array([first_shard + shard_id] * rows.num_rows, pa.int32())
                    sink.write(
                        rows.add_column(0, "shard_id", ids).select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA)
                    )
                    sink.flush()  # one row group per shard
        sink.close()
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    plan = load_plan(store, run_id, cost)
    assert plan is not None
    return plan


def _cut_stream(batches: Iterator[pa.RecordBatch], sizes: list[int]) -> Iterator[pa.Table]:
    """The next ``size`` rows of ``batches`` for each of ``sizes``; refuses a stream of another length."""
    held: list[pa.RecordBatch] = []
    count = 0
    for size in sizes:
        while count < size:
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError("the pending sequences changed while the plan was written")
            held.append(batch)
            count += batch.num_rows
        table = pa.Table.from_batches(held)
        yield table.slice(0, size)
        rest = table.slice(size)
        held, count = rest.to_batches(), rest.num_rows
    if count or any(b.num_rows for b in batches):
        raise RuntimeError("the pending sequences changed while the plan was written")


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


def covers(plan: Plan, pending: Pending | pa.Array) -> bool:
    """Whether every pending sequence (or every one of the given hashes) is in the plan (else the plan is
    stale: rebuild it). For :class:`Pending`, DuckDB anti-joins the two files without holding either."""
    if not isinstance(pending, Pending):
        return pc.all(pc.is_in(pending, value_set=plan.hashes())).as_py() is not False
    if not pending.members():
        return True
    with pending.connection() as con:
        missing = con.execute(
            f"SELECT count(*) FROM ({pending.sql('s.seq_hash', ordered=False)}) p "
            f"ANTI JOIN read_parquet({file_list([plan.path])}) USING (seq_hash)"
        ).fetchone()
    return not missing or missing[0] == 0


def claimed_by_others(store: Store, model_sha: str, run_id: str) -> pa.Array:
    """Sequences in the plans of other runs that hold a live lease on these weights."""
    claimed = [pa.array([], pa.string())]
    for lease in leases(store, model_sha):
        if lease.run_id != run_id and lease.live():
            path = store.plan_path(lease.run_id)
            if path.exists():
                claimed.append(objects.read_table(path, columns=["seq_hash"]).column(0).combine_chunks())
    return pa.concat_arrays(claimed)
