"""Result tables (embeddings, per-residue embeddings, contacts, structures): where a model's rows live, which
rows a sequence already has, and how a shard's rows are committed.

Results are filed per model identity, ``<table>/<model>-<sha>/<run_id>-<shard>.parquet``, where ``sha``
is the checksum of the weights: two checkpoints that share a name never share a directory. What names one
row of a sequence (layer and pooling, say) is ``storage.schemas.ROW_KEYS``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from storage import objects
from storage.catalog import fetch_arrow, file_list
from storage.layout import Store, safe_name, write_table_atomic
from storage.objects import StorePath, read_table
from storage.schemas import ROW_KEYS


@dataclass(frozen=True)
class ModelIdentity:
    """Who computed a result: the model's name and the checksum of its weights."""

    name: str
    sha: str
    random_weights: bool = False


@dataclass(frozen=True)
class ResultRows:
    """The rows a job writes for each sequence into one result table: the table and the row keys it needs."""

    table: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class OutputFile:
    """One committed output file of a shard, as its shard record lists it (path relative to the store)."""

    table: str
    path: str
    rows: int
    bytes: int


def model_dir(store: Store, table: str, model: ModelIdentity) -> Path:
    """The directory of ``table`` holding one model identity's rows."""
    return store.table_dir(table) / f"{safe_name(model.name)}-{model.sha}"


def shard_path(store: Store, table: str, model: ModelIdentity, run_id: str, shard_id: int) -> Path:
    """Where one shard's rows of ``table`` land."""
    return model_dir(store, table, model) / f"{run_id}-{shard_id:05d}.parquet"


class DamagedStoreError(Exception):
    """A table a run would read or append to has a damaged file; the message says which and what to run."""


def refuse_damaged(store: Store, model: ModelIdentity, tables: list[str]) -> None:
    """Refuse to plan or append over result files that cannot be read (cheap: each file's footer)."""
    for table in tables:
        for path in _result_files(store, table, model):
            try:
                objects.parquet_file(path)
            except (OSError, pa.ArrowException) as exc:
                reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
                raise DamagedStoreError(
                    f"{path.relative_to(store.root)} is damaged ({reason}); run `proteoflow check --store "
                    f"{store.root} --repair` to quarantine it, then rerun"
                ) from None


def _result_files(store: Store, table: str, model: ModelIdentity) -> list[Path]:
    base = model_dir(store, table, model)
    return sorted(p for p in base.glob("*.parquet") if not p.name.startswith("."))


def _identity_filter(model: ModelIdentity) -> str:
    return f"model = '{model.name.replace(chr(39), chr(39) * 2)}' AND model_sha = '{model.sha}'"


def _has_all_keys(store: Store, model: ModelIdentity, rows: ResultRows) -> pa.Array:
    files = _result_files(store, rows.table, model)
    if not files:
        return pa.array([], pa.string())
    key = ROW_KEYS[rows.table].sql()
    wanted = ", ".join("'" + k.replace("'", "''") + "'" for k in rows.keys)
    sql = (
        f"SELECT seq_hash FROM read_parquet({file_list(files)}) WHERE {_identity_filter(model)} "
        f"AND ({key}) IN ({wanted}) GROUP BY seq_hash HAVING count(DISTINCT {key}) = {len(set(rows.keys))}"
    )
    return fetch_arrow(objects.duckdb_connection(), sql).column(0).combine_chunks()


def done_hashes(store: Store, model: ModelIdentity, wanted: list[ResultRows]) -> pa.Array:
    """``seq_hash`` values that already have every wanted row, in every wanted table, for this model identity."""
    done: pa.Array | None = None
    for rows in wanted:
        hashes = _has_all_keys(store, model, rows)
        done = hashes if done is None else done.filter(pc.is_in(done, value_set=hashes))
    return done if done is not None else pa.array([], pa.string())


def existing_keys(
    store: Store, table: str, model: ModelIdentity, hashes: pa.Array, skip: Collection[StorePath] = ()
) -> set[str]:
    """``seq_hash/key`` of rows already stored for the given sequences: a shard drops these before writing,
    so adding a layer or pooling to a later run never duplicates the rows an earlier run wrote. Files in
    ``skip`` (a shard's own outputs) are not read."""
    skipped = set(skip)
    files = [p for p in _result_files(store, table, model) if p not in skipped]
    if not files or not len(hashes):
        return set()
    con = objects.duckdb_connection()
    con.register("wanted", pa.table({"seq_hash": hashes}))
    sql = (
        f"SELECT DISTINCT seq_hash || '/' || ({ROW_KEYS[table].sql()}) FROM read_parquet({file_list(files)}) "
        f"SEMI JOIN wanted USING (seq_hash) WHERE {_identity_filter(model)}"
    )
    return set(fetch_arrow(con, sql).column(0).to_pylist())


def without_existing(rows: pa.Table, table: str, existing: set[str]) -> pa.Table:
    """``rows`` minus those whose ``seq_hash/key`` is in ``existing``."""
    if not existing or not rows.num_rows:
        return rows
    keys = pc.binary_join_element_wise(rows.column("seq_hash"), ROW_KEYS[table].arrow(rows), "/")
    return rows.filter(pc.invert(pc.is_in(keys, value_set=pa.array(list(existing), pa.string()))))


def write_shard_outputs(
    store: Store,
    model: ModelIdentity,
    run_id: str,
    shard_id: int,
    tables: dict[str, pa.Table],
    existing: dict[str, set[str]],
) -> list[OutputFile]:
    """Commit a shard's result tables, one atomic file per table, without the rows ``existing`` (table ->
    ``seq_hash/key``, from :func:`existing_keys`) says the store already holds."""
    outputs = []
    for table, rows in tables.items():
        rows = without_existing(rows, table, existing.get(table, set()))
        path = shard_path(store, table, model, run_id, shard_id)
        write_table_atomic(path, rows, table, {"run_id": run_id, "shard_id": shard_id})
        outputs.append(
            OutputFile(table, path.relative_to(store.root).as_posix(), rows.num_rows, path.stat().st_size)
        )
    return outputs


def rewrite_without_existing(
    store: Store, run_id: str, shard_id: int, outputs: list[OutputFile], existing: dict[str, set[str]]
) -> list[OutputFile]:
    """A shard's committed outputs, each rewritten (atomically, same path) without the rows ``existing``
    names, where it holds any; the manifest of the files as they now are. For a run whose lease lapsed
    after its actor wrote the shard: another run may have stored some of those rows meanwhile."""
    kept = []
    for out in outputs:
        path = store.root / out.path
        rows = read_table(path)
        fewer = without_existing(rows, out.table, existing.get(out.table, set()))
        if fewer.num_rows == rows.num_rows:
            kept.append(out)
            continue
        provenance = {"run_id": run_id, "shard_id": shard_id}
        write_table_atomic(path, fewer.replace_schema_metadata(None), out.table, provenance)
        kept.append(OutputFile(out.table, out.path, fewer.num_rows, path.stat().st_size))
    return kept


def missing_outputs(store: Store, outputs: list[OutputFile]) -> list[str]:
    """Outputs of a shard record that are absent or whose size differs from the record (lost or damaged)."""
    wrong = []
    for out in outputs:
        path = store.root / out.path
        try:
            if path.stat().st_size != out.bytes:
                wrong.append(f"{out.path} (size differs)")
        except (FileNotFoundError, OSError):
            wrong.append(f"{out.path} (missing)")
    return wrong
