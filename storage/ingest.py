"""FASTA ingest: stream records into ``members``/``rejected`` and add unseen sequences to ``sequences``.

Two passes keep memory flat whatever the input size. Pass 1 streams every record once: validates,
hashes, writes member and rejected rows, and spills ``(seq_hash, sequence)`` into 256 hash-prefix buckets
on disk. Pass 2 takes one bucket at a time, deduplicates it and drops hashes already in the store (read
from the row groups whose min/max statistics overlap the bucket), then appends the survivors, sorted by
hash, to one new ``sequences`` file. Everything is staged and committed by rename at the end, so a
failed input writes nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.fasta import InputError, Source, iter_records, parse_header, resolve_sources
from storage.layout import ParquetSink, Store, staging
from storage.normalize import NUCLEOTIDE_LETTERS, normalize, validate
from storage.runs import RunRecord, load_run

MEMBER_SCHEMA = pa.schema([
    ("record_index", pa.int64()), ("seq_id", pa.string()), ("description", pa.string()),
    ("seq_hash", pa.string()), ("length", pa.int32()), ("source", pa.string()),
])
REJECTED_SCHEMA = pa.schema([
    ("record_index", pa.int64()), ("seq_id", pa.string()), ("description", pa.string()),
    ("source", pa.string()), ("rule", pa.string()), ("reason", pa.string()), ("length", pa.int32()),
])
SEQUENCE_SCHEMA = pa.schema([("seq_hash", pa.string()), ("sequence", pa.string()), ("length", pa.int32())])
SPILL_SCHEMA = pa.schema([("seq_hash", pa.string()), ("sequence", pa.string())])

BUCKETS = 256
SEEN_CAP = 500_000  # hashes remembered in memory to avoid spilling repeats; beyond it, pass 2 dedups
SPILL_FLUSH_BYTES = 32 << 20
BATCH_ROWS = 65_536
NUCLEOTIDE_SNIFF_RESIDUES = 10_000
NUCLEOTIDE_FRACTION = 0.9

ProgressFn = Callable[[dict], None]


@dataclass
class IngestResult:
    """The outcome of one ingest: its run id, counts, and whether it was already in the store."""

    run_id: str
    counts: dict
    already_ingested: bool = False
    skipped_files: list[str] = field(default_factory=list)


class _Columns:
    """Column buffers for one table, flushed to a sink in batches."""

    def __init__(self, sink: ParquetSink) -> None:
        self.sink = sink
        self.cols: dict[str, list] = {name: [] for name in sink.schema.names}

    def append(self, *values) -> None:
        for col, value in zip(self.cols.values(), values, strict=True):
            col.append(value)
        if len(self.cols["record_index"]) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.cols["record_index"]:
            self.sink.write_columns(self.cols)
            self.cols = {name: [] for name in self.cols}


class _Spill:
    """Hash-prefix buckets of ``(seq_hash, sequence)`` on disk, written as Arrow IPC streams."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.buffers: list[tuple[list[str], list[str]]] = [([], []) for _ in range(BUCKETS)]
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.buffered = 0

    def add(self, digest: str, sequence: str) -> None:
        hashes, seqs = self.buffers[int(digest[:2], 16)]
        hashes.append(digest)
        seqs.append(sequence)
        self.buffered += len(sequence) + 48
        if self.buffered >= SPILL_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        for bucket, (hashes, seqs) in enumerate(self.buffers):
            if not hashes:
                continue
            writer = self.writers.get(bucket)
            if writer is None:
                writer = pa.ipc.new_stream(str(self.path(bucket)), SPILL_SCHEMA)
                self.writers[bucket] = writer
            writer.write_batch(pa.RecordBatch.from_pydict({"seq_hash": hashes, "sequence": seqs}, schema=SPILL_SCHEMA))
            self.buffers[bucket] = ([], [])
        self.buffered = 0

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
            pf = pq.ParquetFile(path)
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


def ingest(store: Store, inputs: list[str], run_id: str | None = None, min_length: int | None = None,
           max_length: int | None = None, progress: ProgressFn | None = None) -> IngestResult:
    """Ingest FASTA inputs into the store; see the module docstring for how.

    The run id defaults to a digest of the input content and parameters, so ingesting the same input
    again is recognised and changes nothing.
    """
    sources, skipped = resolve_sources(inputs)
    store.ensure()
    params = {"inputs": [s.name for s in sources], "min_length": min_length, "max_length": max_length}
    with staging(store, "ingest") as scratch:
        pass1 = _stream_records(scratch, sources, min_length, max_length, progress)
        digest = pass1.digest.hexdigest()
        run_id = run_id or f"ingest-{digest[:16]}"
        params["input_digest"] = digest
        previous = load_run(store, run_id)
        if previous is not None and previous.status == "completed":
            pass1.abort()
            if previous.params.get("input_digest") != digest:
                raise InputError(f"run id {run_id!r} already holds a different input; choose another --run-id")
            return IngestResult(run_id, previous.counts, already_ingested=True, skipped_files=skipped)
        record = RunRecord(run_id=run_id, kind="ingest", params=params)
        counts = _dedup_and_commit(store, scratch, pass1, run_id, record)
    counts["skipped_files"] = len(skipped)
    record.counts = counts
    record.finish(store, "completed")
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


def _stream_records(scratch: Path, sources: list[Source], min_length: int | None, max_length: int | None,
                    progress: ProgressFn | None) -> _Pass1:
    """Pass 1: read every record once, write members/rejected to staging and spill sequences by hash."""
    members_sink = ParquetSink(scratch / ".members.parquet", MEMBER_SCHEMA, "members")
    rejected_sink = ParquetSink(scratch / ".rejected.parquet", REJECTED_SCHEMA, "rejected")
    state = _Pass1(members_sink, rejected_sink, _Spill(scratch), hashlib.sha1(usedforsecurity=False),
                   Counter(), Counter())
    members, rejected = _Columns(members_sink), _Columns(rejected_sink)
    seen: set[str] = set()
    counts = state.counts
    bytes_read = [0]
    last_report = [time.monotonic()]

    def on_bytes(block: bytes) -> None:
        state.digest.update(block)
        bytes_read[0] += len(block)

    index = 0
    try:
        for source in sources:
            state.digest.update(b"\x00source\x00")
            nuc_letters = sniffed = 0
            for header, raw in iter_records(source, on_bytes):
                seq = normalize(raw)
                seq_id, description = parse_header(header)
                rejection = validate(seq, min_length, max_length)
                if rejection is not None:
                    rejected.append(index, seq_id, description, source.name, rejection.rule, rejection.reason, len(seq))
                    state.rejected_by_rule[rejection.rule] += 1
                else:
                    if sniffed < NUCLEOTIDE_SNIFF_RESIDUES:
                        sniffed += len(seq)
                        nuc_letters += len(seq) - len(seq.translate(None, NUCLEOTIDE_LETTERS))
                        if sniffed >= NUCLEOTIDE_SNIFF_RESIDUES:
                            _refuse_nucleotides(source, nuc_letters, sniffed)
                    digest = hashlib.md5(seq, usedforsecurity=False).hexdigest()
                    members.append(index, seq_id, description, digest, len(seq), source.name)
                    counts["residues"] += len(seq)
                    if digest not in seen:
                        if len(seen) < SEEN_CAP:
                            seen.add(digest)
                        state.spill.add(digest, seq.decode("ascii"))
                index += 1
                if progress is not None and not index & 4095 and time.monotonic() - last_report[0] > 0.5:
                    last_report[0] = time.monotonic()
                    progress({"records": index, "bytes": bytes_read[0], "source": source.name})
            if 0 < sniffed < NUCLEOTIDE_SNIFF_RESIDUES:
                _refuse_nucleotides(source, nuc_letters, sniffed, min_residues=20)
        members.flush()
        rejected.flush()
        state.spill.close()
        members_sink.close()
        rejected_sink.close()
    except BaseException:
        state.abort()
        raise
    counts["records"] = index
    counts["bytes"] = bytes_read[0]
    counts["accepted"] = members_sink.rows
    counts["rejected"] = rejected_sink.rows
    if progress is not None:
        progress({"records": index, "bytes": bytes_read[0], "source": "", "done": True})
    return state


def _refuse_nucleotides(source: Source, nuc: int, total: int, min_residues: int = 0) -> None:
    if total >= min_residues and nuc >= NUCLEOTIDE_FRACTION * total:
        name = "<stdin>" if source.is_stdin else source.name
        raise InputError(
            f"{name}: looks like nucleotide sequence ({100 * nuc / total:.0f}% A/C/G/T/U/N in the first {total:,} "
            "residues); translate it to protein first (e.g. Prodigal for genomes, Bio.Seq.translate for CDS)"
        )


def _dedup_and_commit(store: Store, scratch: Path, pass1: _Pass1, run_id: str, record: RunRecord) -> dict:
    """Pass 2: per bucket, dedup and anti-join against the store; then commit every file by rename."""
    final_seq = store.table_dir("sequences") / f"{run_id}.parquet"
    # A crashed earlier attempt of this same run may have committed its sequences file: it is rewritten
    # below, so it must not count as "already in the store".
    existing = StoreHashes([p for p in store.files("sequences") if p != final_seq])
    provenance = {"run_id": run_id, "inputs": record.params["inputs"]}
    seq_sink = ParquetSink(final_seq, SEQUENCE_SCHEMA, "sequences", provenance)
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
    counts = dict(pass1.counts)
    counts.update({
        "distinct": distinct, "duplicates": counts["accepted"] - distinct, "new_sequences": new,
        "already_in_store": distinct - new, "new_residues": new_residues,
        "rejected_by_rule": dict(sorted(pass1.rejected_by_rule.items())),
    })
    if new:
        seq_sink.commit()
    else:
        seq_sink.abort()
    for sink, table in ((pass1.members, "members"), (pass1.rejected, "rejected")):
        target = store.table_dir(table) / f"run_id={run_id}" / "part-0.parquet"
        if sink.rows:
            sink.commit(target)
        else:
            sink.abort()
            target.unlink(missing_ok=True)
    return counts
