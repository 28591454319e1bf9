"""Turn one block of raw FASTA records into Arrow batches of accepted and rejected rows.

A pure function of its inputs, so blocks can be worked in parallel processes and reassembled in
order: record indices come from the caller, who counts records before handing a block out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from storage.fasta import parse_headers, read_chunk
from storage.normalize import find_rejections, normalize_many
from storage.schemas import ACCEPTED_SCHEMA, REJECTED_SCHEMA


@dataclass
class Block:
    """What one block of records became: accepted rows (with their sequences) and rejected rows."""

    source: str
    digest: bytes  # SHA-1 of the chunk's bytes: the run's content digest is built from these, in order
    records: int
    accepted: pa.RecordBatch
    rejected: pa.RecordBatch
    residues: int


_MEMO: dict[str, set[str]] = {}
MEMO_CAP = 100_000


def _memo(token: str) -> set[str]:
    """Hashes whose sequence this process already returned during ingest ``token`` (one ingest at a time)."""
    if token not in _MEMO:
        _MEMO.clear()
        _MEMO[token] = set()
    return _MEMO[token]


def process_chunk(
    chunk: bytes, source: str, min_length: int | None = None, max_length: int | None = None, token: str = ""
) -> Block:
    """Normalize, validate and hash every record of a chunk (records without their leading '>').

    ``record_index`` in the result counts from 0 within the chunk; the caller adds the chunk's offset.
    ``sequence`` is null for a hash whose sequence this process already returned during the same ingest
    (``token``): repeats cost no transfer, and the caller has that sequence already.
    """
    parts = [rec.partition(b"\n") for rec in chunk.split(b"\n>")]
    count = len(parts)
    seqs = normalize_many([p[2] for p in parts])
    ids, descriptions = parse_headers([p[0] for p in parts])
    rejections = find_rejections(seqs, min_length, max_length)
    rejected_at = pa.array(list(rejections), pa.int64())
    rejected = pa.RecordBatch.from_pydict(
        {
            "record_index": rejected_at,
            "seq_id": ids.take(rejected_at),
            "description": descriptions.take(rejected_at),
            "source": [source] * len(rejections),
            "rule": [r.rule for r in rejections.values()],
            "reason": [r.reason for r in rejections.values()],
            "length": [len(seqs[i]) for i in rejections],
        },
        schema=REJECTED_SCHEMA,
    )
    if rejections:
        kept = pa.array([i for i in range(count) if i not in rejections], pa.int64())
        ids, descriptions = ids.take(kept), descriptions.take(kept)
        seqs = [seqs[i] for i in kept.to_pylist()]
    else:
        kept = pa.array(range(count), pa.int64())
    md5 = hashlib.md5  # a content address, not a security check
    sequences = pa.array(seqs, pa.binary()).cast(pa.string())  # ASCII by construction (alphabet checked)
    hashes = [md5(s).hexdigest() for s in seqs]
    memo = _memo(token)
    fresh = [h not in memo for h in hashes]
    if not all(fresh):
        memo.update(h for h, new in zip(hashes, fresh, strict=True) if new and len(memo) < MEMO_CAP)
        lengths = pc.binary_length(sequences)
        sequences = pc.if_else(pa.array(fresh), sequences, pa.scalar(None, pa.string()))
    else:
        if len(memo) < MEMO_CAP:
            memo.update(hashes)
        lengths = pc.binary_length(sequences)
    accepted = pa.RecordBatch.from_pydict(
        {
            "record_index": kept,
            "seq_id": ids,
            "description": descriptions,
            "seq_hash": hashes,
            "length": lengths,
            "source": pa.array([source] * len(seqs), pa.string()),
            "sequence": sequences,
        },
        schema=ACCEPTED_SCHEMA,
    )
    return Block(
        source,
        hashlib.sha1(chunk).digest(),
        count,
        accepted,
        rejected,
        pc.sum(accepted.column("length")).as_py() or 0,
    )


def process_file_chunk(
    path: str,
    offset: int,
    length: int,
    source: str,
    min_length: int | None = None,
    max_length: int | None = None,
    token: str = "",
) -> Block:
    """:func:`process_chunk` on a chunk the worker reads itself from a plain file (no bytes shipped to it)."""
    return process_chunk(read_chunk(path, offset, length), source, min_length, max_length, token)
