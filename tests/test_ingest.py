"""Ingest end to end: real data, the bad-input corpus, idempotency, directories and stdin."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ECOLI, MAG, read_fasta_records, require_shared, run_cli, write_slice

from storage.catalog import query
from storage.ingest import ingest
from storage.layout import Store
from storage.normalize import normalize_text, seq_hash, validate


def expected_hashes(*paths: Path) -> set[str]:
    """Independent computation of the distinct normalized sequences' MD5s."""
    out = set()
    for path in paths:
        for _, seq in read_fasta_records(path):
            norm = normalize_text(seq)
            if validate(norm.encode()) is None:
                out.add(hashlib.md5(norm.encode()).hexdigest())
    return out


def sql(store: Path, text: str) -> list[tuple]:
    return query(store, text)[1]


def store_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_both_shared_files_end_to_end(tmp_path: Path) -> None:
    ecoli, mag = require_shared(ECOLI), require_shared(MAG)
    store = tmp_path / "store"
    result = run_cli("ingest", str(ecoli), str(mag), "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["records"] == 4363 + 1916
    per_run = (
        sql(store, "SELECT count(*) FROM members")[0][0] + sql(store, "SELECT count(*) FROM rejected")[0][0]
    )
    assert per_run == summary["records"]
    by_source = dict(sql(store, "SELECT source, count(*) FROM members GROUP BY source"))
    assert by_source == {str(ecoli): 4363, str(mag): 1916}
    hashes = {h for (h,) in sql(store, "SELECT seq_hash FROM sequences")}
    assert sql(store, "SELECT count(*) FROM sequences")[0][0] == len(hashes)  # one row per distinct sequence
    assert hashes == expected_hashes(ecoli, mag)
    # the stored sequence really is the normalized one of its hash; MAG stops are stripped
    for h, s in sql(store, "SELECT seq_hash, sequence FROM sequences USING SAMPLE 50 ROWS"):
        assert seq_hash(s) == h and "*" not in s
    assert sql(store, "SELECT status FROM runs")[0][0] == "completed"
    assert summary["duplicates"] == summary["accepted"] - len(hashes)


def test_second_input_adds_only_new_sequences_and_reingest_is_idempotent(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = write_slice(ECOLI, tmp_path / "a.fasta", start=0, count=120)
    second = write_slice(ECOLI, tmp_path / "b.fasta", start=60, count=120)  # overlaps the first by 60
    r1 = ingest(Store(store), [str(first)])
    r2 = ingest(Store(store), [str(second)])
    assert r2.counts.already_in_store == 60 and r2.counts.new_sequences == 60
    assert sql(store, "SELECT count(*) FROM sequences")[0][0] == r1.counts.distinct + 60
    before = store_files(store)
    again = run_cli("ingest", str(second), "--store", str(store))
    assert again.returncode == 0 and b"already ingested" in again.stdout
    assert store_files(store) == before  # nothing rewritten
    assert sql(store, "SELECT count(*) FROM runs")[0][0] == 2
    assert sql(store, "SELECT count(*) FROM members")[0][0] == 240


def test_explicit_run_id_conflict_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    a = write_slice(ECOLI, tmp_path / "a.fasta", count=5)
    b = write_slice(ECOLI, tmp_path / "b.fasta", start=5, count=5)
    assert run_cli("ingest", str(a), "--store", str(store), "--run-id", "batch1").returncode == 0
    clash = run_cli("ingest", str(b), "--store", str(store), "--run-id", "batch1")
    assert clash.returncode == 2 and b"already holds a different input" in clash.stderr


BAD_RECORDS = """\
>ok1 plain
MKVLAAGIVAL
>ok2 lower case, inner whitespace and a terminal stop
mkv laa
giv*
>empty1 nothing at all
>stop1 internal stop
MKV*LAA
>gap1 dash
MKV-LAA
>gap2 dot
MK.VLAA
>digit1
MKVL4AA
>bad1 J is not an amino acid
MKVJAA
>bad2 two stops
MKV**
>short1
MK
>xbzuo all extended letters
XBZUOACD
>ok1 duplicate id and sequence
MKVLAAGIVAL
"""


def test_bad_record_corpus(tmp_path: Path) -> None:
    path = tmp_path / "bad.fasta"
    path.write_text(BAD_RECORDS)
    store = tmp_path / "store"
    result = ingest(Store(store), [str(path)], min_length=3)
    got = {
        seq_id: (rule, reason)
        for seq_id, rule, reason in sql(
            store, "SELECT seq_id, rule, reason FROM rejected ORDER BY record_index"
        )
    }
    assert got == {
        "empty1": ("empty", "empty sequence"),
        "stop1": ("internal_stop", "internal stop '*' at position 4"),
        "gap1": ("gap", "gap character '-' at position 4"),
        "gap2": ("gap", "gap character '.' at position 3"),
        "digit1": ("digit", "digit '4' at position 5"),
        "bad1": ("invalid_character", "character 'J' outside the protein alphabet at position 4"),
        "bad2": ("internal_stop", "internal stop '*' at position 4"),
        "short1": ("too_short", "length 2 is below --min-length 3"),
    }
    members = sql(store, "SELECT record_index, seq_id, length FROM members ORDER BY record_index")
    assert members == [(0, "ok1", 11), (1, "ok2", 9), (10, "xbzuo", 8), (11, "ok1", 11)]
    assert result.counts.records == 12 == len(members) + len(got)
    assert result.counts.duplicates == 1
    assert sql(store, "SELECT sequence FROM sequences WHERE length = 9")[0][0] == "MKVLAAGIV"
    long_store = tmp_path / "store2"
    ingest(Store(long_store), [str(path)], max_length=10)
    assert sql(long_store, "SELECT seq_id, reason FROM rejected WHERE rule = 'too_long'") == [
        ("ok1", "length 11 is above --max-length 10"),
        ("ok1", "length 11 is above --max-length 10"),
    ]


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, bytes]]:
    real = write_slice(ECOLI, tmp / "real.fasta", count=30)
    gz = tmp / "real.fasta.gz"
    gz.write_bytes(gzip.compress(real.read_bytes()))
    truncated = tmp / "truncated.fasta.gz"
    truncated.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    corrupt = tmp / "corrupt.fasta.gz"
    data = bytearray(gz.read_bytes())
    data[40:60] = b"\xff" * 20
    corrupt.write_bytes(bytes(data))
    binary = tmp / "binary.fasta"
    binary.write_bytes(bytes(range(256)) * 8)
    fastq = tmp / "reads.fastq"
    fastq.write_text("@read1\nMKVLAAG\n+\nIIIIIII\n")
    preamble = tmp / "preamble.fasta"
    preamble.write_text("# exported by a tool\n>p1\nMKVL\n")
    nucleotide = tmp / "genes.fasta"
    nucleotide.write_text(
        ">gene1\nATGAAAGTACTGGCAGCAGGTATTGTTGCACTGTAA\n>gene2\nATGCGTAAACTGGTTGCAGCAGGTGCAGGTTAA\n"
    )
    return {
        "missing file": (tmp / "nope.fasta", b"no such file"),
        "binary data": (binary, b"binary data"),
        "FASTQ": (fastq, b"FASTQ"),
        "truncated gzip": (truncated, b"truncated gzip"),
        "corrupt gzip": (corrupt, b"gzip"),
        "text before '>'": (preamble, b"text before the first '>'"),
        "nucleotides": (nucleotide, b"translate it to protein first"),
    }


def test_inputs_that_cannot_be_fasta_fail_cleanly_and_write_nothing(tmp_path: Path) -> None:
    require_shared(ECOLI)
    cases = _bad_inputs(tmp_path)
    store = tmp_path / "store"
    good = write_slice(ECOLI, tmp_path / "good.fasta", start=100, count=10)
    assert run_cli("ingest", str(good), "--store", str(store)).returncode == 0
    before = store_files(store)
    for label, (path, message) in cases.items():
        # the bad input is second, after a good one: the good records must not be committed either
        result = run_cli("ingest", str(good), str(path), "--store", str(store))
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2, label
        assert err and err[-1].startswith(b"proteoflow ingest: error:") and message in err[-1], (label, err)
        assert b"Traceback" not in result.stderr, label
        assert store_files(store) == before, label
    fresh = tmp_path / "fresh"
    assert run_cli("ingest", str(cases["FASTQ"][0]), "--store", str(fresh)).returncode == 2
    assert not fresh.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file; permission test needs a normal user")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.fasta"
    path.write_text(">a\nMKV\n")
    path.chmod(0)
    result = run_cli("ingest", str(path), "--store", str(tmp_path / "s"))
    assert result.returncode == 2 and b"permission denied" in result.stderr


def test_directories_gzip_and_stdin(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_slice(ECOLI, folder / "a.fasta", count=20)
    plain = write_slice(MAG, tmp_path / "m.faa", count=20)
    (folder / "sub" / "b.faa.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (folder / "README.txt").write_text("not fasta")
    store = tmp_path / "store"
    result = run_cli("ingest", str(folder), "--store", str(store))
    assert result.returncode == 0, result.stderr
    assert b"skipped" in result.stderr and b"README.txt" in result.stderr
    assert sql(store, "SELECT count(*) FROM members")[0][0] == 40
    stdin_source = write_slice(ECOLI, tmp_path / "c.fasta", start=500, count=7)
    piped = run_cli("ingest", "-", "--store", str(store), "--json", input=stdin_source.read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["new_sequences"] == 7
    run_id = json.loads(piped.stdout)["run_id"]
    assert sql(store, f"SELECT DISTINCT source FROM members WHERE run_id = '{run_id}'") == [("-",)]


def test_parquet_files_carry_schema_provenance_and_zstd(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ingest(Store(store), [str(write_slice(ECOLI, tmp_path / "a.fasta", count=50))])
    [seq_file] = Store(store).files("sequences")
    meta = pq.ParquetFile(seq_file).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    kv = meta.metadata
    assert kv[b"proteoflow.kind"] == b"sequences"
    assert json.loads(kv[b"proteoflow.provenance"])["run_id"].startswith("ingest-")
    hashes = pq.read_table(seq_file, columns=["seq_hash"]).column(0).to_pylist()
    assert hashes == sorted(hashes)  # sorted by hash: row-group statistics prune lookups
    assert not list(store.rglob(".*.tmp")) and not (store / ".staging").exists()


def test_failed_first_ingest_into_a_user_directory_keeps_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    dna = folder / "genes.fasta"
    dna.write_text(">g\nATGAAAGTACTGGCAGCAGGTATTGTTGCACTGTAA\n")
    result = run_cli("ingest", str(dna), "--store", str(folder))
    assert result.returncode == 2
    assert sorted(p.name for p in folder.iterdir()) == ["genes.fasta", "notes.txt"]


def test_options_and_worker_count_shape_the_run_id_correctly(tmp_path: Path) -> None:
    a = write_slice(ECOLI, tmp_path / "a.fasta", count=30)
    b = write_slice(MAG, tmp_path / "b.faa", count=30)
    plain = ingest(Store(tmp_path / "s1"), [str(a), str(b)], workers=0)
    parallel = ingest(Store(tmp_path / "s2"), [str(a), str(b)], workers=2)
    assert plain.run_id == parallel.run_id  # same content, same id, however it was parsed
    zipped = [tmp_path / "a.fasta.gz", tmp_path / "b.faa.gz"]
    for src, dest in zip((a, b), zipped, strict=True):
        dest.write_bytes(gzip.compress(src.read_bytes()))
    assert ingest(Store(tmp_path / "s3"), [str(z) for z in zipped], workers=2).run_id == plain.run_id
    assert sql(tmp_path / "s1", "SELECT record_index, seq_id, seq_hash FROM members ORDER BY 1") == sql(
        tmp_path / "s2", "SELECT record_index, seq_id, seq_hash FROM members ORDER BY 1"
    )
    assert ingest(Store(tmp_path / "s1"), [str(a), str(b)], workers=2).already_ingested
    stricter = ingest(Store(tmp_path / "s1"), [str(a), str(b)], min_length=200)
    assert not stricter.already_ingested and stricter.run_id != plain.run_id
    assert stricter.counts.rejected_by_rule.get("too_short", 0) > 0


def test_byte_order_mark_is_not_content(tmp_path: Path) -> None:
    path = tmp_path / "bom.fasta"
    path.write_bytes(b"\xef\xbb\xbf>p1 with bom\nMKVL\n")
    result = ingest(Store(tmp_path / "s"), [str(path)])
    assert result.counts.accepted == 1


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_only_line_ends_read_as_the_records_they_are(tmp_path: Path, newline: bytes) -> None:
    records = read_fasta_records(require_shared(ECOLI))[:30]
    lf = b"".join(f">{h}\n{s[:60]}\n{s[60:]}\n".encode() for h, s in records)
    (tmp_path / "lf.fasta").write_bytes(lf)
    (tmp_path / "other.fasta").write_bytes(lf.replace(b"\n", newline))
    want = ingest(Store(tmp_path / "a"), [str(tmp_path / "lf.fasta")])
    got = ingest(Store(tmp_path / "b"), [str(tmp_path / "other.fasta")])
    assert got.run_id == want.run_id and got.counts.accepted == 30 and got.counts.rejected == 0
    query = "SELECT record_index, seq_id, description, seq_hash, length FROM members ORDER BY 1"
    assert sql(tmp_path / "b", query) == sql(tmp_path / "a", query)
    assert not any("\r" in d for (_, _, d, _, _) in sql(tmp_path / "b", query))


def test_dead_writers_temporary_files_are_swept_host_aware(tmp_path: Path) -> None:
    import subprocess
    import sys

    from storage.layout import _host_tag

    fasta = write_slice(ECOLI, tmp_path / "e.fasta", count=20)
    store = tmp_path / "store"
    ingest(Store(store), [str(fasta)])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # a process that has exited
    debris = store / "embeddings" / "m-abc" / f".x-00001.parquet.{_host_tag()}-{dead_pid}-0123abcd.tmp"
    live = store / "sequences" / f".y.parquet.{_host_tag()}-{os.getpid()}-4567cdef.tmp"
    other_host = store / "members" / f".z.parquet.elsewhere-{dead_pid}-89abcdef.tmp"
    for path in (debris, live, other_host):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    ingest(Store(store), [str(write_slice(ECOLI, tmp_path / "f.fasta", start=20, count=5))])
    assert not debris.exists()  # its writer is dead on this host
    assert live.exists() and other_host.exists()  # a live writer's, and one another host may still be writing
