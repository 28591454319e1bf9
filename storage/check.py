"""Store integrity: ``proteoflow check``'s logic. Every file readable and where the layout puts it, with its
table's columns and footer; counts that add up; one row per key; no debris of dead writers; every output
recorded and every recorded output present.

``check_store(store, repair=True)`` also mends what can be mended without computing anything: damaged and
stray files go to ``quarantine/`` (never deleted), dead temporaries go, an ingest run whose rows are lost is
marked failed so that rerunning it rewrites them, ``catalog.sql`` is rewritten; then the store is checked
again and the report says what remains and which run, rerun, recomputes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import pyarrow as pa

from storage import objects
from storage.catalog import (
    CATALOG_FILE,
    StoreFormatError,
    catalog_statements,
    fetch_arrow,
    file_list,
    write_catalog,
)
from storage.layout import FORMAT_VERSION, Store, _owner_of, _pid_alive, write_bytes_atomic
from storage.results import OutputFile, missing_outputs
from storage.runs import IngestCounts, RunRecord, load_run, run_path
from storage.schemas import PLAN_SCHEMA, RESULT_TABLES, ROW_KEYS, TABLE_SCHEMAS
from storage.shards import ShardRecord

MANIFEST = "proteoflow.json"
GRACE_S = 600.0  # a temporary or unrecorded file touched this recently may belong to a running writer
STAGING_MAX_AGE_S = 24 * 3600.0  # as Store.sweep_staging: staging of another host is dead after a day
READ_BATCH_BYTES = 64 << 20  # decoded at a time while reading a file through
MAX_ROUNDS = 8  # repair rounds (each acts, then checks again)

# The kinds of finding, in report order.
KINDS = (
    "manifest",
    "unreadable",
    "schema",
    "metadata",
    "stray",
    "temporary",
    "duplicate",
    "unrecorded-output",
    "missing-output",
    "counts",
    "incomplete-run",
    "orphan-member",
    "catalog",
)

# What --repair does about a finding.
QUARANTINE, REMOVE, WRITE_MANIFEST, MARK_RERUN, REWRITE_CATALOG = (
    "quarantine",
    "remove",
    "write-manifest",
    "mark-rerun",
    "rewrite-catalog",
)

FLAT_TABLES = ("sequences", "runs", "plans")
HIVE_NAMES = {  # the file names a run's partition may hold
    "members": re.compile(r"part-0\.parquet"),
    "rejected": re.compile(r"(part-0|shard-\d{5,})\.parquet"),  # an ingest run's; a compute run's
    "shards": re.compile(r"shard-\d{5,}\.parquet"),
}
# Directories whose files are table files: flat (<table>/<file>), run partitions (HIVE_NAMES) or, for the rest,
# one directory per model identity (<table>/<model>-<sha>/<file>).
INSPECTED = (*Store.TABLES, "plans", "neighbors", "clusters", "indexes")
# Directories of the layout whose files are not table files: only writers' temporaries are looked for there.
OTHER_DIRS = ("logs", "locks", "leases")
FILE_KINDS = {"runs": "run", "shards": "shard", "plans": "plan", "indexes": "vector_index"}


def _expected_schemas() -> dict[str, pa.Schema | None]:
    from storage.neighbors import CLUSTERS_SCHEMA, NEIGHBORS_SCHEMA

    return {
        **TABLE_SCHEMAS,
        "plans": PLAN_SCHEMA,
        "neighbors": NEIGHBORS_SCHEMA,
        "clusters": CLUSTERS_SCHEMA,
        "indexes": None,
    }


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Rerun:
    """A run whose rerun with the same arguments recomputes what the store lost (its record's parameters
    say which: model, inputs, options; ``ingest_params`` are its input's ingest run's)."""

    run_id: str
    kind: str  # "ingest" | "embed" | "fold"
    params: dict = field(default_factory=dict, compare=False, hash=False)
    ingest_params: dict = field(default_factory=dict, compare=False, hash=False)
    shards: tuple[int, ...] = ()
    why: str = ""


@dataclass(frozen=True)
class Finding:
    """One problem: its kind, the path relative to the store, why, what ``--repair`` does about it ('' when
    it cannot), and the run whose rerun recomputes what was lost."""

    kind: str
    path: str
    reason: str
    fix: str = ""
    rerun: Rerun | None = None

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.reason}"


@dataclass(frozen=True)
class Repair:
    """What ``--repair`` did about a finding, in a few words (e.g. 'moved to quarantine/…')."""

    finding: Finding
    done: str


@dataclass
class CheckReport:
    """The outcome of a check: what is wrong (after a repair: what remains), what was repaired, and what
    was left alone because a running command is writing it."""

    root: Path
    findings: list[Finding] = field(default_factory=list)
    repairs: list[Repair] = field(default_factory=list)
    in_progress: list[Finding] = field(default_factory=list)
    files: int = 0  # Parquet files read through
    newest_file_version: int = 0

    @property
    def sound(self) -> bool:
        return not self.findings

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for f in self.findings:
            counts[f.kind] += 1
        return dict(counts)

    def reruns(self) -> list[Rerun]:
        """The runs to rerun for what remains or what a repair moved aside, one entry per run (its shards
        merged), ingest runs first."""
        merged: dict[str, Rerun] = {}
        for f in [r.finding for r in self.repairs] + self.findings:
            r = f.rerun
            if r is None:
                continue
            old = merged.get(r.run_id)
            if old is None:
                merged[r.run_id] = r
                continue
            whys = old.why.split("; ") + [w for w in [r.why] if w and w not in old.why.split("; ")]
            merged[r.run_id] = replace(
                old,
                shards=tuple(sorted(set(old.shards) | set(r.shards))),
                why="; ".join(w for w in whys if w),
            )
        return sorted(merged.values(), key=lambda r: (r.kind != "ingest", r.run_id))  # inputs first


def _sorted(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (KINDS.index(f.kind), f.path, f.reason))


# -------------------------------------------------------------------------------------------- entry point


def check_store(
    store: Store | str | os.PathLike[str], repair: bool = False, grace_s: float = GRACE_S
) -> CheckReport:
    """Check a store (see the module docstring); with ``repair``, mend what can be mended and check again.

    Raises FileNotFoundError when ``store`` is no proteoflow store, StoreFormatError when a newer proteoflow
    wrote it (nothing is judged or touched then)."""
    store = store if isinstance(store, Store) else Store(store)
    report = _check(store, grace_s)
    if not repair:
        return report
    repairs: list[Repair] = []
    for _ in range(MAX_ROUNDS):
        done = _repair_round(store, report)
        if not done:
            break
        repairs += done
        report = _check(store, grace_s)
    report.repairs = repairs
    return report


# -------------------------------------------------------------------------------------------------- state


@dataclass
class _File:
    """A Parquet file that was read through: its schema, footer key-values and row count."""

    path: Path
    table: str
    schema: pa.Schema
    meta: dict[bytes, bytes]
    rows: int
    row_groups: int
    mtime: float

    @property
    def provenance(self) -> dict:
        try:
            value = json.loads(self.meta.get(b"proteoflow.provenance", b"{}"))
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass
class _Scan:
    store: Store
    grace_s: float
    now: float = field(default_factory=time.time)
    findings: list[Finding] = field(default_factory=list)
    in_progress: list[Finding] = field(default_factory=list)
    data: list[tuple[str, Path]] = field(default_factory=list)  # (table, file) where the layout puts them
    temps: list[Path] = field(default_factory=list)
    usable: dict[str, list[_File]] = field(default_factory=lambda: defaultdict(list))
    runs: dict[str, RunRecord] = field(default_factory=dict)
    shards: dict[str, dict[int, ShardRecord]] = field(default_factory=lambda: defaultdict(dict))
    newest_version: int = 0

    def rel(self, path: Path) -> str:
        return path.relative_to(self.store.root).as_posix()

    def add(
        self, kind: str, path: Path | str, reason: str, fix: str = "", rerun: Rerun | None = None
    ) -> None:
        rel = path if isinstance(path, str) else self.rel(path)
        self.findings.append(Finding(kind, rel, reason, fix, rerun))


def _check(store: Store, grace_s: float) -> CheckReport:
    scan = _Scan(store, grace_s)
    manifest_ok = _check_manifest(scan)
    _walk(scan)
    _read_files(scan)
    _load_records(scan)
    _check_counts(scan)
    _check_duplicates(scan)
    _check_outputs(scan)
    _check_orphans(scan)
    _check_temporaries(scan)
    if manifest_ok:
        _check_catalog(scan)
    return CheckReport(
        store.root,
        _sorted(scan.findings),
        in_progress=_sorted(scan.in_progress),
        files=sum(len(v) for v in scan.usable.values()),
        newest_file_version=scan.newest_version,
    )


# ------------------------------------------------------------------------------------------------- layout


def _check_manifest(scan: _Scan) -> bool:
    """proteoflow.json: present, readable, not newer than this proteoflow. False when it is not sound."""
    root = scan.store.root
    manifest = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a proteoflow store (no such directory)")
    if not manifest.exists():
        if not any((root / t).is_dir() for t in Store.TABLES):
            raise FileNotFoundError(
                f"{root}: not a proteoflow store (no {MANIFEST}); run `proteoflow ingest` first"
            )
        scan.add("manifest", MANIFEST, "missing: the store's format version is not recorded", WRITE_MANIFEST)
        return False
    try:
        version = json.loads(manifest.read_text())["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        scan.add("manifest", MANIFEST, f"unreadable ({_one_line(exc)})", WRITE_MANIFEST)
        return False
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        scan.add("manifest", MANIFEST, f"format_version {version!r} is not a version number", WRITE_MANIFEST)
        return False
    if version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{root}: store format version {version} is newer than this proteoflow reads "
            f"({FORMAT_VERSION}); upgrade proteoflow"
        )
    return True


def _is_temp(name: str) -> bool:
    """A writer's temporary: hidden, ending .tmp (``.<name>.<hex8>.tmp`` from storage.layout)."""
    return name.startswith(".") and name.endswith(".tmp") and len(name) > 5


def _walk(scan: _Scan) -> None:
    """Sort every entry of the store into table files, temporaries and strays, by the layout."""
    root = scan.store.root
    for entry in sorted(root.iterdir()):
        name = entry.name
        if entry.is_dir():
            if name in INSPECTED:
                _walk_table(scan, name, entry)
            elif name == ".staging":
                _walk_staging(scan, entry)
            elif name in OTHER_DIRS:
                scan.temps += [p for p in entry.rglob(".*.tmp") if p.is_file()]
            elif name != "quarantine":
                scan.add("stray", entry, "a directory the store's layout does not define", QUARANTINE)
        elif _is_temp(name):
            scan.temps.append(entry)
        elif name not in (MANIFEST, CATALOG_FILE):
            scan.add("stray", entry, "a file the store's layout does not define", QUARANTINE)


def _walk_table(scan: _Scan, table: str, base: Path) -> None:
    _walk_level(scan, table, base, 0 if table in FLAT_TABLES else 1)


def _walk_level(scan: _Scan, table: str, folder: Path, levels: int) -> None:
    """Files ``levels`` directories below ``folder`` are the table's; anything at another depth is stray."""
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_dir():
            if levels and _good_folder(table, name):
                _walk_level(scan, table, entry, levels - 1)
            elif levels:
                what = "a run partition (run_id=<run>)" if table in HIVE_NAMES else "a model directory"
                scan.add("stray", entry, f"not {what} of {table}", QUARANTINE)
            else:
                scan.add("stray", entry, f"a directory where {table} holds only files", QUARANTINE)
        elif _is_temp(name):
            scan.temps.append(entry)
        elif levels:
            where = "run_id=<run>/" if table in HIVE_NAMES else "<model>-<sha>/"
            scan.add("stray", entry, f"{table} files lie in {table}/{where}, not here", QUARANTINE)
        elif table in HIVE_NAMES and not HIVE_NAMES[table].fullmatch(name):
            scan.add("stray", entry, f"not a file name of a {table} partition", QUARANTINE)
        elif table == "indexes" and name.endswith(".faiss"):
            continue
        elif name.startswith("."):
            scan.add("stray", entry, "a hidden file, which no writer leaves behind", QUARANTINE)
        elif not name.endswith(".parquet"):
            scan.add("stray", entry, f"not a Parquet file of {table}", QUARANTINE)
        else:
            scan.data.append((table, entry))


def _good_folder(table: str, name: str) -> bool:
    if table in HIVE_NAMES:
        return name.startswith("run_id=") and len(name) > len("run_id=")
    return not name.startswith(".")


def _walk_staging(scan: _Scan, staging: Path) -> None:
    """Staging directories of dead writers (a dead pid on this host, or older than a day): the same rule as
    Store.sweep_staging."""
    host = socket.gethostname()
    for entry in sorted(staging.iterdir()):
        owner, pid = _owner_of(entry.name)
        try:
            age = scan.now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if owner == host and pid is not None and pid != os.getpid() and not _pid_alive(pid):
            scan.add("temporary", entry, f"staging of a writer that died (pid {pid} on this host)", REMOVE)
        elif age > STAGING_MAX_AGE_S:
            scan.add("temporary", entry, f"staging untouched for {_age(age)}: its writer is gone", REMOVE)
        else:
            who = f"pid {pid} on {owner}" if pid is not None else "a writer"
            scan.in_progress.append(
                Finding("temporary", scan.rel(entry), f"staging of {who}, which may be running")
            )


# ----------------------------------------------------------------------------------------- reading files


def _read_through(path: Path) -> tuple[pa.Schema, dict[bytes, bytes], int, int] | str:
    """Read a Parquet file to its end, a few MB at a time: its schema, footer key-values and rows, or why
    it cannot be read (a damaged page fails here even when the footer reads)."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        pf = objects.parquet_file(path)
        md = pf.metadata
        for rg in range(md.num_row_groups):
            group = md.row_group(rg)
            per_row = group.total_byte_size / max(group.num_rows, 1)
            batch = int(max(1, min(65_536, READ_BATCH_BYTES // max(per_row, 1))))
            for _ in pf.iter_batches(batch_size=batch, row_groups=[rg], use_threads=False):
                pass
        return pf.schema_arrow, dict(md.metadata or {}), md.num_rows, md.num_row_groups
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail anywhere in pyarrow; it is a finding
        return _one_line(exc)


def _read_files(scan: _Scan) -> None:
    """Read every table file through (on a few threads: pyarrow decodes without the GIL), then judge its
    columns and footer; only sound files feed the checks that follow."""
    expected = _expected_schemas()
    paths = [p for _, p in scan.data]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_read_through, paths))
    for (table, path), result in zip(scan.data, results, strict=True):
        if isinstance(result, str):
            scan.add("unreadable", path, result, QUARANTINE)
            continue
        schema, meta, rows, row_groups = result
        columns = _schema_problem(expected.get(table), schema)
        footer = None if columns else _metadata_problem(scan, table, meta)
        if columns or footer:
            scan.add("schema" if columns else "metadata", path, columns or footer or "", QUARANTINE)
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        scan.usable[table].append(_File(path, table, schema, meta, rows, row_groups, mtime))
    for table in ("embeddings", "residue_embeddings"):  # one model identity, one vector width
        folders: dict[Path, list[_File]] = defaultdict(list)
        for f in scan.usable[table]:
            folders[f.path.parent].append(f)
        for folder, files in folders.items():
            widths = [_vector_width(f.schema) for f in files]
            common = max(set(widths), key=widths.count)
            for f, width in zip(files, widths, strict=True):
                if width != common:
                    why = f"vectors of width {width}; the other files of {folder.name}: {common}"
                    scan.add("schema", f.path, why, QUARANTINE)
                    scan.usable[table].remove(f)


def _family(kind: pa.DataType) -> str:
    """A type's family (string, int, float, list<float>, ...): widths of numbers and vectors may differ."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind):
        return "float"
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return f"list<{_family(kind.value_type)}>"
    if pa.types.is_struct(kind):
        return "struct<" + ", ".join(f"{f.name}: {_family(f.type)}" for f in kind) + ">"
    return str(kind)


def _schema_problem(expected: pa.Schema | None, schema: pa.Schema) -> str | None:
    """How a file's columns differ from its table's (names, and type families); None when they agree."""
    if expected is None:
        return None
    names = set(schema.names)
    missing = [n for n in expected.names if n not in names]
    extra = [n for n in schema.names if n not in set(expected.names)]
    wrong = [
        f"{f.name} is {_family(schema.field(f.name).type)}, not {_family(f.type)}"
        for f in expected
        if f.name in names and _family(schema.field(f.name).type) != _family(f.type)
    ]
    parts = []
    if missing:
        parts.append("missing column(s) " + ", ".join(missing))
    if extra:
        parts.append("unexpected column(s) " + ", ".join(extra))
    parts += wrong
    return "; ".join(parts) or None


def _metadata_problem(scan: _Scan, table: str, meta: dict[bytes, bytes]) -> str | None:
    """The proteoflow footer: which table the file is, and the format version that wrote it."""
    kind = meta.get(b"proteoflow.kind", b"").decode(errors="replace")
    want = FILE_KINDS.get(table, table)
    if not kind:
        return "no proteoflow.kind in its footer: not written by proteoflow"
    if kind != want:
        return f"footer says proteoflow.kind={kind}, a {table} file says {want}"
    raw = meta.get(b"proteoflow.format_version", b"").decode(errors="replace")
    if not raw.isdigit():
        return f"no valid proteoflow.format_version in its footer ({raw or 'none'})"
    version = int(raw)
    scan.newest_version = max(scan.newest_version, version)
    if version > FORMAT_VERSION:
        return f"written by a newer proteoflow (format {version} > {FORMAT_VERSION})"
    return None


def _vector_width(schema: pa.Schema) -> int:
    kind = schema.field("embedding").type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return kind.list_size if pa.types.is_fixed_size_list(kind) else 0


# ---------------------------------------------------------------------------------------- runs and shards


def _load_records(scan: _Scan) -> None:
    """Run records and shard records from the sound files (a record that names another run is stray)."""
    for f in scan.usable["runs"]:
        try:
            record = load_run(scan.store, f.path.stem)
        except Exception as exc:  # noqa: BLE001 - a record whose JSON does not parse is damaged
            scan.add("unreadable", f.path, f"run record does not parse ({_one_line(exc)})", QUARANTINE)
            continue
        if record is None:
            continue
        if record.run_id != f.path.stem or f.rows != 1:
            why = f"holds {f.rows} record(s) of run {record.run_id}, not one of {f.path.stem}"
            scan.add("stray", f.path, why, QUARANTINE)
            continue
        scan.runs[record.run_id] = record
    for f in scan.usable["shards"]:
        run_id = f.path.parent.name.removeprefix("run_id=")
        try:
            rows = objects.read_table(f.path).to_pylist()
            if len(rows) != 1:
                raise ValueError(f"holds {len(rows)} rows, a shard record holds one")
            row = rows[0]
            row["outputs"] = [OutputFile(**o) for o in row.get("outputs") or []]
            row["plan_id"] = row.get("plan_id") or ""
            record = ShardRecord(**{k: row[k] for k in ShardRecord.__dataclass_fields__ if k in row})
        except Exception as exc:  # noqa: BLE001
            scan.add("unreadable", f.path, f"shard record does not parse ({_one_line(exc)})", QUARANTINE)
            continue
        scan.shards[run_id][record.shard_id] = record


def _ingest_rerun(scan: _Scan, run_id: str, why: str) -> Rerun:
    record = scan.runs.get(run_id)
    params = record.params if record is not None else {}
    if not params:  # no record: the inputs as the run's sequences file recorded them
        for f in scan.usable["sequences"]:
            if f.path.stem == run_id:
                params = {"inputs": f.provenance.get("inputs", [])}
    return Rerun(run_id, "ingest", params, params, why=why)


def _compute_rerun(scan: _Scan, run_id: str, shard_id: int | None, why: str) -> Rerun | None:
    record = scan.runs.get(run_id)
    if record is None or record.kind == "ingest":
        return None
    ingest = scan.runs.get(record.params.get("ingest_run", ""))
    shards = () if shard_id is None else (shard_id,)
    return Rerun(run_id, record.kind, record.params, ingest.params if ingest else {}, shards, why)


def _check_counts(scan: _Scan) -> None:
    """Per ingest run: member rows + rejected rows = records read, as its run record counts them."""
    rows: dict[tuple[str, str], int] = defaultdict(int)
    young: dict[tuple[str, str], bool] = defaultdict(bool)
    for table in ("members", "rejected"):
        for f in scan.usable[table]:
            run_id = f.path.parent.name.removeprefix("run_id=")
            if table == "rejected" and f.path.name.startswith("shard-"):
                continue  # a compute run's rejections
            rows[(table, run_id)] += f.rows
            young[(table, run_id)] |= scan.now - f.mtime < scan.grace_s
        for folder in sorted(p for p in scan.store.table_dir(table).glob("run_id=*") if p.is_dir()):
            run_id = folder.name.removeprefix("run_id=")
            if run_id in scan.runs or not (folder / "part-0.parquet").exists():
                continue  # recorded, or a compute run's rejections (shard-N), whose record is its own matter
            finding = Finding(
                "counts",
                scan.rel(folder),
                f"rows of run {run_id}, which has no run record (an ingest that stopped before it finished, "
                "or a lost record)",
                rerun=_ingest_rerun(scan, run_id, "its run record is missing"),
            )
            (scan.in_progress if young[(table, run_id)] else scan.findings).append(finding)
    for run_id, record in sorted(scan.runs.items()):
        if record.kind != "ingest":
            continue
        path = run_path(scan.store, run_id)
        if record.status != "completed":
            why = f"ingest run {run_id} is {record.status}" + (
                f" ({record.message})" if record.message else ""
            )
            lost = record.message.removeprefix("marked by proteoflow check: ")
            rerun = _ingest_rerun(scan, run_id, lost if lost != record.message else "its rows are incomplete")
            scan.add("incomplete-run", path, why + "; rerunning it writes its rows", rerun=rerun)
            continue
        counts = record.counts
        if not isinstance(counts, IngestCounts):
            continue
        members, rejected = rows[("members", run_id)], rows[("rejected", run_id)]
        if (
            members == counts.accepted
            and rejected == counts.rejected
            and members + rejected == counts.records
        ):
            continue
        scan.add(
            "counts",
            scan.store.run_dir("members", run_id),
            f"ingest run {run_id} read {counts.records:,} records ({counts.accepted:,} accepted, "
            f"{counts.rejected:,} rejected) but the store holds {members:,} members + {rejected:,} rejected",
            MARK_RERUN,
            _ingest_rerun(scan, run_id, "its members or rejected rows are lost"),
        )


# ------------------------------------------------------------------------------------------------- keys


def _key_sql(table: str) -> tuple[str, list[str], str]:
    """What names one row: (SELECT list, its column names, what it is called). seq_hash in sequences;
    (seq_hash, model_sha, row key) in a result table, the row key as storage.schemas.ROW_KEYS spells it."""
    if table == "sequences":
        return "seq_hash", ["seq_hash"], "seq_hash value"
    key = ROW_KEYS[table]
    named = ":".join(key.unique_columns) if key.unique_columns else "row"
    return (
        f"seq_hash, model_sha, ({key.unique_sql()}) AS row_key",
        ["seq_hash", "model_sha", "row_key"],
        f"(seq_hash, model_sha, {named}) key",
    )


def _con() -> duckdb.DuckDBPyConnection:
    con = objects.duckdb_connection()
    con.execute("SET threads = 2")
    return con


def _preference(scan: _Scan, table: str, f: _File, recorded: set[str]) -> tuple:
    """Which of the files holding the same rows is the suspect: one the layout does not expect (a sequences
    file of no ingest run, an output no shard record lists), then the newer."""
    rel = scan.rel(f.path)
    expected = rel in recorded if table in RESULT_TABLES else f.path.stem in scan.runs
    return (expected, -f.mtime, rel)


def _check_duplicates(scan: _Scan) -> None:
    """One row per key: no seq_hash twice in sequences, no (seq_hash, model_sha, row key) twice in a result
    table. The suspect file of each group of files sharing keys is named; when every one of its keys is
    also in another file it is a copy, which ``--repair`` quarantines."""
    recorded = _recorded_outputs(scan)
    for table in ("sequences", *RESULT_TABLES):
        by_path = {str(f.path): f for f in scan.usable[table]}
        if not by_path:
            continue
        select, names, what = _key_sql(table)
        con = _con()
        source = f"read_parquet({file_list(list(by_path))}, filename = true, union_by_name = true)"
        groups = fetch_arrow(
            con,
            f"""
            SELECT files, count(*) AS n FROM (
                SELECT list(filename ORDER BY filename) AS files FROM (SELECT {select}, filename FROM {source})
                GROUP BY {", ".join(names)} HAVING count(*) > 1)
            GROUP BY files
            """,
        ).to_pylist()
        blamed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for group in groups:
            files = group["files"]
            distinct = sorted(set(files), key=lambda p: _preference(scan, table, by_path[p], recorded))
            suspect = distinct[0]
            for repeated in {p for p in files if files.count(p) > 1}:
                blamed[repeated][""] += group["n"]
            for other in distinct[1:]:
                blamed[suspect][other] += group["n"]
        for suspect, others in sorted(blamed.items()):
            within = others.pop("", 0)
            parts = [f"{within:,} {what}s appear more than once within this file"] if within else []
            unique = 0
            if others:
                named = ", ".join(scan.rel(by_path[p].path) for p in list(others)[:3]) + (
                    " …" if len(others) > 3 else ""
                )
                parts.append(f"{sum(others.values()):,} {what}s also in {named}")
                unique = _unique_keys(con, select, names, suspect, [p for p in by_path if p != suspect])
            if others and not unique:  # quarantining it loses no key
                why = "; ".join(parts) + "; every key is also elsewhere (a copy)"
                scan.add("duplicate", by_path[suspect].path, why, QUARANTINE)
            else:
                kept = f"; {unique:,} of its keys are in no other file, so it is kept" if unique else ""
                scan.add("duplicate", by_path[suspect].path, "; ".join(parts) + kept)


def _unique_keys(
    con: duckdb.DuckDBPyConnection, select: str, names: list[str], path: str, others: list[str]
) -> int:
    """How many distinct keys of the file ``path`` are in none of ``others``."""
    rest = f"read_parquet({file_list(others)}, union_by_name = true)"
    return con.execute(
        f"""
        SELECT count(*) FROM (SELECT DISTINCT {select} FROM read_parquet({file_list([path])})) a
        ANTI JOIN (SELECT {select} FROM {rest}) b USING ({", ".join(names)})
        """
    ).fetchone()[0]


# ---------------------------------------------------------------------------------------------- outputs


def _recorded_outputs(scan: _Scan) -> set[str]:
    return {out.path for records in scan.shards.values() for r in records.values() for out in r.outputs}


def _plan_ids(scan: _Scan) -> dict[str, tuple[str, int]]:
    """Each compute run's current plan: its id and number of shards (one row group each), from its file."""
    return {f.path.stem: (str(f.provenance.get("plan_id", "")), f.row_groups) for f in scan.usable["plans"]}


def _check_outputs(scan: _Scan) -> None:
    """Every result file listed by a shard record of its run; every output a done shard record (of the run's
    current plan) lists present with the size it recorded (storage.results.missing_outputs, as resume
    judges it)."""
    recorded, plan_ids = _recorded_outputs(scan), _plan_ids(scan)
    for table in RESULT_TABLES:
        for f in scan.usable[table]:
            if scan.rel(f.path) not in recorded:
                _unrecorded(scan, f, plan_ids)
    for run_id, record in sorted(scan.runs.items()):
        if record.kind == "ingest":
            continue
        plan_id = plan_ids.get(run_id, ("", 0))[0]
        for shard_id, shard in sorted(scan.shards.get(run_id, {}).items()):
            if shard.status != "done" or (plan_id and shard.plan_id != plan_id):
                continue
            for out in shard.outputs:
                if not missing_outputs(scan.store, [out]):
                    continue
                rerun = _compute_rerun(scan, run_id, shard_id, f"{out.table} output lost")
                if (scan.store.root / out.path).exists():
                    why = f"size differs from run {run_id}'s shard {shard_id} record ({out.bytes:,} bytes)"
                    scan.add("missing-output", out.path, why, QUARANTINE, rerun)
                else:
                    why = f"missing: run {run_id}'s shard {shard_id} is recorded done with this output"
                    scan.add("missing-output", out.path, why, "", rerun)


def _unrecorded(scan: _Scan, f: _File, plan_ids: dict[str, tuple[str, int]]) -> None:
    """A result file no shard record lists. Left by an attempt that stopped between writing a shard's outputs
    and its record, it is quarantined (rerunning the run computes the shard again); otherwise it is named
    and kept (a copy of another file is the duplicate check's to quarantine)."""
    run_id = str(f.provenance.get("run_id", ""))
    shard_id = f.provenance.get("shard_id")
    record = scan.runs.get(run_id)
    if record is None:
        scan.add(
            "unrecorded-output",
            f.path,
            f"no shard record lists it, and its run ({run_id or '?'}) has no record",
        )
        return
    if record.status == "running" and scan.now - f.mtime < scan.grace_s:
        scan.in_progress.append(
            Finding("unrecorded-output", scan.rel(f.path), f"being written by run {run_id}")
        )
        return
    plan_id, planned = plan_ids.get(run_id, ("", 0))
    if not isinstance(shard_id, int) or not 0 <= shard_id < planned or record.kind == "ingest":
        scan.add("unrecorded-output", f.path, f"no shard record of run {run_id} lists it")
        return
    shard = scan.shards.get(run_id, {}).get(shard_id)
    if shard is None or shard.status != "done" or shard.plan_id != plan_id:
        why = f"shard {shard_id} stopped before its record was written"
        reason = (
            f"no shard record of run {run_id} lists it: {why}; rerunning the run computes the shard again"
        )
        rerun = _compute_rerun(scan, run_id, shard_id, "output of a stopped attempt quarantined")
        scan.add("unrecorded-output", f.path, reason, QUARANTINE, rerun)
    else:
        scan.add("unrecorded-output", f.path, f"no shard record of run {run_id} lists it")


def _check_orphans(scan: _Scan) -> None:
    """Every member's seq_hash has its sequences row."""
    members = [str(f.path) for f in scan.usable["members"]]
    if not members:
        return
    sequences = [str(f.path) for f in scan.usable["sequences"]]
    stored = (
        f"SELECT seq_hash FROM read_parquet({file_list(sequences)}, union_by_name = true)"
        if sequences
        else "SELECT NULL::VARCHAR AS seq_hash WHERE false"
    )
    rows = (
        _con()
        .execute(
            f"""
        SELECT regexp_extract(filename, 'run_id=([^/]+)/', 1) AS run, count(*), count(DISTINCT seq_hash)
        FROM read_parquet({file_list(members)}, filename = true, union_by_name = true) m
        WHERE NOT EXISTS (SELECT 1 FROM ({stored}) s WHERE s.seq_hash = m.seq_hash)
        GROUP BY run ORDER BY run
        """
        )
        .fetchall()
    )
    for run_id, n, distinct in rows:
        record = scan.runs.get(run_id)
        fix = (
            MARK_RERUN
            if record is not None and record.kind == "ingest" and record.status == "completed"
            else ""
        )
        scan.add(
            "orphan-member",
            scan.store.run_dir("members", run_id),
            f"{n:,} member rows of run {run_id} name {distinct:,} seq_hash values with no sequences row",
            fix,
            _ingest_rerun(scan, run_id, "sequences of its members are lost"),
        )


def _open_files() -> set[str]:
    """Files some process of this host holds open (those /proc shows us)."""
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    found.add(os.readlink(fd))
                except OSError:
                    continue
        except OSError:
            continue
    return found


def _check_temporaries(scan: _Scan) -> None:
    """Hidden ``.*.tmp`` files: dead when no process here holds them open and untouched for ``grace_s``."""
    if not scan.temps:
        return
    held = _open_files()
    for path in scan.temps:
        try:
            age = scan.now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if str(path.resolve()) in held or age < scan.grace_s:
            scan.in_progress.append(
                Finding("temporary", scan.rel(path), "being written by a running command")
            )
        else:
            why = f"a writer's temporary file, untouched for {_age(age)}: its writer is gone"
            scan.add("temporary", path, why, REMOVE)


def _check_catalog(scan: _Scan) -> None:
    """catalog.sql declares the views of every table the store now holds."""
    path = scan.store.root / CATALOG_FILE
    try:
        statements = catalog_statements(scan.store.root)
    except Exception:  # noqa: BLE001 - the checks above name what stops the catalog
        return
    if not path.exists():
        scan.add("catalog", path, "missing: DuckDB clients cannot `.read catalog.sql`", REWRITE_CATALOG)
        return
    text = path.read_text(errors="replace")
    stale = [s for s in statements if s not in text]
    if stale:
        why = f"out of date: {len(stale)} view(s) do not match the store's files"
        scan.add("catalog", path, why, REWRITE_CATALOG)


# ------------------------------------------------------------------------------------------------- repair


def _repair_round(store: Store, report: CheckReport) -> list[Repair]:
    """Act on one stage of findings (manifest; then files; then runs; then the catalog): the next stage is
    judged on a fresh check, so a run is never marked for what a quarantined stray file caused."""
    stages = ((WRITE_MANIFEST,), (QUARANTINE, REMOVE), (MARK_RERUN,), (REWRITE_CATALOG,))
    for fixes in stages:
        todo = [f for f in report.findings if f.fix in fixes]
        if not todo:
            continue
        if fixes == (WRITE_MANIFEST,) and report.newest_file_version > FORMAT_VERSION:
            continue
        done = []
        seen: set[str] = set()
        for finding in todo:
            key = (
                finding.path
                if finding.fix != MARK_RERUN
                else f"run:{finding.rerun.run_id if finding.rerun else ''}"
            )
            if key in seen:
                continue
            seen.add(key)
            result = _apply(store, finding)
            if result:
                done.append(Repair(finding, result))
        return done
    return []


def _apply(store: Store, finding: Finding) -> str:
    """Carry out one finding's fix; what was done, '' when there was nothing left to do."""
    root = store.root
    path = root / finding.path
    if finding.fix == WRITE_MANIFEST:
        manifest = root / MANIFEST
        kept = ""
        if manifest.exists():
            kept = " (the old one: " + _quarantine(store, manifest, f"check: {finding.reason}") + ")"
        write_bytes_atomic(manifest, json.dumps({"format_version": FORMAT_VERSION}, indent=2).encode())
        return f"wrote {MANIFEST} with format_version {FORMAT_VERSION}{kept}"
    if finding.fix == QUARANTINE:
        if not path.exists():
            return ""
        return "moved to " + _quarantine(store, path, f"proteoflow check: {finding.kind}: {finding.reason}")
    if finding.fix == REMOVE:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return "removed"
    if finding.fix == MARK_RERUN and finding.rerun is not None:
        run_id = finding.rerun.run_id
        record = load_run(store, run_id)
        if record is None or record.status != "completed":
            return ""
        kept = _quarantine(store, run_path(store, run_id), f"proteoflow check: {finding.reason}")
        record.status = "failed"
        record.message = f"marked by proteoflow check: {finding.rerun.why}"
        record.save(store)
        return (
            f"marked ingest run {run_id} failed so that rerunning it rewrites its rows (old record: {kept})"
        )
    if finding.fix == REWRITE_CATALOG:
        write_catalog(root)
        return "rewrote catalog.sql"
    return ""


def _quarantine(store: Store, path: Path, reason: str) -> str:
    """Store.quarantine, never onto a file quarantined before in the same second (its target is per second)."""
    rel = path.relative_to(store.root)
    for _ in range(3):
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = store.root / "quarantine" / stamp / rel
        if not target.exists() and not target.with_name(target.name + ".why").exists():
            break
        time.sleep(1.05 - time.time() % 1)
    return store.quarantine(path, reason).relative_to(store.root).as_posix()


# ------------------------------------------------------------------------------------------------ helpers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"
