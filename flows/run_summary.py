"""What a person reads about runs: one row per run (``proteoflow runs``), and the facts of one run (``proteoflow
runs RUN_ID``, the scheduled runs' Prefect artifacts, the HTML report). Reads run records only; no Prefect,
Ray or models."""

from __future__ import annotations

from datetime import datetime, timezone

from storage.layout import Store
from storage.runs import ComputeCounts, IngestCounts, RunRecord

ROW_COLUMNS = ("run_id", "kind", "status", "started", "duration_s", "sequences", "residues_per_s", "model")


def duration_s(record: RunRecord, now: datetime | None = None) -> float | None:
    """Seconds from the run's start to its end (to now while it runs; None for an ended run without an end)."""
    end = record.finished_at
    if end is None:
        if record.status != "running":
            return None
        end = now or datetime.now(timezone.utc)
    return max((_aware(end) - _aware(record.started_at)).total_seconds(), 0.0)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def model_of(record: RunRecord) -> str:
    """The model a compute run used (name of the loaded weights, else as asked); '' for an ingest run."""
    ident = record.params.get("identity") or {}
    return str(ident.get("model") or record.params.get("model") or "")


def sequences_of(record: RunRecord) -> int:
    """Sequences a compute run planned, or the distinct sequences an ingest run accepted."""
    counts = record.counts
    return counts.distinct if isinstance(counts, IngestCounts) else counts.sequences


def row(record: RunRecord) -> tuple:
    """One run as the values of :data:`ROW_COLUMNS` (raw numbers, for csv and json)."""
    counts = record.counts
    rate = round(counts.residues_per_s, 1) if isinstance(counts, ComputeCounts) else None
    return (record.run_id, record.kind, record.status, _aware(record.started_at).isoformat(timespec="seconds"),
            _round(duration_s(record)), sequences_of(record), rate, model_of(record))  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def human_duration(seconds: float | None) -> str:
    """``42.0 s``, ``3 min 05 s``, ``2 h 07 min``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def table_row(record: RunRecord) -> tuple:
    """One run as a person reads it in the table form: readable times, durations and rates."""
    values = dict(zip(ROW_COLUMNS, row(record), strict=True))
    started = _aware(record.started_at).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    rate = values["residues_per_s"]
    return (record.run_id, record.kind, record.status, started, human_duration(values["duration_s"]),
            f"{values['sequences']:,}", "-" if rate is None else f"{rate:,.0f}", values["model"] or "-")  # fmt: skip


def facts(record: RunRecord, store: Store | None = None) -> list[tuple[str, str]]:
    """The facts of one run, in reading order, as (name, value) lines."""
    lines = [("run", record.run_id), ("kind", record.kind), ("status", record.status)]
    if record.message:
        lines.append(("message", record.message))
    lines += [
        ("started", _aware(record.started_at).isoformat(timespec="seconds")),
        ("finished", _aware(record.finished_at).isoformat(timespec="seconds") if record.finished_at else "-"),
        ("duration", human_duration(duration_s(record))),
    ]
    counts = record.counts
    if isinstance(counts, IngestCounts):
        lines += [
            ("records", f"{counts.records:,}"),
            ("accepted", f"{counts.accepted:,} ({counts.residues:,} residues)"),
            ("distinct", f"{counts.distinct:,} sequences, {counts.new_sequences:,} new to the store"),
            ("rejected", f"{counts.rejected:,}" + _by_rule(counts.rejected_by_rule)),
        ]
    else:
        ident = record.params.get("identity") or {}
        weights = f" (weights {ident['sha']})" if ident.get("sha") else ""
        random = ", RANDOM WEIGHTS: results mean nothing" if ident.get("random_weights") else ""
        lines += [
            ("model", f"{model_of(record)}{weights}{random}"),
            ("inputs", ", ".join(map(str, record.params.get("inputs") or [])) or "-"),
            ("ingest run", str(record.params.get("ingest_run") or "-")),
            ("sequences", f"{counts.sequences:,} planned, {counts.residues:,} residues"),
            (
                "shards",
                f"{counts.shards} total: {counts.shards_computed} computed in the last attempt, "
                f"{counts.shards_done_before} done before, {counts.shards_failed} failed",
            ),  # fmt: skip
            (
                "throughput",
                f"{counts.residues_per_s:,.0f} residues/s ({counts.computed_residues:,} residues "
                f"in {counts.compute_seconds:,.1f} s)",
            ),  # fmt: skip
            ("attempts", str(counts.attempts)),
            (
                "retries",
                f"{counts.retries} shard retries, {counts.replaced_workers} workers replaced, "
                f"{counts.isolated_errors} sequences rejected as failing, {counts.fallbacks} OOM fallbacks",
            ),  # fmt: skip
        ]
        lines += [(f"failed shard {k}", v) for k, v in list(counts.failed.items())[:10]]
        lines.append(("outputs", counts.outputs or "-"))
    if store is not None:
        log = store.log_path(record.run_id)
        lines.append(("log", str(log) if log.exists() else "-"))
    return lines


def _by_rule(by_rule: dict[str, int]) -> str:
    if not by_rule:
        return ""
    return " (" + ", ".join(f"{rule} {n:,}" for rule, n in sorted(by_rule.items())) + ")"
