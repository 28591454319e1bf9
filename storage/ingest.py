"""FASTA ingest: stream records into ``members``/``rejected`` and add unseen sequences to ``sequences``.

Two passes keep memory flat whatever the input size. Pass 1 streams every record once: validates,
hashes, writes member and rejected rows, and spills ``(seq_hash, sequence)`` into 256 hash-prefix buckets
on disk. Pass 2 takes one bucket at a time, deduplicates it and drops hashes already in the store (read
from the row groups whose min/max statistics overlap the bucket), then appends the survivors, sorted by
hash, to one new ``sequences`` file. Everything is staged and committed by rename at the end, so a
failed input writes nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import objects
from storage.catalog import write_catalog
from storage.fasta import (
    InputError,
    Source,
    is_plain_file,
    iter_record_chunks,
    plan_file_chunks,
    resolve_sources,
)
from storage.layout import ParquetSink, Store, staging
from storage.locks import StoreLock
from storage.normalize import NUCLEOTIDE_LETTERS
from storage.objects import is_uri
from storage.records import process_chunk, process_file_chunk
from storage.runs import IngestCounts, RunRecord, load_run
from storage.schemas import MEMBER_SCHEMA, REJECTED_SCHEMA, SEQUENCE_SCHEMA

SPILL_SCHEMA = pa.schema([("seq_hash", pa.string()), ("sequence", pa.string())])

BUCKETS = 256
SEQUENCE_ROW_GROUP_ROWS = 16_384  # ~5 MB of residues: bounded memory, still large enough for scans
SEEN_CAP = 100_000  # hashes remembered to avoid spilling repeats (~10 MB); beyond it, pass 2 dedups
SPILL_FLUSH_BYTES = 8 << 20  # sorted and split by bucket at each flush: bounds pass-1 memory
PARALLEL_MIN_BYTES = 32 << 20
NUCLEOTIDE_SNIFF_RESIDUES = 10_000
NUCLEOTIDE_FRACTION = 0.9

ProgressFn = Callable[[dict], None]


@dataclass
class IngestResult:
    """The outcome of one ingest: its run id, counts, and whether it was already in the store."""

    run_id: str
    counts: IngestCounts
    already_ingested: bool = False
    skipped_files: list[str] = field(default_factory=list)


class _Spill:
    """Hash-prefix buckets of ``(seq_hash, sequence)`` on disk, written as Arrow IPC streams."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pending: list[pa.RecordBatch] = []
        self.buffered = 0
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.buffered += batch.nbytes
        if self.buffered >= SPILL_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Sort what is buffered by hash and append each bucket's run to that bucket's file."""
        if not self.pending:
            return
        table = pa.Table.from_batches(self.pending, schema=SPILL_SCHEMA).combine_chunks()
        table = table.take(pc.sort_indices(table, [("seq_hash", "ascending")]))
        prefixes = pc.utf8_slice_codeunits(table.column("seq_hash"), 0, 2)
        offset = 0
        for item in pc.value_counts(prefixes):
            bucket, count = int(item["values"].as_py(), 16), item["counts"].as_py()
            writer = self.writers.get(bucket)
            if writer is None:
                writer = pa.ipc.new_stream(str(self.path(bucket)), SPILL_SCHEMA)
                self.writers[bucket] = writer
            writer.write_table(table.slice(offset, count))
            offset += count
        self.pending, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        for writer in self.writers.values():
            writer.close()

    def path(self, bucket: int) -> Path:
        return self.directory / f"bucket-{bucket:02x}.arrow"

    def read(self, bucket: int) -> pa.Table | None:
        if bucket not in self.writers:
            return None
        with pa.ipc.open_stream(str(self.path(bucket))) as reader:
            return reader.read_all()


class StoreHashes:
    """Look up which hashes the store already holds, one hash-prefix range at a time.

    Reads only the ``seq_hash`` column of row groups whose statistics overlap the range, so memory is
    bounded by one bucket's worth of hashes, not the store's size.
    """

    def __init__(self, files: list[Path]) -> None:
        self.groups: list[tuple[pq.ParquetFile, int, str, str]] = []
        for path in files:
            pf = objects.parquet_file(path)
            col = pf.schema_arrow.get_field_index("seq_hash")
            for rg in range(pf.metadata.num_row_groups):
                stats = pf.metadata.row_group(rg).column(col).statistics
                if stats is None or not stats.has_min_max:
                    lo, hi = "", "~"
                else:
                    lo, hi = stats.min, stats.max
                self.groups.append((pf, rg, lo, hi))
        self._cache: dict[tuple[int, int], pa.Array] = {}

    def in_range(self, lo: str, hi: str) -> pa.Array:
        """All stored hashes h with lo <= h < hi."""
        chunks = []
        for pf, rg, gmin, gmax in self.groups:
            if gmax < lo or gmin >= hi:
                continue
            key = (id(pf), rg)
            if key not in self._cache:
                self._cache = {key: pf.read_row_group(rg, columns=["seq_hash"]).column(0).combine_chunks()}
            hashes = self._cache[key]
            mask = pc.and_(pc.greater_equal(hashes, lo), pc.less(hashes, hi))
            chunks.append(hashes.filter(mask))
        if not chunks:
            return pa.array([], pa.string())
        return pa.concat_arrays(chunks)


def _sorted_unique(table: pa.Table) -> pa.Table:
    """Sort a bucket by hash and keep the first row of each hash."""
    table = table.take(pc.sort_indices(table, [("seq_hash", "ascending")]))
    hashes = table.column("seq_hash").combine_chunks()
    if len(hashes) < 2:
        return table
    differs = pc.not_equal(hashes.slice(1), hashes.slice(0, len(hashes) - 1))
    keep = pa.concat_arrays([pa.array([True]), differs])
    return table.filter(keep)


def ingest(
    store: Store,
    inputs: list[str],
    run_id: str | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
) -> IngestResult:
    """Ingest FASTA inputs into the store; see the module docstring for how.

    The run id defaults to a digest of the input content and parameters, so ingesting the same input
    again is recognised and changes nothing.
    """
    sources, skipped = resolve_sources(inputs)
    existed, was_store = store.root.exists(), store.exists()
    try:
        if workers is None:
            workers = default_workers(sources)
        return _ingest(store, sources, skipped, run_id, min_length, max_length, progress, workers)
    except BaseException:
        if not was_store:  # a failed first ingest leaves no store behind: nothing written
            _remove_new_store(store, existed)
        raise


def _remove_new_store(store: Store, existed: bool) -> None:
    """Undo ``Store.ensure`` after a failed first ingest, never touching what was in the directory before."""
    if store.remote:  # nothing but the manifest is written before the commit
        (store.root / "proteoflow.json").unlink(missing_ok=True)
        return
    if not existed:
        shutil.rmtree(store.root, ignore_errors=True)
        return
    shutil.rmtree(store.root / ".staging", ignore_errors=True)
    (store.root / "proteoflow.json").unlink(missing_ok=True)
    for table in Store.TABLES:
        try:
            store.table_dir(table).rmdir()  # only if empty
        except OSError:
            pass


def _ingest(
    store: Store,
    sources: list[Source],
    skipped: list[str],
    run_id: str | None,
    min_length: int | None,
    max_length: int | None,
    progress: ProgressFn | None,
    workers: int,
) -> IngestResult:
    store.ensure()
    params = {"inputs": [s.name for s in sources], "min_length": min_length, "max_length": max_length}
    with staging(store, "ingest") as scratch:
        pass1 = _stream_records(scratch, sources, min_length, max_length, progress, workers)
        digest = pass1.digest.hexdigest()
        run_id = run_id or f"ingest-{digest[:16]}"
        params["input_digest"] = digest
        previous = load_run(store, run_id)
        if previous is not None and previous.status == "completed":
            pass1.abort()
            if previous.params.get("input_digest") != digest:
                raise InputError(
                    f"run id {run_id!r} already holds a different input; choose another --run-id"
                )
            return IngestResult(run_id, previous.counts, already_ingested=True, skipped_files=skipped)
        record = RunRecord(run_id=run_id, kind="ingest", params=params)
        deduped = _dedup(store, pass1, run_id, record)
        # The commit is the only step that must see every earlier commit: a short section under the lock.
        with StoreLock(store, "ingest"):
            previous = load_run(store, run_id)
            if previous is not None and previous.status == "completed":  # the same input, ingested meanwhile
                deduped.sink.abort()
                pass1.abort()
                return IngestResult(run_id, previous.counts, already_ingested=True, skipped_files=skipped)
            counts = _commit(store, deduped, pass1, run_id)
            counts.skipped_files = len(skipped)
            record.counts = counts
            record.finish(store, "completed")
    write_catalog(store.root)  # a new table's first file or a new run: catalog.sql answers for it at once
    return IngestResult(run_id, counts, skipped_files=skipped)


@dataclass
class _Pass1:
    members: ParquetSink
    rejected: ParquetSink
    spill: _Spill
    digest: Any
    counts: Counter
    rejected_by_rule: Counter

    def abort(self) -> None:
        self.members.abort()
        self.rejected.abort()


def _tune_worker_allocator() -> None:
    """Parse workers allocate and free several multi-megabyte buffers per block; glibc serves those with
    mmap/munmap by default, a page-fault storm (measured: 3.5 s of system time per GB of FASTA). Keep
    them in the heap instead. Workers only, and a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _ordered_map(tasks: Iterator[tuple[Callable, tuple]], workers: int) -> Iterator:
    """``fn(*args)`` for each task, in order; in ``workers`` processes with a bounded window, or inline."""
    if workers <= 1:
        for fn, args in tasks:
            yield fn(*args)
        return
    # fork is cheapest (no re-imports) but only safe while this process has no other threads; else spawn.
    method = (
        "fork"
        if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
        else "spawn"
    )
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=_tune_worker_allocator
    )
    try:
        pending: deque = deque()
        for fn, args in tasks:
            pending.append(pool.submit(fn, *args))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _offset(batch: pa.RecordBatch, first_index: int) -> pa.RecordBatch:
    """Shift a block's chunk-local record indices to run-wide ones."""
    column = batch.schema.get_field_index("record_index")
    return batch.set_column(column, "record_index", pc.add(batch.column(column), first_index))


def default_workers(sources: list[Source]) -> int:
    """Parallel parsing pays for its start-up only on large inputs (or stdin, whose size is unknown)."""
    cpus = min(os.cpu_count() or 1, 8)
    if cpus < 2:
        return 0
    remote = any(is_uri(s.name) for s in sources)  # streamed: one reader, whatever the size
    total = sum(0 if s.is_stdin or is_uri(s.name) else os.path.getsize(s.name) for s in sources)
    if remote:
        return 0
    return cpus if any(s.is_stdin for s in sources) or total >= PARALLEL_MIN_BYTES else 0


def _stream_records(
    scratch: Path,
    sources: list[Source],
    min_length: int | None,
    max_length: int | None,
    progress: ProgressFn | None,
    workers: int,
) -> _Pass1:
    """Pass 1: read every record once, write members/rejected to staging and spill sequences by hash."""
    members_sink = ParquetSink(scratch / ".members.parquet", MEMBER_SCHEMA, "members", background=True)
    rejected_sink = ParquetSink(scratch / ".rejected.parquet", REJECTED_SCHEMA, "rejected")
    state = _Pass1(
        members_sink,
        rejected_sink,
        _Spill(scratch),
        hashlib.sha1(usedforsecurity=False),
        Counter(),
        Counter(),
    )
    seen: set[str] = set()
    bytes_read = records = 0
    last_report = time.monotonic()

    def on_bytes(count: int) -> None:
        nonlocal bytes_read
        bytes_read += count

    token = uuid.uuid4().hex
    # Options that change what is accepted are part of the content digest (and so of the default run id).
    state.digest.update(f"min_length={min_length};max_length={max_length}".encode())
    origin: deque[int] = deque()  # source index of each chunk handed out, consumed in the same order

    def tasks() -> Iterator[tuple[Callable, tuple]]:
        for index, source in enumerate(sources):
            options = (source.name, min_length, max_length, token)
            if workers > 1 and is_plain_file(source):  # workers read their chunks themselves
                for offset, length in plan_file_chunks(source, on_bytes):
                    origin.append(index)
                    yield process_file_chunk, (source.name, offset, length, *options)
                continue
            for chunk in iter_record_chunks(source, on_bytes):
                origin.append(index)
                yield process_chunk, (chunk, *options)

    sniffers = [_NucleotideSniffer(s) for s in sources]
    current = -1
    try:
        for block in _ordered_map(tasks(), workers):
            index = origin.popleft()
            if index != current:  # digest = sources in order, each its chunks' digests in order
                state.digest.update(f"\x00source {index}\x00".encode())
                current = index
            state.digest.update(block.digest)
            accepted, rejected = _offset(block.accepted, records), _offset(block.rejected, records)
            records += block.records
            sniffers[index].check(accepted.column("sequence"))
            if rejected.num_rows:
                rejected_sink.write(rejected)
                state.rejected_by_rule.update(rejected.column("rule").to_pylist())
            members_sink.write(accepted.drop_columns(["sequence"]))
            state.counts["residues"] += block.residues
            hashes = accepted.column("seq_hash").to_pylist()
            delivered = accepted.column("sequence").is_valid().to_pylist()
            unseen = [ok and h not in seen for h, ok in zip(hashes, delivered, strict=True)]
            if any(unseen):
                seen.update(h for h, new in zip(hashes, unseen, strict=True) if new and len(seen) < SEEN_CAP)
                state.spill.add(accepted.filter(pa.array(unseen)).select(["seq_hash", "sequence"]))
            if progress is not None and time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                progress({"records": records, "bytes": bytes_read, "source": block.source})
        for sniffer in sniffers:
            sniffer.finish()
        state.spill.close()
        members_sink.close()
        rejected_sink.close()
    except BaseException:
        state.abort()
        raise
    state.counts.update(
        records=records, bytes=bytes_read, accepted=members_sink.rows, rejected=rejected_sink.rows
    )
    if progress is not None:
        progress({"records": records, "bytes": bytes_read, "source": "", "done": True})
    return state


class _NucleotideSniffer:
    """Refuses an input whose first residues are nearly all A/C/G/T/U/N: DNA or RNA given by mistake."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.total = self.nucleotides = 0

    def check(self, seqs: pa.Array) -> None:
        if self.total >= NUCLEOTIDE_SNIFF_RESIDUES:
            return
        for value in seqs[:1000].drop_null():
            seq = value.as_py().encode("ascii")
            self.total += len(seq)
            self.nucleotides += len(seq) - len(seq.translate(None, NUCLEOTIDE_LETTERS))
            if self.total >= NUCLEOTIDE_SNIFF_RESIDUES:
                _refuse_nucleotides(self.source, self.nucleotides, self.total)
                return

    def finish(self) -> None:
        if 0 < self.total < NUCLEOTIDE_SNIFF_RESIDUES:
            _refuse_nucleotides(self.source, self.nucleotides, self.total, min_residues=20)


def _refuse_nucleotides(source: Source, nuc: int, total: int, min_residues: int = 0) -> None:
    if total >= min_residues and nuc >= NUCLEOTIDE_FRACTION * total:
        name = "<stdin>" if source.is_stdin else source.name
        raise InputError(
            f"{name}: looks like nucleotide sequence ({100 * nuc / total:.0f}% A/C/G/T/U/N in the first {total:,} "
            "residues); translate it to protein first (e.g. Prodigal for genomes, Bio.Seq.translate for CDS)"
        )


@dataclass
class _Deduped:
    """Pass 2's result before its commit: the new sequences (closed, uncommitted) and the files they were
    deduplicated against."""

    sink: ParquetSink
    counts: IngestCounts
    seen: set[Path]


def _dedup(store: Store, pass1: _Pass1, run_id: str, record: RunRecord) -> _Deduped:
    """Pass 2: per bucket, dedup and anti-join against the store's sequences as they are now."""
    final_seq = store.table_dir("sequences") / f"{run_id}.parquet"
    # A crashed earlier attempt of this same run may have committed its sequences file: it is rewritten
    # below, so it must not count as "already in the store".
    seen = [p for p in store.files("sequences") if p != final_seq]
    existing = StoreHashes(seen)
    provenance = {"run_id": run_id, "inputs": record.params["inputs"]}
    seq_sink = ParquetSink(
        final_seq, SEQUENCE_SCHEMA, "sequences", provenance, row_group_rows=SEQUENCE_ROW_GROUP_ROWS
    )
    distinct = new = new_residues = 0
    try:
        for bucket in range(BUCKETS):
            table = pass1.spill.read(bucket)
            if table is None:
                continue
            table = _sorted_unique(table)
            distinct += table.num_rows
            prefix = f"{bucket:02x}"
            stored = existing.in_range(prefix, prefix + "g")
            if len(stored):
                table = table.filter(pc.invert(pc.is_in(table.column("seq_hash"), value_set=stored)))
            lengths = pc.utf8_length(table.column("sequence")).cast(pa.int32())
            new += table.num_rows
            new_residues += pc.sum(lengths).as_py() or 0
            seq_sink.write(table.append_column("length", lengths))
        seq_sink.close()
    except BaseException:
        seq_sink.abort()
        pass1.abort()
        raise
    counts = IngestCounts(
        **pass1.counts,
        distinct=distinct,
        duplicates=pass1.counts["accepted"] - distinct,
        new_sequences=new,
        already_in_store=distinct - new,
        new_residues=new_residues,
        rejected_by_rule=dict(sorted(pass1.rejected_by_rule.items())),
    )
    return _Deduped(seq_sink, counts, set(seen))


def _without_newer(store: Store, deduped: _Deduped) -> None:
    """Drop from the uncommitted sequences file those another writer committed since pass 2 read the store
    (called under the ingest lock; reads only the files committed in between)."""
    final = deduped.sink.final
    newer = [p for p in store.files("sequences") if p not in deduped.seen and p != final]
    if not newer or not deduped.counts.new_sequences:
        return
    theirs = pa.concat_tables(objects.read_table(p, columns=["seq_hash"]) for p in newer).column(0)
    ours = objects.read_table(deduped.sink.temp)
    keep = pc.invert(pc.is_in(ours.column("seq_hash"), value_set=theirs))
    kept = ours.filter(keep)
    dropped = ours.num_rows - kept.num_rows
    if not dropped:
        return
    deduped.sink.abort()
    deduped.sink = ParquetSink(final, SEQUENCE_SCHEMA, "sequences", json.loads(
        ours.schema.metadata[b"proteoflow.provenance"]), row_group_rows=SEQUENCE_ROW_GROUP_ROWS)  # fmt: skip
    deduped.sink.write(kept.replace_schema_metadata(None).cast(SEQUENCE_SCHEMA))
    deduped.sink.close()
    counts = deduped.counts
    counts.new_sequences -= dropped
    counts.already_in_store += dropped
    counts.new_residues = pc.sum(kept.column("length")).as_py() or 0


def _commit(store: Store, deduped: _Deduped, pass1: _Pass1, run_id: str) -> IngestCounts:
    """Commit sequences, members and rejected by rename (under the ingest lock)."""
    _without_newer(store, deduped)
    if deduped.counts.new_sequences:
        deduped.sink.commit()
    else:
        deduped.sink.abort()
    for sink, table in ((pass1.members, "members"), (pass1.rejected, "rejected")):
        target = store.run_dir(table, run_id) / "part-0.parquet"
        if sink.rows:
            sink.commit(target)
        else:
            sink.abort()
            target.unlink(missing_ok=True)
    return deduped.counts
