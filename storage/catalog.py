"""DuckDB over the store's Parquet files: the sealed session ``proteoflow sql`` queries, and ``catalog.sql``.

Every open reads each file's footer (cheap) so a damaged file is skipped and named instead of failing every
query. The session reads the files through pyarrow datasets registered in an in-memory DuckDB whose views
live in a read-only attached catalog; DuckDB itself then has no file system, no extensions and a locked
configuration, so no statement can write, read outside the store or download, whatever gets past
:func:`check_read_only`. ``embedding`` columns are ``FLOAT[D]`` so the array functions
(``array_cosine_similarity``, ``array_distance``) work on them directly.

``catalog.sql`` holds the same views over relative globs (``sequences/[!.]*.parquet``, one glob per model
directory of the vector tables), so it stays true as files are added; writers call :func:`write_catalog`
after a change that adds a table or a model directory.
"""

from __future__ import annotations

import contextlib
import json
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from storage import objects
from storage.layout import FORMAT_VERSION, Store, write_bytes_atomic
from storage.objects import ObjectPath
from storage.schemas import HIVE_TABLES, MODEL_DIR_TABLES, TABLE_SCHEMAS

VECTOR_TABLES = ("embeddings", "residue_embeddings")
CATALOG_FILE = "catalog.sql"
PARQUET_GLOB = "[!.]*.parquet"  # never a hidden file: writers' temporaries start with '.'
USAGE = (  # both forms checked with the duckdb CLI; -c instead of -cmd runs a query and exits
    "-- proteoflow views over this store's Parquet files, by paths relative to the store. "
    'In the store directory: cd STORE && duckdb -cmd ".read catalog.sql"   From anywhere: '
    'duckdb -cmd "SET file_search_path=\'/abs/path/to/STORE\'" -cmd ".read /abs/path/to/STORE/catalog.sql"\n'
)
REMOTE_USAGE = (
    "-- proteoflow views over this store's Parquet files, by paths relative to the store, which lives on object "
    'storage: query it with `proteoflow sql --store {root} "SELECT ..."` (it reads through pyarrow\'s file system, '
    "no DuckDB extension needed)\n"
)
SESSION_SETTINGS = (
    "SET python_enable_replacements = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)
FOOTER_THREADS = 8  # footer reads wait on the disk more than on the CPU
REFUSAL = "the store changes only through ingest, embed and fold"


class ReadOnlyError(Exception):
    """A statement that would write was given to the read-only SQL entry point."""


class StoreFormatError(Exception):
    """The store was written by a newer proteoflow (or its manifest is unreadable): refuse, do not guess."""


class QueryTimeout(Exception):
    """A query ran past its time limit and was interrupted."""


# ------------------------------------------------------------------------------------------- types, quoting


def _duckdb_type(kind: pa.DataType) -> str:
    """The DuckDB type a view exposes for an Arrow column type (vectors as FLOAT[] / FLOAT[][])."""
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        return _duckdb_type(kind.value_type) + "[]"
    if pa.types.is_struct(kind):
        return "STRUCT(" + ", ".join(f'"{f.name}" {_duckdb_type(f.type)}' for f in kind) + ")"
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


def view_columns(table: str) -> list[tuple[str, str]]:
    """(column, DuckDB type) of a view as ``sql`` exposes it, from the table's schema (vectors as FLOAT[D])."""
    schema = TABLE_SCHEMAS[table]
    columns = [("run_id", "VARCHAR")] if table in HIVE_TABLES else []
    for f in schema:
        kind = _duckdb_type(f.type)
        if table in VECTOR_TABLES and f.name == "embedding":
            kind = "FLOAT[D]" + ("[]" if table == "residue_embeddings" else "")
        columns.append((f.name, kind))
    return columns


def _empty_select(table: str) -> str:
    """A typed, empty SELECT for a table with no files yet, so queries on a new store still bind."""
    columns = [f"NULL::{_duckdb_type(f.type)} AS {f.name}" for f in TABLE_SCHEMAS[table]]
    if table in HIVE_TABLES:
        columns.insert(0, "NULL::VARCHAR AS run_id")
    return f"SELECT {', '.join(columns)} WHERE false"


def fetch_arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """A query's result as an Arrow table, across DuckDB versions (2.x renamed ``arrow()``)."""
    relation = con.sql(sql)
    method = getattr(relation, "to_arrow_table", None) or relation.arrow
    return method()


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def file_list(files: list[Path]) -> str:
    """A DuckDB list literal of file paths, quoted."""
    return "[" + ", ".join(_quote(f) for f in files) + "]"


# ------------------------------------------------------------------------------------ store files, damage


def check_format(root: str | Path) -> Store:
    """The store at ``root``; FileNotFoundError when it is none, StoreFormatError when it is too new."""
    store = Store(root)
    manifest = store.root / "proteoflow.json"
    if not manifest.exists():
        raise FileNotFoundError(
            f"{root}: not a proteoflow store (no proteoflow.json); run `proteoflow ingest` first"
        )
    try:
        version = json.loads(manifest.read_text())["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreFormatError(f"{manifest}: unreadable store manifest ({exc})") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{root}: store format version {version} is newer than this proteoflow reads "
            f"({FORMAT_VERSION}); upgrade proteoflow"
        )
    return store


def table_pattern(table: str) -> str:
    """Where a table's files lie under its directory, as a glob (Python's and DuckDB's alike)."""
    if table in HIVE_TABLES:
        return f"run_id=*/{PARQUET_GLOB}"
    if table in MODEL_DIR_TABLES:
        return f"[!.]*/{PARQUET_GLOB}"  # one directory per model identity
    return PARQUET_GLOB


def table_files(store: Store, table: str) -> list[Path]:
    """A table's committed files where its layout puts them (hidden temporaries and directories excluded)."""
    base = store.table_dir(table)
    if not base.is_dir():
        return []
    found = base.glob(table_pattern(table))
    return sorted(
        p for p in found if p.is_file() and not any(s.startswith(".") for s in p.relative_to(base).parts)
    )


def _footer_schema(path: Path) -> pa.Schema:
    """The Arrow schema in a Parquet file's footer; raises on a file that cannot be Parquet."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    return objects.parquet_file(path).metadata.schema.to_arrow_schema()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


@dataclass
class StoreScan:
    """Each table's sound files with their footer schemas, and the files that could not be read."""

    sound: dict[str, list[tuple[Path, pa.Schema]]] = field(default_factory=dict)
    damaged: list[tuple[Path, str]] = field(default_factory=list)


def _footer_or_reason(path: Path) -> pa.Schema | str:
    try:
        return _footer_schema(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return _one_line(exc)


def scan_store(store: Store) -> StoreScan:
    """Read every file's footer once (on a few threads: pyarrow reads them without the GIL): the schemas
    the views need, and the damaged files to skip."""
    scan = StoreScan()
    files = {table: table_files(store, table) for table in Store.TABLES}
    every = [path for paths in files.values() for path in paths]
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        found = dict(zip(every, pool.map(_footer_or_reason, every), strict=True))
    for table, paths in files.items():
        scan.sound[table] = [(p, found[p]) for p in paths if isinstance(found[p], pa.Schema)]
        scan.damaged += [(p, found[p]) for p in paths if isinstance(found[p], str)]
    return scan


def damaged_files(store: str | Path | Store) -> list[tuple[Path, str]]:
    """Every table file whose Parquet footer cannot be read, with a one-line reason (footers only: cheap)."""
    return scan_store(store if isinstance(store, Store) else Store(store)).damaged


# ------------------------------------------------------------------------------------------- schemas, views


def _widen(kind: pa.DataType) -> pa.DataType:
    """float16 as float32 (DuckDB has no half floats), inside lists and structs too."""
    if pa.types.is_float16(kind):
        return pa.float32()
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(_widen(kind.value_type), kind.list_size)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(_widen(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_widen(f.type)) for f in kind])
    return kind


def _vector_dim(schema: pa.Schema) -> int:
    """The fixed width of ``embedding`` (per-residue: of its vectors); 0 when it has none."""
    kind = schema.field("embedding").type if "embedding" in schema.names else pa.null()
    if pa.types.is_list(kind):
        kind = kind.value_type
    return kind.list_size if pa.types.is_fixed_size_list(kind) else 0


def _merge(table: str, files: list[tuple[Path, pa.Schema]], damaged: list) -> tuple[pa.Schema, list[Path]]:
    """One schema for files read together (columns by name, as DuckDB's union_by_name); files whose columns
    cannot join the others' are damaged. Files mostly share one schema, so each distinct one is merged once."""
    by_schema: dict[pa.Schema, list[Path]] = {}
    for path, own in files:
        by_schema.setdefault(own, []).append(path)
    schema: pa.Schema | None = None
    kept: list[Path] = []
    for raw, paths in by_schema.items():
        own = pa.schema([f.with_type(_widen(f.type)) for f in raw])
        try:
            schema = own if schema is None else pa.unify_schemas([schema, own], promote_options="permissive")
        except (pa.ArrowException, ValueError) as exc:
            reason = f"columns do not match the other {table} files ({_one_line(exc)})"
            damaged += [(path, reason) for path in paths]
            continue
        kept += paths
    return schema, sorted(kept)


def _groups(table: str, files: list) -> dict[int, list]:
    """Files read together: by vector width for the vector tables (FLOAT[D] needs one D), else all."""
    if table not in VECTOR_TABLES:
        return {0: files} if files else {}
    groups: dict[int, list] = {}
    for item in files:
        groups.setdefault(_vector_dim(item[1]), []).append(item)
    return dict(sorted(groups.items()))


def table_ddl(table: str, sources: dict[int, str], typed: bool = False) -> list[str]:
    """The views of one table over its sources (FROM-able SQL, keyed by vector width; one key 0 otherwise):
    ``embedding`` as FLOAT[D] (or FLOAT[D][]), mixed widths add one ``<table>_d<D>`` view each and leave
    FLOAT[] in the umbrella view; no source: a typed, empty view. ``typed``: the sources already give
    FLOAT[D] (Arrow fixed-size lists), so no cast (a cast copies every vector)."""
    if not sources:
        return [f"CREATE OR REPLACE VIEW {table} AS {_empty_select(table)}"]
    columns = "run_id, * EXCLUDE (run_id)" if table in HIVE_TABLES else "*"
    if table not in VECTOR_TABLES:
        [source] = sources.values()
        return [f"CREATE OR REPLACE VIEW {table} AS SELECT {columns} FROM {source}"]
    suffix = "[]" if table == "residue_embeddings" else ""
    statements, parts = [], []
    for dim, source in sources.items():
        width = f"[{dim}]" if dim else "[]"
        select = f"SELECT * REPLACE (embedding::FLOAT{width}{suffix} AS embedding) FROM {source}"
        if typed and dim:
            select = f"SELECT * FROM {source}"
        if dim:
            statements.append(f"CREATE OR REPLACE VIEW {table}_d{dim} AS {select}")
        parts.append(f"SELECT * REPLACE (embedding::FLOAT[]{suffix} AS embedding) FROM {source}")
        if len(sources) == 1:
            statements.append(f"CREATE OR REPLACE VIEW {table} AS {select}")
    if len(sources) > 1:
        statements.append(f"CREATE OR REPLACE VIEW {table} AS {' UNION ALL BY NAME '.join(parts)}")
    return statements


def _glob_source(store: Store, table: str, folders: list[Path]) -> str:
    """read_parquet over store-relative globs: the whole table, or the model directories of one width."""
    if table in VECTOR_TABLES:
        dirs = sorted(f.relative_to(store.root).as_posix() for f in folders)
        globs = file_list([f"{d}/{PARQUET_GLOB}" for d in dirs])
    else:
        globs = _quote(f"{table}/{table_pattern(table)}")
    options = ", hive_partitioning=true, hive_types={'run_id': VARCHAR}" if table in HIVE_TABLES else ""
    return f"read_parquet({globs}, union_by_name=true{options})"


def _model_dirs_by_dim(store: Store, table: str) -> dict[int, list[Path]]:
    """A vector table's model directories by vector width, from one sound footer in each (cheap)."""
    by_dim: dict[int, list[Path]] = {}
    for folder, paths in groupby(table_files(store, table), key=lambda p: p.parent):
        for path in paths:
            schema = _footer_or_reason(path)
            if isinstance(schema, pa.Schema):
                by_dim.setdefault(_vector_dim(schema), []).append(folder)
                break
    return dict(sorted(by_dim.items()))


def catalog_statements(root: str | Path) -> list[str]:
    """The DDL of ``catalog.sql``: every view over relative globs, valid while files are added. Reads only
    one footer per model directory of the vector tables (their width), so writers can call it often."""
    store = check_format(root)
    statements = []
    for table in Store.TABLES:
        if table in VECTOR_TABLES:
            groups = _model_dirs_by_dim(store, table)
        else:
            groups = {0: [store.table_dir(table)]} if table_files(store, table) else {}
        sources = {dim: _glob_source(store, table, folders) for dim, folders in groups.items()}
        statements += table_ddl(table, sources)
    return statements


def write_catalog(root: str | Path) -> Path:
    """Write ``catalog.sql`` (relative globs; its first line says how to read it); returns its path.

    Call after a change that adds a table's first file or a new model directory: other new files already
    match the globs."""
    path = Store(root).root / CATALOG_FILE
    usage = REMOTE_USAGE.format(root=path.parent) if isinstance(path, ObjectPath) else USAGE
    write_bytes_atomic(path, (usage + ";\n".join(catalog_statements(root)) + ";\n").encode())
    return path


# ------------------------------------------------------------------------------------------ sealed session


@dataclass
class Catalog:
    """A sealed DuckDB session over a store, and the damaged files its views leave out."""

    con: duckdb.DuckDBPyConnection
    damaged: list[tuple[Path, str]]


def _dataset(store: Store, table: str, schema: pa.Schema, paths: list[Path]) -> ds.Dataset:
    """A pyarrow dataset over sound files, typed by their merged schema (run_id from the directory)."""
    if table not in HIVE_TABLES:
        return objects.dataset(paths, schema=schema, format="parquet")
    run_id = pa.schema([("run_id", pa.string())])
    return objects.dataset(
        paths,
        schema=schema.append(run_id.field(0)) if "run_id" not in schema.names else schema,
        format="parquet",
        partitioning=ds.partitioning(run_id, flavor="hive"),
        partition_base_dir=objects.native(store.table_dir(table)),
    )


def _register(con: duckdb.DuckDBPyConnection, store: Store, scan: StoreScan) -> list[str]:
    """Register each sound file group as an Arrow dataset; returns the DDL of the views over them."""
    statements = []
    for table in Store.TABLES:
        sources = {}
        for dim, files in _groups(table, scan.sound[table]).items():
            schema, paths = _merge(table, files, scan.damaged)
            if paths:
                name = f"_files_{table}" + (f"_d{dim}" if table in VECTOR_TABLES else "")
                con.register(name, _dataset(store, table, schema, paths))
                sources[dim] = name
        statements += table_ddl(table, sources, typed=True)
    return statements


def _seal(con: duckdb.DuckDBPyConnection, statements: list[str]) -> None:
    """Create the views in a database file, attach it read-only as the only catalog, and switch DuckDB's
    file system, extension loading and configuration off: nothing run afterwards can write or escape."""
    with tempfile.TemporaryDirectory(prefix="proteoflow-sql-") as tmp:
        path = _quote(Path(tmp) / "views.duckdb")
        con.execute(f"ATTACH {path} AS build")
        con.execute("USE build")
        for statement in statements:
            con.execute(statement)
        con.execute("USE memory")
        con.execute("DETACH build")
        con.execute(f"ATTACH {path} AS store (READ_ONLY)")
        con.execute("USE store")
        con.execute("DETACH memory")
    # Spill big sorts and joins outside the store (DuckDB's default is ./.tmp, maybe the store itself).
    spill = Path(tempfile.gettempdir()) / f"proteoflow-sql-{uuid.uuid4().hex[:12]}"
    con.execute(f"SET temp_directory = {_quote(spill)}")
    for setting in SESSION_SETTINGS:
        con.execute(setting)


def connect(root: str | Path) -> Catalog:
    """A sealed, read-only DuckDB session with one view per store table (damaged files left out)."""
    store = check_format(root)
    scan = scan_store(store)
    con = duckdb.connect(":memory:")
    try:
        _seal(con, _register(con, store, scan))
    except BaseException:
        con.close()
        raise
    return Catalog(con, scan.damaged)


def open_catalog(root: str | Path) -> duckdb.DuckDBPyConnection:
    """A sealed, read-only DuckDB session with one view per store table (see :func:`connect`)."""
    return connect(root).con


def refresh_catalog(root: str | Path) -> dict[str, int]:
    """Check every view answers (row counts by view), and rewrite ``catalog.sql``."""
    con = open_catalog(root)
    names = con.execute("SELECT view_name FROM duckdb_views() WHERE database_name = 'store'").fetchall()
    counts = {name: con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for (name,) in names}
    write_catalog(root)
    return counts


# ------------------------------------------------------------------------------------------ the SQL check


def _explained(sql: str) -> tuple[bool, str]:
    """Whether an EXPLAIN statement is an ANALYZE form (which runs what it explains), and the text of the
    statement it explains, found with DuckDB's tokenizer after the grammar's options."""
    found = [(start, sql[start:end].strip()) for (start, _), end in _spans(sql)]
    words = [w.strip('"').upper() for _, w in found]
    i, analyze = 1, False
    if i < len(words) and words[i] == "(":
        depth, i = 1, i + 1
        while i < len(words) and depth:
            depth += {"(": 1, ")": -1}.get(words[i], 0)
            analyze |= words[i] in ("ANALYZE", "ANALYSE")
            i += 1
    else:
        if i < len(words) and words[i] in ("ANALYZE", "ANALYSE"):
            analyze, i = True, i + 1
        if i < len(words) and words[i] == "VERBOSE":
            i += 1
    return analyze, sql[found[i][0] :] if i < len(found) else ""


def _spans(sql: str) -> list[tuple[tuple[int, object], int]]:
    """Non-comment tokens of ``sql`` with their end offsets."""
    found = duckdb.tokenize(sql)
    ends = [start for start, _ in found[1:]] + [len(sql)]
    return [(tok, end) for tok, end in zip(found, ends, strict=True) if tok[1] != duckdb.token_type.comment]


def _first_word(sql: str) -> str:
    spans = _spans(sql)
    return sql[spans[0][0][0] : spans[0][1]].strip().upper() if spans else "empty"


def _is_query(con: duckdb.DuckDBPyConnection, sql: str) -> bool:
    """Whether DuckDB parses ``sql`` as a subquery: only a query can stand there (PIVOT without an IN list
    parses as a MULTI statement, whose parts the Python API does not show)."""
    try:
        wrapped = con.extract_statements(f"SELECT * FROM (\n{sql}\n)")
    except duckdb.Error:
        return False
    return len(wrapped) == 1


def refusal(con: duckdb.DuckDBPyConnection, statement: duckdb.Statement) -> str | None:
    """The kind of a parsed statement that is refused (e.g. ``COPY``, ``EXPLAIN ANALYZE``), or None for a
    query: SELECT in all its forms (WITH, VALUES, PIVOT, DESCRIBE, SUMMARIZE, SHOW) and a plain EXPLAIN."""
    kind = statement.type.name
    if kind == "MULTI":  # PIVOT without an IN list, alone or inside another statement
        kind = "EXPLAIN" if _first_word(statement.query) == "EXPLAIN" else kind
        if kind == "MULTI":
            return None if _is_query(con, statement.query) else _first_word(statement.query)
    if kind == "EXPLAIN":
        return _explain_refusal(con, statement.query)
    return None if kind == "SELECT" else kind.replace("_", " ")


def _explain_refusal(con: duckdb.DuckDBPyConnection, sql: str) -> str | None:
    """EXPLAIN ANALYZE runs what it explains, so it is refused in every form; a plain EXPLAIN must explain
    a query."""
    analyze, inner = _explained(sql)
    if analyze:
        return "EXPLAIN ANALYZE"
    try:
        parts = con.extract_statements(inner)
    except duckdb.Error:
        return "EXPLAIN of something other than a query"
    if len(parts) != 1 or _first_word(parts[0].query) == "EXPLAIN":
        return "EXPLAIN of something other than a query"
    why = refusal(con, parts[0])
    return None if why is None else f"EXPLAIN of {why}"


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but queries, by DuckDB's parser, naming the statement kind, before anything runs."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise duckdb.ParserException(str(exc).splitlines()[0]) from None
    if not statements:
        raise ReadOnlyError("no SQL statement given")
    for statement in statements:
        why = refusal(con, statement)
        if why is not None:
            raise ReadOnlyError(f"read-only: {why} statements are refused ({REFUSAL})")


# ------------------------------------------------------------------------------------------------ running


def run_query(
    con: duckdb.DuckDBPyConnection, sql: str, timeout: float | None = None
) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` on a worker thread so Ctrl-C (KeyboardInterrupt, raised once DuckDB has stopped) and
    ``timeout`` (QueryTimeout) interrupt it within a fraction of a second."""
    outcome: dict[str, object] = {}
    done = threading.Event()  # not Thread.join: a Ctrl-C inside join() can mark a running thread stopped

    def work() -> None:
        try:
            result = con.execute(sql)
            outcome["columns"] = [d[0] for d in result.description] if result.description else []
            outcome["rows"] = result.fetchall()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    interrupted = threading.Event()
    with _sigint_interrupts(con, interrupted):
        threading.Thread(target=work, name="proteoflow-sql", daemon=True).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.05):
            if interrupted.is_set():
                _stop(con, done)
            elif deadline is not None and time.monotonic() > deadline:
                _stop(con, done)
                raise QueryTimeout(f"query timed out after {timeout:g} s (--timeout)")
    if interrupted.is_set():
        raise KeyboardInterrupt
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["columns"], outcome["rows"]  # type: ignore[return-value]


@contextlib.contextmanager
def _sigint_interrupts(con: duckdb.DuckDBPyConnection, interrupted: threading.Event) -> Iterator[None]:
    """While a query runs, Ctrl-C interrupts DuckDB (and is remembered) instead of raising at a random line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        interrupted.set()
        con.interrupt()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(con: duckdb.DuckDBPyConnection, done: threading.Event, wait_s: float = 1.0) -> None:
    """Interrupt the running query (again, should it not have started yet) until the worker returns."""
    deadline = time.monotonic() + wait_s
    while not done.is_set() and time.monotonic() < deadline:
        con.interrupt()
        done.wait(0.02)


def query(
    root: str | Path,
    sql: str,
    timeout: float | None = None,
    warn: Callable[[Path, str], None] | None = None,
) -> tuple[list[str], list[tuple]]:
    """Run read-only SQL over the store's views; returns column names and rows. ``warn`` hears each
    damaged file that was left out."""
    catalog = connect(root)
    for path, reason in catalog.damaged:
        if warn is not None:
            warn(path, reason)
    check_read_only(catalog.con, sql)
    result = run_query(catalog.con, sql, timeout)
    catalog.con.close()  # not on failure: an interrupted query may still be unwinding on its thread
    return result
