"""Run records: one small Parquet file per run holding its parameters, counts, status and versions.

A record is rewritten atomically at each status change (running -> completed | partial | failed |
interrupted), so
``runs`` always shows the latest whole state of every run.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata

import pyarrow as pa

from storage import objects
from storage.layout import Store, write_table_atomic
from storage.schemas import RUN_SCHEMA

STATUSES = ("running", "completed", "partial", "failed", "interrupted")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def package_versions(names: tuple[str, ...] = ("proteoflow", "pyarrow", "duckdb")) -> dict[str, str]:
    """Versions of Python and the named packages, recorded with every run for provenance."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass
class IngestCounts:
    """What an ingest run read, kept, merged and refused."""

    records: int = 0
    bytes: int = 0
    accepted: int = 0
    rejected: int = 0
    residues: int = 0
    distinct: int = 0
    duplicates: int = 0
    new_sequences: int = 0
    already_in_store: int = 0
    new_residues: int = 0
    rejected_by_rule: dict[str, int] = field(default_factory=dict)
    skipped_files: int = 0


@dataclass
class ComputeCounts:
    """What a compute run planned, computed, retried and wrote, accumulated over its attempts."""

    attempts: int = 0
    shards: int = 0
    shards_done_before: int = 0
    shards_computed: int = 0
    shards_failed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    replaced_workers: int = 0
    sequences: int = 0
    residues: int = 0
    computed_residues: int = 0
    isolated_errors: int = 0
    fallbacks: int = 0
    compute_seconds: float = 0.0
    residues_per_s: float = 0.0
    # Bytes of the shards computed: what the actors returned to the driver (their pickled manifests), and
    # the Arrow size of the result tables they wrote to the store themselves (what the driver received when
    # it wrote the outputs). Records written before these counters existed read back as 0.
    driver_bytes: int = 0
    result_bytes: int = 0
    outputs: str = ""
    placements: list[dict] = field(default_factory=list)
    ingest: dict = field(default_factory=dict)
    attempt_log: list[dict] = field(default_factory=list)


Counts = IngestCounts | ComputeCounts


def counts_from_dict(kind: str, data: dict) -> Counts:
    """Typed counts of a stored run record (unknown keys of other versions ignored)."""
    cls = IngestCounts if kind == "ingest" else ComputeCounts
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunRecord:
    """What one run did: parameters in, counts out, and how it ended."""

    run_id: str
    kind: str
    status: str = "running"
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None
    params: dict = field(default_factory=dict)
    counts: Counts = field(default_factory=ComputeCounts)
    versions: dict = field(default_factory=package_versions)
    message: str = ""

    def to_table(self) -> pa.Table:
        row = {
            "run_id": [self.run_id],
            "kind": [self.kind],
            "status": [self.status],
            "started_at": [self.started_at],
            "finished_at": [self.finished_at],
            "params": [json.dumps(self.params, sort_keys=True, default=str)],
            "counts": [json.dumps(asdict(self.counts), sort_keys=True, default=str)],
            "versions": [json.dumps(self.versions, sort_keys=True)],
            "message": [self.message],
        }
        return pa.Table.from_pydict(row, schema=RUN_SCHEMA)

    def save(self, store: Store) -> None:
        """Write (or replace) this run's record atomically."""
        if self.status not in STATUSES:
            raise ValueError(f"unknown run status {self.status!r}")
        write_table_atomic(
            run_path(store, self.run_id), self.to_table(), "run", {"run_id": self.run_id, "argv": sys.argv}
        )

    def finish(self, store: Store, status: str, message: str = "") -> None:
        self.status, self.message, self.finished_at = status, message, utcnow()
        self.save(store)


def run_path(store: Store, run_id: str):
    return store.table_dir("runs") / f"{run_id}.parquet"


def load_run(store: Store, run_id: str) -> RunRecord | None:
    """The stored record of ``run_id``, or None if that run never started."""
    path = run_path(store, run_id)
    if not path.exists():
        return None
    row = objects.read_table(path).to_pylist()[0]
    return RunRecord(
        run_id=row["run_id"],
        kind=row["kind"],
        status=row["status"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        params=json.loads(row["params"]),
        counts=counts_from_dict(row["kind"], json.loads(row["counts"])),
        versions=json.loads(row["versions"]),
        message=row["message"] or "",
    )


def list_runs(store: Store, kind: str | None = None) -> list[RunRecord]:
    """Every run record of the store (of one kind), newest first."""
    found = []
    for path in store.table_dir("runs").glob("*.parquet"):
        if path.name.startswith("."):
            continue
        record = load_run(store, path.stem)
        if record is not None and (kind is None or record.kind == kind):
            found.append(record)
    return sorted(found, key=lambda r: r.started_at, reverse=True)
