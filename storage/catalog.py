"""DuckDB catalog: an in-memory DuckDB whose views read the store's Parquet files directly.

No server and no ``.duckdb`` file: the views are recreated on every open, so any DuckDB version that
reads Parquet can query a store. ``embedding`` columns are cast to ``FLOAT[D]`` so the array functions
(``array_cosine_similarity``, ``array_distance``) work on them directly.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import Store, write_bytes_atomic
from storage.schemas import HIVE_TABLES, TABLE_SCHEMAS

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN", "RELATION"}
VECTOR_TABLES = ("embeddings", "residue_embeddings")


def _duckdb_type(kind: pa.DataType) -> str:
    """The DuckDB type a view exposes for an Arrow column type (vectors as FLOAT[] / FLOAT[][])."""
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        return _duckdb_type(kind.value_type) + "[]"
    if pa.types.is_struct(kind):
        return "STRUCT(" + ", ".join(f"\"{f.name}\" {_duckdb_type(f.type)}" for f in kind) + ")"
    if pa.types.is_floating(kind):
        return "FLOAT" if kind.bit_width <= 32 else "DOUBLE"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMPTZ"
    return {
        pa.string(): "VARCHAR",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.bool_(): "BOOLEAN",
    }[kind]


def _empty_views() -> dict[str, str]:
    """Typed, empty column lists for tables with no files yet, so queries on a new store still bind."""
    views = {}
    for table, schema in TABLE_SCHEMAS.items():
        columns = [f"NULL::{_duckdb_type(f.type)} AS {f.name}" for f in schema]
        if table in HIVE_TABLES:
            columns.insert(0, "NULL::VARCHAR AS run_id")
        views[table] = ", ".join(columns)
    return views


def fetch_arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """A query's result as an Arrow table, across DuckDB versions (2.x renamed ``arrow()``)."""
    relation = con.sql(sql)
    method = getattr(relation, "to_arrow_table", None) or relation.arrow
    return method()


class ReadOnlyError(Exception):
    """A statement that would write was given to the read-only SQL entry point."""


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def file_list(files: list[Path]) -> str:
    """A DuckDB list literal of file paths, quoted."""
    return "[" + ", ".join(_quote(f) for f in files) + "]"


def _vector_dims(files: list[Path], column: str = "embedding") -> dict[Path, int]:
    """The fixed vector width of each file's ``column`` (from the Arrow schema in its footer)."""
    dims = {}
    for path in files:
        kind = pq.read_schema(path).field(column).type
        if pa.types.is_list(kind):  # per-residue: a list of fixed-size vectors
            kind = kind.value_type
        dims[path] = getattr(kind, "list_size", -1)
    return dims


def _vector_views(name: str, files: list[Path], per_residue: bool) -> list[str]:
    """``name`` with ``embedding`` as FLOAT[D] (or FLOAT[D][]); mixed widths add one ``name_dD`` view each."""
    by_dim: dict[int, list[Path]] = {}
    for path, dim in _vector_dims(files).items():
        by_dim.setdefault(dim, []).append(path)
    suffix = "[]" if per_residue else ""
    statements = []
    for dim, group in sorted(by_dim.items()):
        cast = f"embedding::FLOAT[{dim}]{suffix}" if dim > 0 else f"embedding::FLOAT[]{suffix}"
        select = f"SELECT * REPLACE ({cast} AS embedding) FROM read_parquet({file_list(group)}, union_by_name=true)"
        statements.append(f"CREATE OR REPLACE VIEW {name}_d{dim} AS {select}")
        if len(by_dim) == 1:
            statements.append(f"CREATE OR REPLACE VIEW {name} AS {select}")
    if len(by_dim) > 1:
        # Vectors of different widths cannot share one FLOAT[D] column: the umbrella view keeps FLOAT[].
        parts = " UNION ALL BY NAME ".join(
            f"SELECT * REPLACE (embedding::FLOAT[]{suffix} AS embedding) FROM {name}_d{dim}"
            for dim in sorted(by_dim)
        )
        statements.append(f"CREATE OR REPLACE VIEW {name} AS {parts}")
    return statements


def view_statements(root: str | Path) -> list[str]:
    """The DDL that defines every view over the store's current files (empty, typed views for absent tables)."""
    store = Store(root)
    statements = []
    empty: dict[str, str] = {}
    for table in Store.TABLES:
        files = store.files(table)
        if table in VECTOR_TABLES and files:
            statements += _vector_views(table, files, per_residue=table == "residue_embeddings")
        elif not files:
            empty = empty or _empty_views()
            statements.append(f"CREATE OR REPLACE VIEW {table} AS SELECT {empty[table]} WHERE false")
        else:
            hive = table in HIVE_TABLES
            options = ", hive_partitioning=true, hive_types={'run_id': VARCHAR}" if hive else ""
            columns = "run_id, * EXCLUDE (run_id)" if hive else "*"
            statements.append(
                f"CREATE OR REPLACE VIEW {table} AS SELECT {columns} FROM "
                f"read_parquet({file_list(files)}, union_by_name=true{options})"
            )
    return statements


def open_catalog(root: str | Path) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB with one view per store table."""
    if not Store(root).exists():
        raise FileNotFoundError(
            f"{root}: not a proteoflow store (no proteoflow.json); run `proteoflow ingest` first"
        )
    con = duckdb.connect(":memory:")
    for statement in view_statements(root):
        con.execute(statement)
    return con


def refresh_catalog(root: str | Path) -> dict[str, int]:
    """Check every view answers, and write ``catalog.sql`` so any DuckDB client can `.read` the same views."""
    con = open_catalog(root)
    counts = {
        name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    header = "-- proteoflow views over this store's Parquet files; in the duckdb CLI: .read catalog.sql\n"
    write_bytes_atomic(
        Path(root) / "catalog.sql", (header + ";\n".join(view_statements(root)) + ";\n").encode()
    )
    return counts


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
        if kind == "EXPLAIN" and re.match(r"\s*explain\s+analy[sz]e\b", statement.query, re.IGNORECASE):
            kind = "EXPLAIN ANALYZE"  # runs the explained statement, which may write
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
