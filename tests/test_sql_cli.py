"""`proteoflow sql`: answers through the CLI in every format, refuses writes, stays light."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
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
        "EXPLAIN (ANALYZE) SELECT 1",
        "PRAGMA import_database('somewhere')",
    ],
)
def test_writes_are_refused(store: Path, statement: str) -> None:
    result = run_cli("sql", "--store", str(store), statement)
    assert result.returncode == 2
    assert b"read-only" in result.stderr and b"Traceback" not in result.stderr


def test_sql_errors_and_missing_store_are_one_line(tmp_path: Path, store: Path) -> None:
    for query in ("SELEC 1", "SELECT nope FROM members", "SELECT 1 +"):
        bad = run_cli("sql", "--store", str(store), query)
        assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1, bad.stderr
        assert bad.stderr.startswith(b"proteoflow sql: SQL error: ") and b"Traceback" not in bad.stderr
    assert b"Candidate bindings" in run_cli("sql", "--store", str(store), "SELECT nope FROM members").stderr
    missing = run_cli("sql", "--store", str(tmp_path / "none"), "SELECT 1")
    assert missing.returncode == 2 and b"not a proteoflow store" in missing.stderr


def test_sql_does_not_import_ray_prefect_or_torch(store: Path) -> None:
    probe = (
        "import sys, flows.cli as c; c.main(['sql','--store',sys.argv[1],'SELECT 1']); "
        "print(sorted(m for m in ('ray','prefect','torch','transformers') if m in sys.modules))"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe, str(store)], capture_output=True, check=True)
    assert out.stdout.decode().strip().splitlines()[-1] == "[]"
    assert time.monotonic() - started < 30  # generous; the point is that nothing heavy is started


SLOW = "SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = -1"


def test_timeout_stops_a_slow_query_with_one_line(store: Path) -> None:
    started = time.monotonic()
    result = run_cli("sql", "--store", str(store), "--timeout", "1", SLOW, timeout=60)
    assert result.returncode == 2 and time.monotonic() - started < 20
    assert result.stderr == b"proteoflow sql: error: query timed out after 1 s (--timeout)\n"
    bad = run_cli("sql", "--store", str(store), "--timeout", "0", "SELECT 1")
    assert bad.returncode == 2 and b"positive number of seconds" in bad.stderr


def test_ctrl_c_stops_a_running_query_within_a_second(store: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "sql", "--store", str(store), SLOW],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 60
    while cpu_seconds(proc.pid) < 2.0 and time.monotonic() < deadline:  # start-up takes about half that
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    watchdog = threading.Timer(30, proc.kill)  # a hung process fails the test instead of blocking it
    watchdog.start()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    line = proc.stderr.readline()  # written once DuckDB has stopped; the interpreter then exits
    stopped_after = time.monotonic() - sent
    assert line == b"proteoflow sql: interrupted\n" and stopped_after < 1.0, (line, stopped_after)
    assert proc.wait(timeout=30) == 130 and proc.stderr.read() == b""
    watchdog.cancel()
    proc.stdout.close()
    proc.stderr.close()


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (Linux /proc), to know it is past start-up and into the query."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_control_characters_are_escaped_in_table_and_csv_and_json_stays_valid(tmp_path: Path) -> None:
    fasta = tmp_path / "odd.fasta"
    fasta.write_bytes(b">sp|ODD|X \x1b[31mred\x1b[0m\tTAB\x07bell\nMKVLAAGIVG\n")
    root = tmp_path / "store"
    ingest(Store(root), [str(fasta)])
    query = "SELECT description, 'a' || chr(0) || chr(13) || 'b' AS nul, chr(27) || '[2J' AS \"col\x1b\" FROM members"
    table = run_cli("sql", "--store", str(root), query)
    assert table.returncode == 0, table.stderr
    text = table.stdout.decode()
    assert "\\x1b[31mred\\x1b[0m\\tTAB\\x07bell" in text and "a\\x00\\rb" in text and "col\\x1b" in text
    assert not any(ch in text for ch in "\x1b\x07\r\x00\t")
    out = run_cli("sql", "--store", str(root), "--format", "csv", query).stdout.decode()
    [header, row] = list(csv.reader(io.StringIO(out)))
    assert header[2] == "col\\x1b" and row[0].startswith("\\x1b[31mred") and row[1] == "a\\x00\\rb"
    assert not any(ch in out for ch in "\x1b\x07\r\x00\t")
    as_json = run_cli("sql", "--store", str(root), "--format", "json", query).stdout
    [record] = json.loads(as_json)
    assert record["description"].startswith("\x1b[31mred") and record["nul"] == "a\x00\rb"
    assert b"\x1b" not in as_json
    nan = run_cli("sql", "--store", str(root), "--format", "json", "SELECT 'nan'::DOUBLE AS x").stdout
    assert json.loads(nan) == [{"x": None}]
