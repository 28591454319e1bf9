"""storage.catalog: damaged files are skipped and named, newer stores refused, catalog.sql stays true with
relative globs, the sealed session types vectors as FLOAT[D], and `sql --help` lists the schemas' views."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from conftest import ECOLI, run_cli, write_slice

from storage.catalog import (
    CATALOG_FILE,
    StoreFormatError,
    check_format,
    connect,
    damaged_files,
    write_catalog,
)
from storage.ingest import ingest
from storage.layout import FORMAT_VERSION, Store, write_table_atomic
from storage.schemas import RUN_SCHEMA, TABLE_SCHEMAS, embeddings_schema, residue_embeddings_schema


def add_embeddings(
    root: Path, model: str, dim: int, part: int = 0, dtype: str = "float32", per_residue: bool = False
) -> Path:
    """One results file of vectors for every stored sequence, where the writers put them."""
    hashes = [h for (h,) in duckdb.sql(f"SELECT seq_hash FROM '{root}/sequences/*.parquet'").fetchall()]
    n = len(hashes)
    rng = np.random.default_rng(dim + part)
    vectors = rng.standard_normal((n, dim)).astype(np.float16 if dtype == "float16" else np.float32)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    table = "residue_embeddings" if per_residue else "embeddings"
    schema = residue_embeddings_schema(dim, dtype) if per_residue else embeddings_schema(dim, dtype)
    columns = {
        "seq_hash": hashes,
        "model": [model] * n,
        "model_sha": ["0123abcd"] * n,
        "layer": pa.array([6] * n, pa.int16()),
        "embedding": pa.ListArray.from_arrays(pa.array(range(n + 1), pa.int32()), flat)
        if per_residue
        else flat,
        "length": pa.array([1] * n, pa.int32()),
        "strategy": ["full"] * n,
        "precision": ["float32"] * n,
        "run_id": [f"embed-{part}"] * n,
        "random_weights": [True] * n,
    }
    if not per_residue:
        columns["pooling"] = ["mean"] * n
    path = root / table / f"{model}-0123abcd" / f"embed-{part}-00000.parquet"
    return write_table_atomic(path, pa.table(columns).select(schema.names).cast(schema), table)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    ingest(Store(root), [str(write_slice(ECOLI, tmp_path / "a.fasta", count=30))])
    add_embeddings(root, "esm2_t6_8M_UR50D", 8)
    return root


def sql(root: Path, query: str) -> list[tuple]:
    catalog = connect(root)
    return catalog.con.execute(query).fetchall()


def damage(root: Path) -> dict[str, Path]:
    """A truncated Parquet file, a text file and a zero-byte file, each named *.parquet, in three tables."""
    [good] = (root / "embeddings").rglob("*.parquet")
    truncated = good.with_name("embed-9-00000.parquet")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = root / "sequences" / "notes.parquet"
    text.write_text("these are notes, not a table\n")
    empty = root / "runs" / "empty.parquet"
    empty.touch()
    return {"truncated": truncated, "text": text, "empty": empty}


# ------------------------------------------------------------------------------------------- damaged files


def test_damaged_files_names_each_bad_file_with_a_reason(store: Path) -> None:
    assert damaged_files(store) == []
    bad = damage(store)
    found = dict(damaged_files(store))
    assert set(found) == set(bad.values())
    assert "0 bytes" in found[bad["empty"]]
    assert all("\n" not in reason and reason for reason in found.values())


def test_sql_answers_over_sound_files_and_warns_once_per_damaged_file(store: Path) -> None:
    before = sql(store, "SELECT (SELECT count(*) FROM sequences), (SELECT count(*) FROM embeddings)")
    bad = damage(store)
    result = run_cli(
        "sql",
        "--store",
        str(store),
        "SELECT (SELECT count(*) FROM sequences), (SELECT count(*) FROM embeddings)",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[2].split() == [str(n) for n in before[0]]
    warnings = result.stderr.decode().splitlines()
    assert len(warnings) == 3
    for path in bad.values():
        [line] = [w for w in warnings if str(path) in w]
        assert line.startswith(f"proteoflow sql: warning: skipped damaged file {path} (")


def test_a_file_whose_columns_clash_is_skipped_not_fatal(store: Path) -> None:
    clash = pa.table({"seq_hash": pa.array([1, 2], pa.int64()), "sequence": [b"x", b"y"]})
    write_table_atomic(store / "sequences" / "zz-clash.parquet", clash, "sequences")
    catalog = connect(store)
    assert [p.name for p, _ in catalog.damaged] == ["zz-clash.parquet"]
    assert catalog.con.execute("SELECT count(*) FROM sequences").fetchone()[0] == 30


def test_a_newer_store_format_is_refused_in_one_line(store: Path) -> None:
    (store / "proteoflow.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(StoreFormatError, match="newer"):
        check_format(store)
    result = run_cli("sql", "--store", str(store), "SELECT 1")
    assert result.returncode == 2
    assert result.stderr.count(b"\n") == 1 and b"newer than this proteoflow reads" in result.stderr
    (store / "proteoflow.json").write_text("{not json")
    result = run_cli("sql", "--store", str(store), "SELECT 1")
    assert result.returncode == 2 and result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------- sealed session


def test_vectors_are_float_d_and_mixed_widths_get_their_own_views(store: Path) -> None:
    types = dict(sql(store, "SELECT column_name, column_type FROM (DESCRIBE embeddings)"))
    assert types["embedding"] == "FLOAT[8]"
    add_embeddings(store, "esm2_t12_35M_UR50D", 16, dtype="float16")
    add_embeddings(store, "esm2_t6_8M_UR50D", 8, per_residue=True)
    catalog = connect(store)
    con = catalog.con
    assert catalog.damaged == []
    assert con.execute("SELECT typeof(embedding) FROM embeddings_d16 LIMIT 1").fetchone()[0] == "FLOAT[16]"
    assert con.execute("SELECT typeof(embedding) FROM embeddings_d8 LIMIT 1").fetchone()[0] == "FLOAT[8]"
    assert con.execute("SELECT DISTINCT typeof(embedding) FROM embeddings").fetchall() == [("FLOAT[]",)]
    assert (
        con.execute("SELECT typeof(embedding) FROM residue_embeddings LIMIT 1").fetchone()[0] == "FLOAT[8][]"
    )
    # float16 files read as FLOAT, and the array functions work on the typed views
    [(same,)] = con.execute(
        "SELECT min(array_cosine_similarity(embedding, embedding)) FROM embeddings_d16"
    ).fetchall()
    assert same == pytest.approx(1.0, abs=1e-5)
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 60


def test_empty_tables_are_typed_views(store: Path) -> None:
    types = dict(sql(store, "SELECT column_name, column_type FROM (DESCRIBE structures)"))
    assert types["mean_plddt"] == "FLOAT" and types["plddt"] == "FLOAT[]"
    assert sql(store, "SELECT count(*) FROM rejected WHERE run_id IS NOT NULL") == [(0,)]


# ------------------------------------------------------------------------------------------------ catalog.sql


def run_catalog(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    con.execute(path.read_text())


def test_catalog_sql_uses_relative_globs_and_says_how_to_read_it(store: Path) -> None:
    path = write_catalog(store)
    assert path == store / CATALOG_FILE
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("--") and ".read catalog.sql" in first and "file_search_path" in first
    assert str(store) not in text and "read_parquet('sequences/[!.]*.parquet'" in text
    assert "'embeddings/esm2_t6_8M_UR50D-0123abcd/[!.]*.parquet'" in text


def test_catalog_sql_reads_from_the_store_directory_and_from_anywhere(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_catalog(store)
    expected = sql(store, "SELECT (SELECT count(*) FROM members), (SELECT count(*) FROM embeddings)")
    count = "SELECT (SELECT count(*) FROM members), (SELECT count(*) FROM embeddings)"
    monkeypatch.chdir(store)  # cd STORE && duckdb -c ".read catalog.sql"
    con = duckdb.connect()
    run_catalog(con, Path(CATALOG_FILE))
    assert con.execute(count).fetchall() == expected
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # SET file_search_path='STORE' then .read STORE/catalog.sql
    con = duckdb.connect()
    con.execute(f"SET file_search_path = '{store}'")
    run_catalog(con, path)
    assert con.execute(count).fetchall() == expected
    assert con.execute("SELECT typeof(embedding) FROM embeddings LIMIT 1").fetchone()[0] == "FLOAT[8]"
    assert con.execute("SELECT count(DISTINCT run_id) FROM members").fetchone()[0] == 1


def test_catalog_sql_stays_true_as_files_are_added_and_ignores_temporaries(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_catalog(store)
    text = (store / CATALOG_FILE).read_text()
    before = sql(store, "SELECT count(*) FROM embeddings")[0][0]
    add_embeddings(store, "esm2_t6_8M_UR50D", 8, part=1)  # same model directory: no rewrite needed
    model_dir = store / "embeddings" / "esm2_t6_8M_UR50D-0123abcd"
    (model_dir / ".embed-2-00000.parquet.0badc0de.tmp").write_bytes(b"half a file")
    (model_dir / ".hidden.parquet").write_bytes(b"not parquet")
    (store / "quarantine" / "embeddings" / "esm2_t6_8M_UR50D-0123abcd").mkdir(parents=True)
    (store / "quarantine" / "sequences").mkdir()
    (store / "quarantine" / "sequences" / "bad.parquet").write_bytes(b"quarantined")
    (store / "quarantine" / "embeddings" / "esm2_t6_8M_UR50D-0123abcd" / "bad.parquet").write_bytes(b"q")
    assert write_catalog(store).read_text() == text  # nothing new to declare
    assert damaged_files(store) == []  # temporaries and quarantine are not table files
    monkeypatch.chdir(store)
    con = duckdb.connect()
    run_catalog(con, Path(CATALOG_FILE))
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 2 * before
    assert con.execute("SELECT count(*) FROM sequences").fetchone()[0] == 30


def test_catalog_sql_declares_empty_tables_typed_and_new_model_directories(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_embeddings(store, "esm2_t12_35M_UR50D", 16)
    write_catalog(store)
    monkeypatch.chdir(store)
    con = duckdb.connect()
    run_catalog(con, Path(CATALOG_FILE))
    assert con.execute("SELECT typeof(embedding) FROM embeddings_d16 LIMIT 1").fetchone()[0] == "FLOAT[16]"
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 60
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE structures)").fetchall())
    assert types["pdb"] == "VARCHAR" and types["plddt"] == "FLOAT[]"
    assert con.execute("SELECT count(*) FROM shards").fetchone()[0] == 0


def test_refresh_catalog_counts_every_view_and_writes_the_file(store: Path) -> None:
    from storage.catalog import refresh_catalog

    counts = refresh_catalog(store)
    assert counts["sequences"] == 30 and counts["embeddings"] == 30 and counts["structures"] == 0
    assert (store / CATALOG_FILE).read_text().startswith("-- proteoflow views")


# --------------------------------------------------------------------------------------------------- help


def test_help_lists_every_view_with_its_columns_from_the_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import build_parser

    def help_text() -> str:
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        return sub.choices["sql"].format_help()

    text = help_text()
    for table, schema in TABLE_SCHEMAS.items():
        entry = text[text.index(f"  {table}(") :].split(")\n", 1)[0].replace("\n", " ")
        for name in schema.names:
            assert name in entry, (table, name)
    assert "embedding FLOAT[D]" in text and "run_id, record_index" in text
    assert "--timeout" in text and "refused" in text and "examples:" in text
    # generated, not hand-written: a column added to a schema appears in the help
    monkeypatch.setitem(TABLE_SCHEMAS, "runs", RUN_SCHEMA.append(pa.field("operator_note", pa.string())))
    assert "operator_note" in help_text()


def test_cli_help_shows_the_views() -> None:
    result = run_cli("sql", "--help")
    assert result.returncode == 0 and b"  sequences(seq_hash, sequence, length)\n" in result.stdout
