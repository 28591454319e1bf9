"""A compute run's plan: the sequences it still has to compute, cut into shards, one Parquet row group each.

The plan is written once per run and reused on resume, so shard ids are stable across attempts. Each plan
carries a ``plan_id`` in its footer; a shard record is trusted only for the plan it was computed under, so a
plan that is lost and rebuilt never inherits the old plan's shard records.

Planning streams: :class:`Pending` is the run's pending set as a DuckDB query over the store, never held in
memory. :func:`length_counts` reads only its lengths (one count per distinct length), the cutting policy
(``flows.planning.shard_sizes``) turns them into shard sizes, and :func:`write_pending_plan` writes the rows
longest first, one row group per shard, from :meth:`Pending.longest_first`: DuckDB streams the rows (its
joins spill to disk past :data:`PLAN_MEMORY_LIMIT`) into length bands on local scratch, and each band is
sorted in memory on its own. The driver's memory stays flat whatever the number of sequences
(bench/scale.py measures it up to 10^7).
"""

from __future__ import annotations

import functools
import json
import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import objects
from storage.catalog import fetch_arrow, file_list
from storage.layout import ParquetSink, Store, staging
from storage.locks import leases
from storage.schemas import PLAN_SCHEMA

if TYPE_CHECKING:
    import pyarrow.parquet as pq

MAX_SHARD_SEQUENCES = 2048
PLAN_MEMORY_LIMIT = "128MB"  # DuckDB's memory while planning; past it, its joins spill to disk
PLAN_THREADS = 2  # DuckDB threads while planning: the limit holds for 10^7 sequences with 2 (measured)
PLAN_BATCH_ROWS = 16_384  # rows per batch streamed out of DuckDB
BAND_BYTES = 16 << 20  # rows sorted in memory at a time (Pending.longest_first)
OPEN_BANDS = 256  # band files written per pass over the pending set (4 GB of it at BAND_BYTES)


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
    _file: pq.ParquetFile | None = field(default=None, init=False, repr=False, compare=False)

    def _parquet(self) -> pq.ParquetFile:
        """The plan file, opened once: its footer (a row group per shard, so it grows with the shards) is
        parsed once, not at every shard dispatched."""
        if self._file is None:
            self._file = objects.parquet_file(self.path)
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # an open file does not travel

    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.shards.values())

    @property
    def residues(self) -> int:
        return sum(s.residues for s in self.shards.values())

    def hashes(self, shard_ids: list[int] | None = None) -> pa.Array:
        """The planned ``seq_hash`` values (of the given shards, or all)."""
        pf = self._parquet()
        if shard_ids is None:
            return pf.read(columns=["seq_hash"]).column(0).combine_chunks()
        if not shard_ids:
            return pa.array([], pa.string())
        groups = sorted(s - self.first_shard for s in shard_ids)
        return pf.read_row_groups(groups, columns=["seq_hash"]).column(0).combine_chunks()

    def items(self, shard_id: int) -> list[tuple[str, str]]:
        """The ``(seq_hash, sequence)`` pairs of one shard (one row group of the plan file)."""
        table = self._parquet().read_row_group(shard_id - self.first_shard, columns=["seq_hash", "sequence"])
        return list(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))


@dataclass(frozen=True, eq=False)
class Pending:
    """The distinct sequences of ``ingest_runs`` minus ``exclude``: what a run still has to compute, as a
    query over the store that each reader streams (see the module docstring)."""

    store: Store
    ingest_runs: list[str]
    exclude: pa.Array

    def members(self) -> list:
        return [p for run in self.ingest_runs for p in self.store.run_dir("members", run).glob("*.parquet")]

    def sql(self, columns: str, ordered: bool = False) -> str:
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
    def connection(self, scratch: Path | None = None) -> Iterator[tuple[duckdb.DuckDBPyConnection, Path]]:
        """A DuckDB connection holding ``excluded``, its memory bounded, spilling to a scratch directory
        (``scratch``, or a new one: in the store on a local disk, in the local temporary directory for an
        object store), and that directory. Closing it frees DuckDB's memory."""
        with ExitStack() as stack:
            if scratch is None:
                scratch = stack.enter_context(staging(self.store, "plan"))
            con = objects.duckdb_connection()
            try:
                con.execute(f"SET memory_limit = '{PLAN_MEMORY_LIMIT}'")
                con.execute(f"SET threads = {PLAN_THREADS}")  # each thread needs its share of the limit
                con.execute("SET preserve_insertion_order = false")  # every reader orders (or counts) itself
                if _has_optimizer(con, "build_side_probe_side"):
                    # the joins build on the narrow side as written (the hashes wanted, the hashes excluded),
                    # never on the sequences with their residues, which estimates can make look smaller
                    con.execute("SET disabled_optimizers = 'build_side_probe_side'")
                con.execute(f"SET temp_directory = {_quote(scratch / 'duckdb')}")
                con.register("excluded", pa.table({"seq_hash": self.exclude.cast(pa.string())}))
                yield con, scratch
            finally:
                con.close()

    @functools.cached_property
    def counts(self) -> list[tuple[int, int]]:
        """``(length, sequences)`` longest first (read once: the pending set does not change while the plan
        lock is held)."""
        if not self.members():
            return []
        with self.connection() as (con, _):
            rows = con.execute(
                f"SELECT length, count(*) FROM ({self.sql('s.length')}) GROUP BY length ORDER BY length DESC"
            ).fetchall()
        return [(int(length), int(count)) for length, count in rows]

    def longest_first(self) -> Iterator[pa.Table]:
        """The pending rows (seq_hash, length, sequence), longest first then by seq_hash, a band at a time.

        A sort by DuckDB needs more memory the more rows it sorts, so the rows are cut into bands instead:
        consecutive lengths of about BAND_BYTES each (one length that weighs more is split by seq_hash
        prefix). One streaming pass writes up to OPEN_BANDS bands to scratch files; each band is then read
        back, sorted in memory and handed on. Memory is a band and DuckDB's limit, whatever the number of
        rows; a pending set of more bands than OPEN_BANDS takes more passes."""
        bands = Bands(self.counts)
        with staging(self.store, "plan") as scratch:
            for low in range(0, bands.count, OPEN_BANDS):
                high = min(bands.count, low + OPEN_BANDS)
                with self.connection(scratch) as (con, _):  # closed before the sorts: never both at once
                    relation = con.sql(self.sql("s.seq_hash, s.length, s.sequence"))
                    reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
                    files = _write_bands(reader(PLAN_BATCH_ROWS), bands, scratch, low, high)
                for band in range(low, high):
                    path = files.get(band)
                    if path is None:
                        continue
                    with pa.OSFile(str(path)) as source:
                        table = pa.ipc.open_stream(source).read_all()
                    path.unlink()
                    yield table.sort_by([("length", "descending"), ("seq_hash", "ascending")])


BAND_ROW_BYTES = 48  # per row beyond its residues: the hash, its offsets, the length
_HEX = np.zeros(256, np.int64)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)


class Bands:
    """The pending set cut into bands of about BAND_BYTES, in plan order: consecutive lengths, longest
    first; a length heavier than a band is split into equal ranges of its seq_hash's first four hex digits
    (hashes are uniform), which keeps plan order (ties by seq_hash) across its bands."""

    def __init__(self, counts: list[tuple[int, int]]) -> None:
        top = max((length for length, _ in counts), default=0)
        self.first = np.full(top + 1, -1, np.int64)  # by length: its (first) band; -1: not pending
        self.parts = np.ones(top + 1, np.int64)  # by length: how many bands it is split into
        band, filled = -1, BAND_BYTES
        for length, count in counts:
            size = count * (length + BAND_ROW_BYTES)
            split = min(65536, math.ceil(size / BAND_BYTES))
            if split > 1 or filled + size > BAND_BYTES:
                band, filled = band + 1, 0
            self.first[length], self.parts[length] = band, split
            band += split - 1
            filled = BAND_BYTES if split > 1 else filled + size
        self.count = band + 1

    def of(self, batch: pa.RecordBatch) -> np.ndarray:
        """The band of each row of ``batch`` (seq_hash, length, ...); -1 for a length not pending."""
        lengths = batch.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
        known = lengths < len(self.first)
        band = np.full(len(lengths), -1, np.int64)
        band[known] = self.first[lengths[known]]
        parts = np.ones(len(lengths), np.int64)
        parts[known] = self.parts[lengths[known]]
        split = np.flatnonzero(parts > 1)
        if len(split):
            heads = pc.utf8_slice_codeunits(batch.column(0).take(pa.array(split)), 0, 4).cast(pa.binary())
            data = np.frombuffer(heads.buffers()[2], np.uint8)
            starts = np.frombuffer(heads.buffers()[1], np.int32)[heads.offset : heads.offset + len(heads)]
            digits = _HEX[data[starts[:, None] + np.arange(4)]]
            prefix = (digits[:, 0] << 12) | (digits[:, 1] << 8) | (digits[:, 2] << 4) | digits[:, 3]
            band[split] += prefix * parts[split] // 65536
        return band


def _write_bands(
    batches: Iterator[pa.RecordBatch], bands: Bands, scratch: Path, low: int, high: int
) -> dict[int, Path]:
    """Append each row to its band's scratch file (Arrow IPC, zstd), for bands ``low`` to ``high - 1``."""
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    files: dict[int, Path] = {}
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    try:
        for batch in batches:
            band = bands.of(batch)
            order = np.argsort(band, kind="stable")
            ranked = band[order]
            edges = np.flatnonzero(np.diff(ranked)) + 1
            for start, stop in zip(np.r_[0, edges], np.r_[edges, len(ranked)], strict=True):
                key = int(ranked[start])
                if key < low or key >= high:
                    continue
                if key not in writers:
                    files[key] = scratch / f"band-{key}.arrow"
                    writers[key] = pa.ipc.new_stream(str(files[key]), batch.schema, options=options)
                writers[key].write_batch(batch.take(pa.array(order[start:stop])))
    finally:
        for writer in writers.values():
            writer.close()
    return files


def _has_optimizer(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    try:
        return bool(
            con.execute("SELECT count(*) FROM duckdb_optimizers() WHERE name = ?", [name]).fetchall()[0][0]
        )
    except duckdb.Error:
        return False


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def pending_sequences(
    store: Store,
    ingest_runs: list[str],
    exclude: pa.Array,
    columns: tuple[str, ...] = ("seq_hash", "length", "sequence"),
) -> pa.Table:
    """Distinct sequences of the given ingest runs, minus ``exclude``, longest first (``columns`` of seq_hash,
    length, sequence), as one table in memory: for small sets, or for the hashes alone (a run's missing
    sequences: ``columns=("seq_hash",)`` leaves the residues on disk); a plan streams them (:class:`Pending`)."""
    pending = Pending(store, ingest_runs, exclude)
    if not pending.members():
        return PLAN_SCHEMA.empty_table().select(list(columns))
    unknown = set(columns) - {"seq_hash", "length", "sequence"}
    if unknown or not columns:
        raise ValueError(f"pending_sequences: no column {sorted(unknown)} (seq_hash, length, sequence)")
    con = objects.duckdb_connection()
    try:
        con.register("excluded", pa.table({"seq_hash": exclude.cast(pa.string())}))
        selected = ", ".join(f"s.{c}" for c in columns)
        return fetch_arrow(con, pending.sql(selected, ordered=True))
    finally:
        con.close()


def length_counts(pending: Pending) -> list[tuple[int, int]]:
    """``(length, sequences)`` of the pending set, longest first: all the shard cutting policy needs."""
    return pending.counts


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
    rows = (todo.take(pa.array(indices, pa.int64())) for indices in shards)
    return _write_shards(store, run_id, rows, cost, first_shard)


def write_pending_plan(
    store: Store,
    run_id: str,
    pending: Pending,
    sizes: list[int],
    cost: Callable[[int], float],
    first_shard: int = 0,
) -> Plan:
    """Write ``pending``, longest first, as the run's plan, atomically: shard ``first_shard + i`` (row group
    ``i``) takes the next ``sizes[i]`` sequences. The rows stream into the file a shard at a time
    (:meth:`Pending.longest_first`); ``sizes`` must add up to the pending set (cut from its
    :func:`length_counts`)."""
    batches = (
        (batch for table in pending.longest_first() for batch in table.to_batches()) if sizes else iter(())
    )
    return _write_shards(store, run_id, _cut_stream(batches, sizes), cost, first_shard)


def _write_shards(
    store: Store, run_id: str, shards: Iterable[pa.Table], cost: Callable[[int], float], first_shard: int
) -> Plan:
    """The plan file both writers commit: each of ``shards`` (rows of PLAN_SCHEMA less shard_id) as one row
    group, shard ids from ``first_shard``; read back with its sizes and costs."""
    sink = ParquetSink(
        store.plan_path(run_id),
        PLAN_SCHEMA,
        "plan",
        {"run_id": run_id, "plan_id": uuid.uuid4().hex[:16], "first_shard": first_shard},
        row_group_rows=MAX_SHARD_SEQUENCES + 1,
    )
    try:
        for shard_id, rows in enumerate(shards):
            ids = pa.array([first_shard + shard_id] * rows.num_rows, pa.int32())
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
    plan = Plan(path, provenance.get("plan_id", ""), shards, first)
    plan._file = pf
    return plan


def covers(plan: Plan, pending: Pending | pa.Array) -> bool:
    """Whether every pending sequence (or every one of the given hashes) is in the plan (else the plan is
    stale: rebuild it). For :class:`Pending`, one DuckDB aggregation over the hashes of the members, the
    sequences and the plan (read in one scan) and the exclusions: it spills to disk, where two hash joins
    held at once, or a union of three scans, run out of DuckDB's memory on 10^7 sequences."""
    if not isinstance(pending, Pending):
        return pc.all(pc.is_in(pending, value_set=plan.hashes())).as_py() is not False
    members = pending.members()
    if not members:
        return True
    sequences = pending.store.files("sequences")
    source = (
        f"CASE WHEN filename IN ({file_list(members)[1:-1]}) THEN 1 "
        f"WHEN filename IN ({file_list(sequences)[1:-1]}) THEN 2 ELSE 8 END"
    )
    with pending.connection() as (con, _):
        [(missing,)] = con.execute(
            f"""
            SELECT count(*) FROM (
                SELECT bit_or(source) AS found FROM (
                    SELECT seq_hash, {source} AS source
                    FROM read_parquet({file_list([*members, *sequences, plan.path])}, filename = true,
                                      union_by_name = true)
                    UNION ALL SELECT seq_hash, 4 FROM excluded
                ) GROUP BY seq_hash
            ) WHERE found & 3 = 3 AND found & 12 = 0
            """
        ).fetchall()
    return missing == 0


def claimed_by_others(store: Store, model_sha: str, run_id: str) -> pa.Array:
    """Sequences in the plans of other runs that hold a live lease on these weights."""
    claimed = [pa.array([], pa.string())]
    for lease in leases(store, model_sha):
        if lease.run_id != run_id and lease.live():
            path = store.plan_path(lease.run_id)
            if path.exists():
                claimed.append(objects.read_table(path, columns=["seq_hash"]).column(0).combine_chunks())
    return pa.concat_arrays(claimed)
