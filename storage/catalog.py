"""DuckDB catalog: an in-memory DuckDB whose views read the store's Parquet files directly.

No server and no ``.duckdb`` file: the views are recreated on every open, so any DuckDB version that
reads Parquet can query a store. ``embedding`` columns are cast to ``FLOAT[D]`` so the array functions
(``array_cosine_similarity``, ``array_distance``) work on them directly.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from storage.layout import Store

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "RELATION"}

# Column lists used when a table has no files yet, so queries against an empty store still bind.
EMPTY_VIEWS = {
    "sequences": "NULL::VARCHAR AS seq_hash, NULL::VARCHAR AS sequence, NULL::INTEGER AS length",
    "members": "NULL::VARCHAR AS run_id, NULL::BIGINT AS record_index, NULL::VARCHAR AS seq_id, "
               "NULL::VARCHAR AS description, NULL::VARCHAR AS seq_hash, NULL::INTEGER AS length, "
               "NULL::VARCHAR AS source",
    "rejected": "NULL::VARCHAR AS run_id, NULL::BIGINT AS record_index, NULL::VARCHAR AS seq_id, "
                "NULL::VARCHAR AS description, NULL::VARCHAR AS source, NULL::VARCHAR AS rule, "
                "NULL::VARCHAR AS reason, NULL::INTEGER AS length",
    "runs": "NULL::VARCHAR AS run_id, NULL::VARCHAR AS kind, NULL::VARCHAR AS status, "
            "NULL::TIMESTAMPTZ AS started_at, NULL::TIMESTAMPTZ AS finished_at, NULL::VARCHAR AS params, "
            "NULL::VARCHAR AS counts, NULL::VARCHAR AS versions, NULL::VARCHAR AS message",
    "embeddings": "NULL::VARCHAR AS seq_hash, NULL::VARCHAR AS model, NULL::VARCHAR AS model_sha, "
                  "NULL::INTEGER AS layer, NULL::VARCHAR AS pooling, NULL::FLOAT[] AS embedding",
    "structures": "NULL::VARCHAR AS seq_hash, NULL::VARCHAR AS model, NULL::VARCHAR AS pdb, "
                  "NULL::FLOAT AS mean_plddt, NULL::FLOAT AS ptm",
}


class ReadOnlyError(Exception):
    """A statement that would write was given to the read-only SQL entry point."""


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _file_list(files: list[Path]) -> str:
    return "[" + ", ".join(_quote(f) for f in files) + "]"


def _vector_dims(files: list[Path], column: str = "embedding") -> dict[Path, int]:
    """The fixed vector width of each file's ``column`` (from the Arrow schema in its footer)."""
    dims = {}
    for path in files:
        field = pq.read_schema(path).field(column)
        dims[path] = getattr(field.type, "list_size", -1)
    return dims


def _vector_view(con: duckdb.DuckDBPyConnection, name: str, files: list[Path]) -> None:
    """Create ``name`` with ``embedding`` as FLOAT[D]; mixed widths get one ``name_dD`` view per width."""
    by_dim: dict[int, list[Path]] = {}
    for path, dim in _vector_dims(files).items():
        by_dim.setdefault(dim, []).append(path)
    for dim, group in sorted(by_dim.items()):
        cast = f"embedding::FLOAT[{dim}]" if dim > 0 else "embedding::FLOAT[]"
        select = f"SELECT * REPLACE ({cast} AS embedding) FROM read_parquet({_file_list(group)}, union_by_name=true)"
        con.execute(f"CREATE OR REPLACE VIEW {name}_d{dim} AS {select}")
        if len(by_dim) == 1:
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")
    if len(by_dim) > 1:
        # Vectors of different widths cannot share one FLOAT[D] column: the umbrella view keeps FLOAT[].
        parts = " UNION ALL BY NAME ".join(
            f"SELECT * REPLACE (embedding::FLOAT[] AS embedding) FROM {name}_d{dim}" for dim in sorted(by_dim))
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {parts}")


def open_catalog(root: str | Path) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB with one view per store table (empty, typed views for absent tables)."""
    store = Store(root)
    if not store.exists():
        raise FileNotFoundError(f"{root}: not a proteoflow store (no proteoflow.json); run `proteoflow ingest` first")
    con = duckdb.connect(":memory:")
    for table in Store.TABLES:
        files = store.files(table)
        if table in ("embeddings", "residue_embeddings") and files:
            _vector_view(con, table, files)
            continue
        if not files:
            if table in EMPTY_VIEWS:
                con.execute(f"CREATE VIEW {table} AS SELECT {EMPTY_VIEWS[table]} WHERE false")
            continue
        hive = table in ("members", "rejected")
        options = ", hive_partitioning=true, hive_types={'run_id': VARCHAR}" if hive else ""
        columns = "run_id, * EXCLUDE (run_id)" if hive else "*"
        con.execute(f"CREATE VIEW {table} AS SELECT {columns} FROM read_parquet({_file_list(files)}, "
                    f"union_by_name=true{options})")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse any statement that is not a query, naming it, before anything runs."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise duckdb.ParserException(str(exc).splitlines()[0]) from None
    if not statements:
        raise ReadOnlyError("no SQL statement given")
    for statement in statements:
        kind = statement.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise ReadOnlyError(
                f"proteoflow sql is read-only: a {kind} statement is refused "
                "(the store changes only through ingest, embed and fold)"
            )


def query(root: str | Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Run read-only SQL over the store's views; returns column names and rows."""
    con = open_catalog(root)
    check_read_only(con, sql)
    result = con.execute(sql)
    columns = [d[0] for d in result.description] if result.description else []
    return columns, result.fetchall()
