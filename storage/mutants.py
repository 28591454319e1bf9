"""What ``score-variants --variants CSV`` reads and writes besides the compute runs: the input records a CSV
names, the stored saturation tables its mutants are scored from, and the run's ``mutant_scores`` and
``rejected`` rows.

``mutant_scores`` files are filed per model identity like the result tables
(``mutant_scores/<model>-<sha>/<run_id>.parquet``; an ensemble's identity is its name and a checksum of its
members' checksums). A mutant that cannot be scored is a ``rejected`` row of the run
(``rejected/run_id=<run>/part-0.parquet``) with rule ``invalid_mutant``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from storage import objects
from storage.catalog import fetch_arrow, file_list
from storage.layout import Store, write_table_atomic
from storage.results import ModelIdentity, model_dir
from storage.schemas import MUTANT_SCORES_SCHEMA, REJECTED_SCHEMA

INVALID_MUTANT_RULE = "invalid_mutant"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def named_records(store: Store, ingest_run: str, ids: list[str]) -> pa.Table:
    """The accepted records of ``ingest_run`` whose ``seq_id`` is one of ``ids``, with their sequences:
    ``seq_id, description, seq_hash, length, sequence`` in record order."""
    members = sorted(store.run_dir("members", ingest_run).glob("[!.]*.parquet"))
    sequences = store.files("sequences")
    empty = pa.schema(
        [("seq_id", pa.string()), ("description", pa.string()), ("seq_hash", pa.string()),
         ("length", pa.int32()), ("sequence", pa.string())]
    )  # fmt: skip
    if not members or not sequences or not ids:
        return empty.empty_table()
    con = objects.duckdb_connection()
    con.register("wanted", pa.table({"seq_id": pa.array(sorted(set(ids)), pa.string())}))
    return fetch_arrow(
        con,
        f"""
        SELECT m.seq_id, m.description, m.seq_hash, m.length, s.sequence
        FROM read_parquet({file_list(members)}) m SEMI JOIN wanted USING (seq_id)
        JOIN read_parquet({file_list(sequences)}) s USING (seq_hash)
        ORDER BY m.record_index
        """,
    ).cast(empty)


def input_hashes(store: Store, ingest_run: str) -> set[str]:
    """The distinct sequences an ingest run accepted."""
    members = sorted(store.run_dir("members", ingest_run).glob("[!.]*.parquet"))
    if not members:
        return set()
    sql = f"SELECT DISTINCT seq_hash FROM read_parquet({file_list(members)})"
    return set(fetch_arrow(objects.duckdb_connection(), sql).column(0).to_pylist())


def read_saturation(store: Store, model: ModelIdentity, method: str, hashes: list[str]) -> pa.Table:
    """The stored ``variant_scores`` rows of these sequences for one model identity and method:
    ``seq_hash, position, wt, mt, score``, ordered by sequence, position and amino acid."""
    base = model_dir(store, "variant_scores", model)
    files = sorted(p for p in base.glob("*.parquet") if not p.name.startswith("."))
    columns = pa.schema(
        [("seq_hash", pa.string()), ("position", pa.int32()), ("wt", pa.string()), ("mt", pa.string()),
         ("score", pa.float32())]
    )  # fmt: skip
    if not files or not hashes:
        return columns.empty_table()
    con = objects.duckdb_connection()
    con.register("wanted", pa.table({"seq_hash": pa.array(sorted(set(hashes)), pa.string())}))
    return fetch_arrow(
        con,
        f"""
        SELECT seq_hash, position, wt, mt, score FROM read_parquet({file_list(files)})
        SEMI JOIN wanted USING (seq_hash)
        WHERE model = {_quote(model.name)} AND model_sha = {_quote(model.sha)} AND method = {_quote(method)}
        ORDER BY seq_hash, position, mt
        """,
    ).cast(columns)


def mutant_scores_path(store: Store, model: ModelIdentity, run_id: str) -> Path:
    """Where a run's mutant scores land."""
    return model_dir(store, "mutant_scores", model) / f"{run_id}.parquet"


def write_mutant_scores(store: Store, model: ModelIdentity, run_id: str, rows: pa.Table) -> Path:
    """Commit a run's ``mutant_scores`` rows (columns as MUTANT_SCORES_SCHEMA), replacing an earlier
    attempt's file of the same run."""
    table = rows.select(MUTANT_SCORES_SCHEMA.names).cast(MUTANT_SCORES_SCHEMA)
    return write_table_atomic(
        mutant_scores_path(store, model, run_id), table, "mutant_scores", {"run_id": run_id}
    )


def write_mutant_rejections(store: Store, run_id: str, rows: pa.Table) -> Path | None:
    """Commit the run's refused mutants as ``rejected`` rows (columns as REJECTED_SCHEMA, rule
    ``invalid_mutant``), replacing an earlier attempt's; without rows, an earlier file is removed."""
    path = store.run_dir("rejected", run_id) / "part-0.parquet"
    if not rows.num_rows:
        path.unlink(missing_ok=True)
        return None
    table = rows.select(REJECTED_SCHEMA.names).cast(REJECTED_SCHEMA)
    return write_table_atomic(path, table, "rejected", {"run_id": run_id})
