"""Several writers on one store at once: real `proteoflow` processes started together, then the store is
compared with what running them one after another gives (one row per key, nothing lost)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ECOLI, ROOT, read_fasta_records, require_shared

from storage.catalog import query
from storage.objects import as_path

TRIALS = 3


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory) -> tuple[Path, Path]:
    """Two slices of the E. coli proteome that share a third of their records."""
    records = read_fasta_records(require_shared(ECOLI))
    tmp = tmp_path_factory.mktemp("overlap")
    a, b = tmp / "a.fasta", tmp / "b.fasta"
    a.write_text("".join(f">{h}\n{s}\n" for h, s in records[:1500]))
    b.write_text("".join(f">{h}\n{s}\n" for h, s in records[1000:2500]))
    return a, b


def test_overlapping_ingests_at_once_store_each_sequence_once(overlapping, tmp_path) -> None:
    a, b = overlapping
    for trial in range(TRIALS):
        store = tmp_path / f"store{trial}"
        first, second = (
            _start("ingest", str(a), "--store", str(store)),
            _start("ingest", str(b), "--store", str(store)),
        )
        _finish(first)
        _finish(second)
        [(rows, distinct)] = query(store, "SELECT count(*), count(DISTINCT seq_hash) FROM sequences")[1]
        [(wanted,)] = query(store, "SELECT count(DISTINCT seq_hash) FROM members")[1]
        assert rows == distinct == wanted, (trial, rows, distinct, wanted)
        [(members,)] = query(store, "SELECT count(*) FROM members")[1]
        assert members == 3000


def test_the_same_input_ingested_twice_at_once_is_one_run(overlapping, tmp_path) -> None:
    a, _ = overlapping
    store = tmp_path / "store"
    procs = [_start("ingest", str(a), "--store", str(store), "--json") for _ in range(2)]
    for proc in procs:
        _finish(proc)
    assert query(store, "SELECT count(*) FROM runs")[1] == [(1,)]
    [(rows, distinct, members)] = query(
        store, "SELECT (SELECT count(*) FROM sequences), (SELECT count(DISTINCT seq_hash) FROM sequences), "
        "(SELECT count(*) FROM members)"
    )[1]  # fmt: skip
    assert rows == distinct and members == 1500


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overlapping_embeds_at_once_compute_each_sequence_once(tiny_esm2, tmp_path, where, request) -> None:
    """Two `embed` runs whose inputs overlap, started together: one row per (sequence, layer, pooling), and
    a sequence computed by one run is not computed by the other (the second skips what the first claimed and
    waits for it). On a local disk (O_EXCL locks) and on a real S3 server (write-then-list locks)."""
    records = read_fasta_records(require_shared(ECOLI))[::7]
    a, b = tmp_path / "a.fasta", tmp_path / "b.fasta"
    a.write_text("".join(f">{h}\n{s[:300]}\n" for h, s in records[:50]))
    b.write_text("".join(f">{h}\n{s[:300]}\n" for h, s in records[20:80]))
    if where == "s3":
        request.getfixturevalue("s3_server")
        store = as_path(f"s3://proteoflow-tests/concurrent-{uuid.uuid4().hex[:8]}")
    else:
        store = tmp_path / "store"
    common = ["--store", str(store), "--model", str(tiny_esm2), "--workers", "1", "--no-progress"]
    slow = {"PROTEOFLOW_SHARD_DELAY_S": "2"}  # both runs' compute phases overlap for certain
    first, second = _start("embed", str(a), *common, env=slow), _start("embed", str(b), *common, env=slow)
    _finish(first)
    _finish(second)
    [(rows, keys, sequences)] = query(
        store, "SELECT count(*), count(DISTINCT (seq_hash, layer, pooling)), count(DISTINCT seq_hash) FROM embeddings"
    )[1]  # fmt: skip
    [(wanted,)] = query(store, "SELECT count(DISTINCT seq_hash) FROM members")[1]
    assert rows == keys == sequences == wanted
    statuses = query(store, "SELECT status FROM runs WHERE kind = 'embed'")[1]
    assert statuses == [("completed",), ("completed",)]
    logs = sorted((store / "logs").glob("embed-*.log"))  # the full log of each run, kept beside its results
    assert len(logs) == 2 and all("Beginning flow run" in log.read_text() for log in logs)


def test_concurrent_embeds_with_different_options_both_complete_without_duplicates(
    tiny_esm2, tmp_path
) -> None:
    """Same weights, same input, different poolings at once: the second skips what the first claimed, then
    computes the rows the first did not write (bos) itself; no row is written twice."""
    records = read_fasta_records(require_shared(ECOLI))[::11][:40]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{h}\n{s[:300]}\n" for h, s in records))
    store = tmp_path / "store"
    common = ["--store", str(store), "--model", str(tiny_esm2), "--workers", "1", "--no-progress"]
    slow = {"PROTEOFLOW_SHARD_DELAY_S": "1"}
    first = _start("embed", str(fasta), *common, "--pooling", "mean", env=slow)
    second = _start("embed", str(fasta), *common, "--pooling", "mean,bos", env=slow)
    _finish(first)
    _finish(second)
    [(rows, keys)] = query(
        store, "SELECT count(*), count(DISTINCT (seq_hash, layer, pooling)) FROM embeddings"
    )[1]
    [(wanted,)] = query(store, "SELECT count(DISTINCT seq_hash) FROM members")[1]
    assert rows == keys == 2 * wanted
    assert query(store, "SELECT status FROM runs WHERE kind = 'embed'")[1] == [("completed",), ("completed",)]
