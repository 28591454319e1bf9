"""Result tables (embeddings, per-residue embeddings, contacts, structures): schemas, file layout and the
question every planner asks: which sequences already have results for this model?

Results are filed per model identity, ``<table>/<model>-<sha>/<run_id>-<shard>.parquet``, where ``sha``
is the checksum of the weights: two checkpoints that share a name never share a directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa

from storage.catalog import fetch_arrow, file_list
from storage.layout import Store, write_table_atomic


def safe_name(text: str) -> str:
    """A file-system-safe rendering of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def model_dir(store: Store, table: str, model: str, sha: str) -> Path:
    return store.table_dir(table) / f"{safe_name(model)}-{sha}"


def shard_path(store: Store, table: str, model: str, sha: str, run_id: str, shard_id: int) -> Path:
    """Where one shard's rows of ``table`` land; its existence marks the shard done."""
    return model_dir(store, table, model, sha) / f"{run_id}-{shard_id:05d}.parquet"


def write_shard(path: Path, table: pa.Table, provenance: dict) -> Path:
    """Commit one shard's output atomically (temp file + rename)."""
    return write_table_atomic(path, table, path.parent.parent.name, provenance)


def _result_files(store: Store, table: str, model: str, sha: str) -> list[Path]:
    base = model_dir(store, table, model, sha)
    return sorted(p for p in base.glob("*.parquet") if not p.name.startswith("."))


def _identity_filter(model: str, sha: str) -> str:
    return f"model = '{model.replace(chr(39), chr(39) * 2)}' AND model_sha = '{sha}'"


def computed_hashes(
    store: Store, table: str, model: str, sha: str, key_sql: str | None = None, keys: list[str] | None = None
) -> pa.Array:
    """``seq_hash`` values that already have every required row in ``table`` for this model identity.

    ``key_sql`` is an expression naming a row kind (e.g. ``layer || ':' || pooling``) and ``keys`` the kinds
    required; a sequence missing any of them is not done. Without keys, any row counts.
    """
    files = _result_files(store, table, model, sha)
    if not files:
        return pa.array([], pa.string())
    con = duckdb.connect(":memory:")
    source = f"read_parquet({file_list(files)})"
    where = _identity_filter(model, sha)
    if keys:
        wanted = ", ".join("'" + k.replace("'", "''") + "'" for k in keys)
        sql = (
            f"SELECT seq_hash FROM {source} WHERE {where} AND ({key_sql}) IN ({wanted}) "
            f"GROUP BY seq_hash HAVING count(DISTINCT {key_sql}) = {len(set(keys))}"
        )
    else:
        sql = f"SELECT DISTINCT seq_hash FROM {source} WHERE {where}"
    return fetch_arrow(con, sql).column(0).combine_chunks()


def existing_keys(store: Store, table: str, model: str, sha: str, key_sql: str, hashes: pa.Array) -> set[str]:
    """``seq_hash/key`` of rows already stored for the given sequences: a shard drops these before writing,
    so adding a layer or pooling to a later run never duplicates the rows an earlier run wrote."""
    files = _result_files(store, table, model, sha)
    if not files or not len(hashes):
        return set()
    con = duckdb.connect(":memory:")
    con.register("wanted", pa.table({"seq_hash": hashes}))
    sql = (
        f"SELECT DISTINCT seq_hash || '/' || ({key_sql}) FROM read_parquet({file_list(files)}) "
        f"SEMI JOIN wanted USING (seq_hash) WHERE {_identity_filter(model, sha)}"
    )
    return set(fetch_arrow(con, sql).column(0).to_pylist())
