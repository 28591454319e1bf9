"""`proteoflow sql`: answers through the CLI in every format, refuses writes, stays light."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
from conftest import ECOLI, run_cli, write_slice

from storage.ingest import ingest
from storage.layout import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sql")
    root = tmp / "store"
    ingest(Store(root), [str(write_slice(ECOLI, tmp / "a.fasta", count=40))])
    return root


def test_table_csv_json_formats(store: Path) -> None:
    q = "SELECT seq_id, length FROM members ORDER BY record_index LIMIT 3"
    table = run_cli("sql", "--store", str(store), q)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["seq_id", "length"] and lines[-1] == "(3 rows)"
    rows = list(
        csv.reader(io.StringIO(run_cli("sql", "--store", str(store), "--format", "csv", q).stdout.decode()))
    )
    assert rows[0] == ["seq_id", "length"] and len(rows) == 4
    as_json = json.loads(run_cli("sql", "--store", str(store), "--format", "json", q).stdout)
    assert [r["seq_id"] for r in as_json] == [r[0] for r in rows[1:]]
    assert all(isinstance(r["length"], int) for r in as_json)


def test_contract_views_exist_even_when_empty(store: Path) -> None:
    for view, cols in {
        "sequences": "seq_hash, sequence, length",
        "members": "run_id, record_index, seq_id, seq_hash",
        "rejected": "run_id, record_index, seq_id, reason",
        "runs": "run_id, status",
        "embeddings": "seq_hash, model, embedding",
        "structures": "seq_hash, model, pdb, mean_plddt, ptm",
    }.items():
        result = run_cli(
            "sql", "--store", str(store), "--format", "json", f"SELECT {cols} FROM {view} LIMIT 1"
        )
        assert result.returncode == 0, (view, result.stderr)


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO members SELECT * FROM members",
        "DROP VIEW sequences",
        "COPY (SELECT 1) TO 'x.csv'",
        "ATTACH 'x.duckdb'",
        "SELECT 1; DELETE FROM members",
        "EXPLAIN ANALYZE COPY (SELECT 42) TO 'x.csv'",
        "explain  analyse CREATE TABLE t AS SELECT 1",
        "PRAGMA import_database('somewhere')",
    ],
)
def test_writes_are_refused(store: Path, statement: str) -> None:
    result = run_cli("sql", "--store", str(store), statement)
    assert result.returncode == 2
    assert b"read-only" in result.stderr and b"Traceback" not in result.stderr


def test_sql_errors_and_missing_store_are_one_line(tmp_path: Path, store: Path) -> None:
    bad = run_cli("sql", "--store", str(store), "SELEC 1")
    assert bad.returncode == 2 and bad.stderr.count(b"\n") <= 3 and b"Traceback" not in bad.stderr
    missing = run_cli("sql", "--store", str(tmp_path / "none"), "SELECT 1")
    assert missing.returncode == 2 and b"not a proteoflow store" in missing.stderr


def test_sql_does_not_import_ray_prefect_or_torch(store: Path) -> None:
    probe = (
        "import sys, flows.cli as c; c.main(['sql','--store',sys.argv[1],'SELECT 1']); "
        "print(sorted(m for m in ('ray','prefect','torch','transformers') if m in sys.modules))"
    )
    import subprocess
    import sys

    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe, str(store)], capture_output=True, check=True)
    assert out.stdout.decode().strip().splitlines()[-1] == "[]"
    assert time.monotonic() - started < 30  # generous; the point is that nothing heavy is started
