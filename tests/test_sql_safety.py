"""`proteoflow sql` cannot write, read outside the store's tables or download: a corpus of escaping statements
through the real CLI (refused in one line, every store file byte-identical), the same statements straight to
the sealed DuckDB session (DuckDB itself refuses them), and the queries that must keep working."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pytest
from conftest import ECOLI, run_cli, write_slice
from test_catalog import add_embeddings

from storage.catalog import connect, write_catalog
from storage.ingest import ingest
from storage.layout import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("safety")
    root = tmp / "store"
    ingest(Store(root), [str(write_slice(ECOLI, tmp / "a.fasta", count=30))])
    add_embeddings(root, "esm2_t6_8M_UR50D", 8)
    write_catalog(root)
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside")


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under the store (hidden ones too) by its SHA-256: any write shows."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def member_dir(store: Path) -> str:
    [run] = (store / "members").iterdir()
    return str(run)


ESCAPES = [
    "COPY (SELECT * FROM members) TO '{members}/part-1.parquet'",
    "EXPLAIN (ANALYZE) COPY (SELECT * FROM members) TO '{members}/part-1.parquet'",
    "/**/EXPLAIN ANALYZE COPY (SELECT * FROM sequences) TO '{store}/sequences/zz.parquet'",
    "EXPLAIN (ANALYZE) INSTALL httpfs",
    "explain analyse insert into sequences select * from sequences",
    "EXPLAIN (FORMAT json, ANALYZE) CREATE TABLE t AS SELECT 1",
    "eXpLaIn /* c */ (analyze true) ATTACH '{outside}/x.duckdb'",
    "EXPLAIN ANALYZE PIVOT members ON length USING count(*)",
    "EXPLAIN COPY sequences TO '{outside}/plain.csv'",
    "-- a comment first\nCOPY sequences TO '{store}/sequences/copy.parquet'",
    "/* hi */ CoPy sequences TO '{outside}/leak.csv'",
    "SELECT 1; COPY (SELECT 1) TO '{store}/runs/x.parquet'",
    "SELECT 1;\nATTACH '{outside}/x.duckdb'",
    "INSTALL httpfs",
    "FORCE INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '{store}/x.duckdb' AS w",
    "PRAGMA threads=1",
    "PRAGMA version",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "CALL pragma_version()",
    "CREATE TABLE t AS SELECT 1",
    "CREATE TABLE t AS PIVOT members ON length USING count(*)",
    "CREATE OR REPLACE VIEW sequences AS SELECT 1 AS x",
    "DROP VIEW members",
    "INSERT INTO sequences SELECT * FROM sequences",
    "WITH x AS (SELECT * FROM sequences) INSERT INTO sequences SELECT * FROM x",
    "UPDATE sequences SET length = 0",
    "DELETE FROM members",
    "EXPORT DATABASE '{outside}/export'",
    "IMPORT DATABASE '{outside}/export'",
    "CHECKPOINT",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM read_parquet('{store}/sequences/*.parquet')",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{outside}/q.csv''')",
]


def fill(statement: str, store: Path, outside: Path) -> str:
    return statement.format(store=store, outside=outside, members=member_dir(store))


@pytest.mark.parametrize("statement", ESCAPES)
def test_escapes_are_refused_in_one_line_and_change_nothing(
    statement: str, store: Path, outside: Path
) -> None:
    before = fingerprint(store)
    result = run_cli("sql", "--store", str(store), fill(statement, store, outside))
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(b"proteoflow sql: ") and result.stderr.count(b"\n") == 1, result.stderr
    assert b"Traceback" not in result.stderr
    assert fingerprint(store) == before
    assert list(outside.iterdir()) == []


def test_the_corpus_is_large_and_the_parser_names_the_kind(store: Path, outside: Path) -> None:
    assert len(ESCAPES) >= 25
    result = run_cli("sql", "--store", str(store), fill(ESCAPES[1], store, outside))
    assert b"read-only: EXPLAIN ANALYZE statements are refused" in result.stderr
    result = run_cli("sql", "--store", str(store), "SELECT 1; CREATE TABLE t AS SELECT 1")
    assert b"read-only: CREATE statements are refused" in result.stderr


DIRECT = [
    "COPY (SELECT * FROM members) TO '{members}/part-0.parquet'",  # overwrite a committed file
    "COPY (SELECT * FROM members) TO '{members}/part-1.parquet'",  # add one beside it
    "COPY (SELECT 1) TO '{store}/sequences/zz.parquet'",
    "COPY (SELECT 1) TO '{outside}/leak.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{store}/runs/x.parquet'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '{outside}/x.duckdb'",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_blob('{store}/proteoflow.json')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('{store}/sequences/*.parquet')",
    "SET enable_external_access = true",
    "SET threads = 1",
    "RESET lock_configuration",
    "PRAGMA threads = 1",
    "PRAGMA enable_profiling",
    "CALL enable_logging()",
    "CALL duckdb_secrets()",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO m(x) AS x",
    "DROP VIEW members",
    "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "EXPORT DATABASE '{outside}/export'",
]


def test_the_sealed_session_itself_refuses_writes_and_escapes(store: Path, outside: Path) -> None:
    """Without the parser check: DuckDB's own settings (no file system, no extensions, locked configuration,
    a read-only catalog) stop each statement."""
    before = fingerprint(store)
    con = connect(store).con
    for statement in DIRECT:
        with pytest.raises(duckdb.Error):
            con.execute(fill(statement, store, outside)).fetchall()
    assert fingerprint(store) == before
    assert list(outside.iterdir()) == []
    # the session still answers, over views nobody could replace
    assert con.execute("SELECT count(*) FROM members").fetchone()[0] == 30
    settings = dict(
        con.execute(
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', 'lock_configuration')"
        ).fetchall()
    )
    assert settings == {"enable_external_access": "false", "lock_configuration": "true"}


QUERIES = {
    "PIVOT (SELECT length FROM members) ON length IN (100, 200) USING count(*)": 1,
    "PIVOT (SELECT length > 300 AS long FROM members) ON long USING count(*)": 1,
    "UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v": 2,
    "DESCRIBE members": 7,
    "SUMMARIZE sequences": 3,
    "EXPLAIN SELECT count(*) FROM sequences": 1,
    "SHOW TABLES": None,
    "VALUES (1, 'a'), (2, 'b')": 2,
    "WITH long AS (SELECT * FROM sequences WHERE length > 300) SELECT count(*) FROM long": 1,
    "FROM members SELECT seq_id LIMIT 3": 3,
}


@pytest.mark.parametrize("statement", QUERIES)
def test_read_only_statements_answer(statement: str, store: Path) -> None:
    result = run_cli("sql", "--store", str(store), "--format", "json", statement)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    if QUERIES[statement] is not None:
        assert len(rows) == QUERIES[statement]


def test_nearest_neighbours_by_cosine(store: Path) -> None:
    query = """
        WITH q AS (SELECT e.embedding, m.seq_id FROM embeddings e JOIN members m USING (seq_hash)
                   ORDER BY m.record_index LIMIT 1)
        SELECT m.seq_id, array_cosine_similarity(e.embedding, q.embedding) AS cosine, q.seq_id AS probe
        FROM embeddings e JOIN members m USING (seq_hash), q ORDER BY cosine DESC LIMIT 5"""
    result = run_cli("sql", "--store", str(store), "--format", "json", query)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 5 and rows[0]["seq_id"] == rows[0]["probe"]
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert all(a["cosine"] >= b["cosine"] for a, b in zip(rows, rows[1:], strict=False))
