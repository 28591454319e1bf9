"""`proteoflow check`: a sound store passes; each kind of damage is found (exit 1); `--repair` quarantines
(with a .why note) and never deletes data, removes dead debris, and leaves only what needs recomputing,
with the command that recomputes it (which, run, makes the store sound again)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ECOLI, run_cli, write_slice

from flows.cli import main
from storage import plans, results, shards
from storage.catalog import write_catalog
from storage.check import check_store
from storage.ingest import ingest
from storage.layout import Store, write_table_atomic
from storage.runs import ComputeCounts, RunRecord
from storage.schemas import SEQUENCE_SCHEMA, embeddings_schema

MODEL = results.ModelIdentity("tiny_model", "0123456789abcdef", random_weights=True)
EMBED_RUN = "embed-0000aaaa1111bbbb"
DIM = 8
BAD_RECORDS = ">bad_digit one\nMKV1LL\n>bad_gap two\nMKV-LL\n"


# ------------------------------------------------------------------------------------------------ stores


def _embeddings(hashes: list[str], lengths: list[int]) -> pa.Table:
    n = len(hashes)
    vectors = np.random.default_rng(n).standard_normal((n, DIM)).astype(np.float32)
    schema = embeddings_schema(DIM)
    columns = {
        "seq_hash": hashes,
        "model": [MODEL.name] * n,
        "model_sha": [MODEL.sha] * n,
        "layer": pa.array([2] * n, pa.int16()),
        "pooling": ["mean"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        "length": pa.array(lengths, pa.int32()),
        "strategy": ["full"] * n,
        "precision": ["fp32"] * n,
        "run_id": [EMBED_RUN] * n,
        "random_weights": [True] * n,
    }
    return pa.table(columns).select(schema.names).cast(schema)


def _compute_run(store: Store, ingest_run: str, fasta: Path) -> None:
    """A finished embed run written with the storage functions the pipeline uses: plan, shard outputs,
    shard records (after their outputs), run record, catalog."""
    todo = plans.pending_sequences(store, [ingest_run], pa.array([], pa.string()))
    n = todo.num_rows
    cut = [list(range(i, n, 3)) for i in range(3)]
    plan = plans.write_plan(store, EMBED_RUN, todo, cut, lambda length: float(length))
    for shard_id, rows in enumerate(cut):
        part = todo.take(pa.array(rows, pa.int64()))
        hashes, lengths = part.column("seq_hash").to_pylist(), part.column("length").to_pylist()
        outputs = results.write_shard_outputs(
            store, MODEL, EMBED_RUN, shard_id, {"embeddings": _embeddings(hashes, lengths)}, {}
        )
        record = shards.ShardRecord(
            shard_id, "done", 1, 1, len(rows), sum(lengths), plan_id=plan.plan_id, outputs=outputs
        )
        shards.write_shard_record(store, EMBED_RUN, record)
    options = {"layers": [2], "poolings": ["mean"], "per_residue": False, "contacts": False,
               "long_strategy": "window", "precision": "fp32", "max_tokens": None,
               "dtype": "float32"}  # fmt: skip
    params = {"model": "models/tiny_model", "engine_options": options, "inputs": [str(fasta)],
              "ingest_run": ingest_run, "identity": {"model": MODEL.name, "sha": MODEL.sha}}  # fmt: skip
    RunRecord(EMBED_RUN, "embed", params=params, counts=ComputeCounts()).finish(store, "completed")
    write_catalog(store.root)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, str]:
    """A store of a real E. coli slice (with two refused records) and one finished embed run of 3 shards."""
    folder = tmp_path_factory.mktemp("check")
    fasta = write_slice(ECOLI, folder / "ecoli.fasta", count=24, max_length=400)
    fasta.write_text(fasta.read_text() + BAD_RECORDS)
    store = Store(folder / "store")
    run_id = ingest(store, [str(fasta)]).run_id
    _compute_run(store, run_id, fasta)
    return store.root, run_id


@pytest.fixture
def store(base, tmp_path) -> Path:
    """A fresh copy of the base store (file times kept)."""
    return Path(shutil.copytree(base[0], tmp_path / "store"))


def check(root: Path, *extra: str, capsys) -> tuple[int, str]:
    """`proteoflow check` in this process: exit status and stdout."""
    capsys.readouterr()
    status = main(["check", "--store", str(root), *extra])
    return status, capsys.readouterr().out


def contents(root: Path) -> dict[str, str]:
    """Digest of every file's bytes, by path relative to the store (quarantine/ included)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def assert_nothing_deleted(before: dict[str, str], root: Path, removed: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` is where it was, or, byte for byte, under quarantine/<stamp>/ with a .why
    note (``removed``: the dead temporaries a repair may delete)."""
    after = contents(root)
    for rel, digest in before.items():
        if rel in removed or rel == "catalog.sql":
            continue
        if after.get(rel) == digest:
            continue
        moved = [q for q in after if q.startswith("quarantine/") and q.split("/", 2)[2] == rel]
        assert moved, f"{rel} neither in place nor in quarantine/"
        parts = moved[0].split("/")  # the note is beside the file, or beside the directory moved whole
        notes = ["/".join(parts[:i]) + ".why" for i in range(3, len(parts) + 1)]
        assert after[moved[0]] == digest and any(note in after for note in notes)


def shard_file(root: Path, shard_id: int) -> Path:
    return root / "embeddings" / f"{MODEL.name}-{MODEL.sha}" / f"{EMBED_RUN}-{shard_id:05d}.parquet"


def lines_of(out: str, kind: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(kind + ": ")]


# ------------------------------------------------------------------------------------------------- sound


def test_a_sound_store_passes(store: Path, capsys) -> None:
    status, out = check(store, capsys=capsys)
    assert status == 0, out
    assert out.splitlines() == [f"check: {store} is sound (12 Parquet files read)"]
    status, out = check(store, "--json", capsys=capsys)
    assert status == 0 and json.loads(out) == []
    before = contents(store)
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 0 and contents(store) == before  # a sound store is left exactly as it was


def test_search_indexes_neighbors_and_clusters_are_part_of_the_layout(store: Path, capsys) -> None:
    from storage.neighbors import compute_neighbors, write_clusters
    from storage.vectors import build_index, resolve

    vectors = resolve(store, [MODEL.name])
    build_index(vectors, "flat")
    compute_neighbors(vectors, 3)
    write_clusters(vectors, 3, 0.5)
    status, out = check(store, capsys=capsys)
    assert status == 0, out
    (store / "indexes" / f"{MODEL.name}-{MODEL.sha}" / "notes.txt").write_text("mine\n")
    assert [f.path for f in check_store(store).findings] == [f"indexes/{MODEL.name}-{MODEL.sha}/notes.txt"]


def test_not_a_store_and_newer_format_are_usage_errors(store: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "missing", tmp_path / "empty"):
        result = run_cli("check", "--store", str(root))
        assert result.returncode == 2
        assert result.stderr.decode().count("\n") == 1 and "not a proteoflow store" in result.stderr.decode()
    (store / "proteoflow.json").write_text(json.dumps({"format_version": 99}))
    result = run_cli("check", "--store", str(store), "--repair")
    assert result.returncode == 2 and "newer" in result.stderr.decode()
    assert not (store / "quarantine").exists()


# ------------------------------------------------------------------------------------------------ damage


def test_truncated_parquet_file_is_unreadable_and_its_shard_is_named_for_recomputing(
    store: Path, base, capsys
) -> None:
    path = shard_file(store, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = contents(store)
    status, out = check(store, capsys=capsys)
    assert status == 1
    [line] = lines_of(out, "unreadable")
    assert path.relative_to(store).as_posix() in line and "[--repair quarantines it]" in line
    [rerun] = [line for line in out.splitlines() if line.startswith("rerun: ")]
    assert f"--run-id {EMBED_RUN}" in rerun and "shard 1" in rerun and "--layers=2 --pooling mean" in rerun

    status, out = check(store, "--repair", capsys=capsys)
    assert status == 1  # the lost vectors must be computed again: repair computes nothing
    assert_nothing_deleted(before, store)
    why = next((store / "quarantine").rglob(f"{path.name}.why")).read_text()
    assert "unreadable" in why
    report = check_store(store)
    assert {f.kind for f in report.findings} == {"missing-output"}
    assert [(r.run_id, r.shards) for r in report.reruns()] == [(EMBED_RUN, (1,))]


def test_text_file_named_parquet_is_quarantined(store: Path, capsys) -> None:
    fake = store / "sequences" / "notes.parquet"
    fake.write_text("these are my notes\n")
    status, out = check(store, capsys=capsys)
    assert status == 1 and len(lines_of(out, "unreadable")) == 1 and "sequences/notes.parquet" in out
    before = contents(store)
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 0, out
    assert "repaired unreadable: sequences/notes.parquet: moved to quarantine/" in out
    assert not fake.exists()
    assert_nothing_deleted(before, store)
    status, out = check(store, capsys=capsys)
    assert status == 0  # quarantine/ is part of the layout


def test_duplicated_result_file_is_found_and_the_copy_quarantined(store: Path, capsys) -> None:
    original = shard_file(store, 0)
    copy = original.with_name("backup of shard 0.parquet")
    shutil.copy2(original, copy)
    status, out = check(store, capsys=capsys)
    assert status == 1
    [dup] = lines_of(out, "duplicate")
    assert "backup of shard 0.parquet" in dup and "(seq_hash, model_sha, layer:pooling) key" in dup
    assert "a copy" in dup
    assert "backup of shard 0.parquet" in lines_of(out, "unrecorded-output")[0]
    before = contents(store)
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 0, out
    assert original.exists() and not copy.exists()
    assert_nothing_deleted(before, store)


def test_output_of_a_shard_that_stopped_before_its_record_is_quarantined_and_its_rerun_named(
    store: Path, capsys
) -> None:
    """Outputs committed, then the run died before the shard's record: the file is quarantined (a rerun
    computes the shard again) and the rerun command is printed."""
    (store / "shards" / f"run_id={EMBED_RUN}" / "shard-00001.parquet").unlink()
    status, out = check(store, capsys=capsys)
    assert status == 1
    [line] = lines_of(out, "unrecorded-output")
    assert "shard 1 stopped before its record was written" in line and "[--repair quarantines it]" in line
    status, out = check(store, "--repair", "--json", capsys=capsys)
    assert status == 0, out
    [row] = json.loads(out)
    assert row["status"] == "repaired" and row["done"].startswith("moved to quarantine/")
    assert f"--run-id {EMBED_RUN}" in row["command"]
    assert not shard_file(store, 1).exists() and shard_file(store, 0).exists()


def test_a_duplicate_holding_rows_found_nowhere_else_is_kept(store: Path, capsys) -> None:
    """Two sequences files sharing some hashes: reported, but neither is a copy, so repair moves neither."""
    [seq] = (store / "sequences").glob("*.parquet")
    table = pq.read_table(seq)
    extra = pa.table({"seq_hash": ["f" * 32], "sequence": ["MKV"], "length": pa.array([3], pa.int32())})
    mixed = pa.concat_tables([table.slice(0, 2), extra.cast(SEQUENCE_SCHEMA)])
    write_table_atomic(store / "sequences" / "ingest-other.parquet", mixed, "sequences")
    report = check_store(store, repair=True)
    [dup] = [f for f in report.findings if f.kind == "duplicate"]
    assert dup.path == "sequences/ingest-other.parquet" and "2 seq_hash values also in" in dup.reason
    assert "1 of its keys are in no other file, so it is kept" in dup.reason and not dup.fix
    assert (store / "sequences" / "ingest-other.parquet").exists()
    twice = _embeddings(["e" * 32, "e" * 32], [5, 5])
    write_table_atomic(shard_file(store, 7), twice, "embeddings", {"run_id": EMBED_RUN, "shard_id": 7})
    found = {f.kind: f for f in check_store(store, repair=True).findings if f.path.endswith("-00007.parquet")}
    assert found["duplicate"].reason == (
        "1 (seq_hash, model_sha, layer:pooling) keys appear more than once within this file"
    )
    assert not found["duplicate"].fix and "no shard record of run" in found["unrecorded-output"].reason


def test_deleted_output_of_a_done_shard_names_the_command_that_recomputes_it(store: Path, capsys) -> None:
    shard_file(store, 2).unlink()
    status, out = check(store, "--json", capsys=capsys)
    assert status == 1
    [finding] = json.loads(out)
    assert finding["kind"] == "missing-output" and finding["status"] == "remains" and finding["fix"] is None
    command = shlex.split(finding["command"])
    assert command[:2] == ["proteoflow", "embed"] and command[command.index("--run-id") + 1] == EMBED_RUN
    assert command[command.index("--model") + 1] == "models/tiny_model"
    before = contents(store)
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 1 and contents(store) == before  # nothing to mend without computing
    assert len(lines_of(out, "missing-output")) == 1 and "shard 2" in out
    assert out.splitlines()[-1].endswith("1 problem remain (1 missing-output); rerun the commands above")


def test_stray_files_and_directories_are_quarantined(store: Path, capsys) -> None:
    (store / "notes.txt").write_text("hello\n")
    (store / "embeddings" / "README").write_text("what these are\n")
    (store / "backups").mkdir()
    (store / "backups" / "old.parquet").write_bytes(shard_file(store, 0).read_bytes())
    status, out = check(store, capsys=capsys)
    assert status == 1
    assert sorted(line.split(": ")[1] for line in lines_of(out, "stray")) == [
        "backups",
        "embeddings/README",
        "notes.txt",
    ]
    before = contents(store)
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 0, out
    assert_nothing_deleted(before, store)
    assert len(list((store / "quarantine").rglob("*.why"))) == 3


def test_dead_temporary_file_is_removed_and_a_live_one_left_alone(store: Path, capsys) -> None:
    dead = store / "embeddings" / f"{MODEL.name}-{MODEL.sha}" / ".x.parquet.abcd1234.tmp"
    dead.write_bytes(b"PAR1 half a file")
    hours_ago = time.time() - 7200
    os.utime(dead, (hours_ago, hours_ago))
    live = store / "sequences" / ".y.parquet.0123abcd.tmp"
    live.write_bytes(b"PAR1 being written")
    status, out = check(store, capsys=capsys)
    assert status == 1
    [line] = lines_of(out, "temporary")
    assert ".x.parquet.abcd1234.tmp" in line and "untouched for 2 h" in line
    assert "left alone: sequences/.y.parquet.0123abcd.tmp: being written by a running command" in out
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 0, out
    assert not dead.exists() and live.exists()
    assert "left alone: sequences/.y.parquet.0123abcd.tmp" in out


def test_staging_of_a_dead_writer_is_removed(store: Path, capsys) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now dead
    dead = store / ".staging" / f"ingest-{socket.gethostname()}-{child.pid}-abcd1234"
    dead.mkdir(parents=True)
    (dead / ".members.parquet").write_bytes(b"PAR1")
    mine = store / ".staging" / f"ingest-{socket.gethostname()}-{os.getpid()}-0123abcd"
    mine.mkdir()
    status, out = check(store, capsys=capsys)
    assert status == 1 and f"pid {child.pid} on this host" in lines_of(out, "temporary")[0]
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 0, out
    assert not dead.exists() and mine.exists()


def test_deleted_members_file_is_found_and_rerunning_the_ingest_mends_it(store: Path, base, capsys) -> None:
    run_id = base[1]
    members = store / "members" / f"run_id={run_id}" / "part-0.parquet"
    members.unlink()
    status, out = check(store, capsys=capsys)
    assert status == 1
    [line] = lines_of(out, "counts")
    assert "read 26 records (24 accepted, 2 rejected) but the store holds 0 members + 2 rejected" in line
    before = contents(store)
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 1
    assert_nothing_deleted(before, store)
    assert f"marked ingest run {run_id} failed" in out
    assert [
        line.split(": ")[0] for line in out.splitlines() if not line.startswith(("repaired", "check"))
    ] == [
        "incomplete-run",
        "rerun",
    ]
    [rerun] = [line for line in out.splitlines() if line.startswith("rerun: ")]
    command = shlex.split(rerun.removeprefix("rerun: ").split("  # ")[0])
    assert command[:2] == ["proteoflow", "ingest"]
    assert main([*command[1:], "--workers", "0"]) == 0  # the command given rewrites the run's rows
    status, out = check(store, capsys=capsys)
    assert status == 0, out
    assert pq.read_metadata(members).num_rows == 24


def test_deleted_sequences_file_leaves_orphan_members(store: Path, base, capsys) -> None:
    run_id = base[1]
    (store / "sequences" / f"{run_id}.parquet").unlink()
    report = check_store(store)
    orphans = [f for f in report.findings if f.kind == "orphan-member"]
    assert [f.path for f in orphans] == [f"members/run_id={run_id}"]
    assert "24 member rows" in orphans[0].reason and orphans[0].rerun.kind == "ingest"
    report = check_store(store, repair=True)
    assert {f.kind for f in report.findings} == {"orphan-member", "incomplete-run"}
    assert all(not f.fix for f in report.findings)
    [rerun] = report.reruns()
    ingest(Store(store), rerun.params["inputs"], run_id=rerun.run_id)
    assert check_store(store).sound


def test_wrong_columns_and_foreign_footers_are_found(store: Path, capsys) -> None:
    wrong = pa.table({"seq_hash": ["a" * 32], "sequence": [1]})
    write_table_atomic(store / "sequences" / "ingest-wrong.parquet", wrong, "sequences")
    [seq] = (store / "sequences").glob("ingest-*[0-9a-f].parquet")
    pq.write_table(
        pq.read_table(seq).replace_schema_metadata(None), store / "sequences" / "ingest-plain.parquet"
    )
    report = check_store(store)
    found = {(f.kind, f.path): f.reason for f in report.findings}
    assert found[("schema", "sequences/ingest-wrong.parquet")] == (
        "missing column(s) length; sequence is int, not string"
    )
    assert "no proteoflow.kind" in found[("metadata", "sequences/ingest-plain.parquet")]
    assert check_store(store, repair=True).sound


def test_missing_manifest_and_stale_catalog_are_rewritten(store: Path, capsys) -> None:
    (store / "proteoflow.json").unlink()
    (store / "catalog.sql").write_text("-- nothing\n")
    status, out = check(store, capsys=capsys)
    assert status == 1 and lines_of(out, "manifest")
    status, out = check(store, "--repair", capsys=capsys)
    assert status == 0, out
    assert json.loads((store / "proteoflow.json").read_text()) == {"format_version": 1}
    assert "CREATE OR REPLACE VIEW embeddings" in (store / "catalog.sql").read_text()


# ---------------------------------------------------------------------------------------- real compute


@pytest.mark.slow
def test_a_real_embed_run_leaves_a_sound_store(tiny_esm2: Path, tmp_path: Path) -> None:
    """One real `proteoflow embed` (Ray, Prefect, the model) and `proteoflow check` on what it wrote."""
    fasta = write_slice(ECOLI, tmp_path / "slice.fasta", count=12, max_length=300)
    root = tmp_path / "store"
    embed = run_cli("embed", str(fasta), "--store", str(root), "--model", str(tiny_esm2), "--precision",
                    "fp32", "--workers", "1", "--no-progress")  # fmt: skip
    assert embed.returncode == 0, embed.stderr.decode()[-3000:]
    result = run_cli("check", "--store", str(root))
    assert result.returncode == 0, result.stdout.decode()
    [output] = [p for p in (root / "embeddings").rglob("*.parquet")][:1]
    output.unlink()
    result = run_cli("check", "--store", str(root))
    out = result.stdout.decode()
    assert result.returncode == 1 and "missing-output: " in out
    [rerun] = [line for line in out.splitlines() if line.startswith("rerun: ")]
    assert f"--model {tiny_esm2}" in rerun and "--precision fp32" in rerun and str(fasta) in rerun
