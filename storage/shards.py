"""What a compute run leaves per shard besides its results: the shard's record and its rejected sequences.

A shard record is written after the shard's outputs and lists them (path, rows, bytes): resume trusts a
``done`` record only when it belongs to the current plan and every output it lists is present and whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from storage import objects
from storage.layout import Store, write_table_atomic
from storage.results import ModelIdentity, OutputFile, missing_outputs, shard_path
from storage.runs import utcnow
from storage.schemas import MEMBER_SCHEMA, REJECTED_SCHEMA, RESULT_TABLES, SHARD_SCHEMA

COMPUTE_ERROR_RULE = "compute_error"


@dataclass
class ShardRecord:
    """One shard of a compute run: how it ended, on which try, what it computed and which files it wrote."""

    shard_id: int
    status: str  # "done" | "failed"
    attempt: int  # the run attempt (resume count) that wrote this record
    tries: int  # dispatches of this shard within that attempt
    sequences: int
    residues: int = 0
    errors: int = 0
    fallbacks: int = 0
    seconds: float = 0.0
    worker: str = ""
    error: str = ""
    plan_id: str = ""
    outputs: list[OutputFile] = field(default_factory=list)
    finished_at: datetime = field(default_factory=utcnow)


def write_shard_record(store: Store, run_id: str, record: ShardRecord) -> None:
    """Commit a shard's record (after its outputs: a ``done`` record is what resume trusts)."""
    row = asdict(record)
    table = pa.Table.from_pylist([row], schema=SHARD_SCHEMA)
    write_table_atomic(store.shard_record_path(run_id, record.shard_id), table, "shard", {"run_id": run_id})


def load_shard_records(store: Store, run_id: str) -> dict[int, ShardRecord]:
    """Every readable shard record of a run, by shard id."""
    records = {}
    for path in sorted(store.run_dir("shards", run_id).glob("shard-*.parquet")):
        row = objects.read_table(path).to_pylist()[0]
        row["outputs"] = [OutputFile(**o) for o in row.get("outputs") or []]
        row["plan_id"] = row.get("plan_id") or ""
        records[row["shard_id"]] = ShardRecord(
            **{k: row[k] for k in ShardRecord.__dataclass_fields__ if k in row}
        )
    return records


def trusted_done(store: Store, run_id: str, plan_id: str) -> tuple[set[int], dict[int, str]]:
    """Shards whose ``done`` record belongs to ``plan_id`` with every listed output intact; and the shards
    whose record says done but whose outputs are missing or damaged, with why (they are recomputed)."""
    done, distrusted = set(), {}
    for shard_id, record in load_shard_records(store, run_id).items():
        if record.status != "done" or record.plan_id != plan_id:
            continue
        wrong = missing_outputs(store, record.outputs)
        if wrong:
            distrusted[shard_id] = "; ".join(wrong[:3])
        else:
            done.add(shard_id)
    return done, distrusted


def quarantine_outputs(store: Store, run_id: str, shard_id: int, reason: str) -> None:
    """Move a distrusted shard's surviving outputs to quarantine before the shard is computed again."""
    record = load_shard_records(store, run_id).get(shard_id)
    for out in record.outputs if record else []:
        path = store.root / out.path
        if path.exists():
            store.quarantine(path, reason)


def next_shard_id(store: Store, run_id: str) -> int:
    """One past every shard id this run has used, in records or in output file names."""
    used = set(load_shard_records(store, run_id))
    for table in RESULT_TABLES:
        for path in store.table_dir(table).glob(f"*/{run_id}-*.parquet"):
            tail = path.stem[len(run_id) + 1 :]
            if tail.isdigit():
                used.add(int(tail))
    return max(used, default=-1) + 1


def quarantine_leftovers(store: Store, run_id: str, shard_ids: list[int], model: ModelIdentity) -> None:
    """Outputs of shards about to be computed that a crash left without a done record: moved to quarantine,
    so the recomputed rows are not mistaken for rows the store already holds."""
    for shard_id in shard_ids:
        for table in RESULT_TABLES:
            path = shard_path(store, table, model, run_id, shard_id)
            if path.exists():
                store.quarantine(
                    path, f"output of shard {shard_id} of run {run_id} without a done record; recomputed"
                )


def _members(store: Store, ingest_run: str) -> pa.Table:
    files = list(store.run_dir("members", ingest_run).glob("*.parquet"))
    if not files:
        return MEMBER_SCHEMA.empty_table()
    return pa.concat_tables(objects.read_table(f, columns=MEMBER_SCHEMA.names) for f in files)


def write_compute_rejections(
    store: Store, run_id: str, shard_id: int, errors: list[tuple[str, str]], ingest_run: str
) -> None:
    """Each member record whose sequence always failed becomes a ``rejected`` row of the compute run; without
    errors, an earlier try's rejections of this shard are removed."""
    path = store.shard_rejections_path(run_id, shard_id)
    if not errors:
        path.unlink(missing_ok=True)
        return
    reasons = dict(errors)
    members = _members(store, ingest_run)
    rows = members.filter(
        pc.is_in(members.column("seq_hash"), value_set=pa.array(list(reasons), pa.string()))
    )
    table = rows.select([n for n in REJECTED_SCHEMA.names if n in rows.column_names])
    table = table.append_column("rule", pa.array([COMPUTE_ERROR_RULE] * rows.num_rows, pa.string()))
    table = table.append_column("reason", pa.array([reasons[h] for h in rows.column("seq_hash").to_pylist()]))
    table = table.select(REJECTED_SCHEMA.names).cast(REJECTED_SCHEMA)
    write_table_atomic(path, table, "rejected", {"run_id": run_id, "shard_id": shard_id})


def rejected_hashes(store: Store, run_id: str, ingest_run: str) -> set[str]:
    """Sequences this compute run isolated as always failing (their member records are rejected rows)."""
    files = sorted(store.run_dir("rejected", run_id).glob("shard-*.parquet"))
    if not files:
        return set()
    rejected = pa.concat_tables(objects.read_table(f, columns=["record_index"]) for f in files).column(0)
    members = _members(store, ingest_run)
    picked = members.filter(pc.is_in(members.column("record_index"), value_set=rejected))
    return set(picked.column("seq_hash").to_pylist())
