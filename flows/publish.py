"""What a scheduled run leaves for people when it ends: its HTML report in the store, two Prefect artifacts
(a markdown summary and a table of counts, throughput, failures and outputs, shown on the flow run's page
and, under a key per deployment, as the latest of their series), and, when the run failed or ended partial
and a URL was given, a JSON notification POSTed to it.

Publishing never changes how the run ended: a report, artifact or notification that cannot be made is a
warning in the run's log.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import deployment as current_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.states import State

from flows.job import Job
from flows.run_summary import facts
from storage.layout import Store
from storage.objects import as_path
from storage.runs import ComputeCounts, RunRecord

Logger = logging.Logger | logging.LoggerAdapter
NOTIFY_TIMEOUT_S = 10.0


@dataclass
class Outcome:
    """How the compute part of a scheduled run ended: ``completed``, ``nothing-new``, ``partial``,
    ``failed`` or ``interrupted``, with the one-line reason and the store's run record when there is one."""

    status: str
    message: str
    record: RunRecord | None = None
    seconds: float = 0.0


def publish(kind: str, job: Job, outcome: Outcome, state: State, notify: str | None, logger: Logger) -> dict:
    """Report, artifacts and notification of a finished scheduled run; returns the summary it published."""
    store = Store(job.store)
    report = None
    if outcome.record is not None:
        report = _write_report(store, outcome.record.run_id, logger)
    summary = summarize(kind, job, outcome, state, report)
    try:
        key = artifact_key(kind)
        create_markdown_artifact(markdown(summary, outcome, store), key=f"{key}-summary" if key else None,
                                 description=f"proteoflow {kind} run: {summary['status']}")  # fmt: skip
        create_table_artifact(table(summary, outcome), key=f"{key}-counts" if key else None,
                              description="counts, throughput, failures and outputs of the run")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - publishing must not change how the run ended
        logger.warning("could not publish the run's artifacts: %s", exc)
    if notify and summary["status"] in ("failed", "partial", "interrupted"):
        send_notification(notify, summary, logger)
    return summary


def _write_report(store: Store, run_id: str, logger: Logger) -> Path | None:
    from flows.report import report_path, write_report

    try:
        return write_report(store, run_id, report_path(store, run_id))
    except Exception as exc:  # noqa: BLE001 - a report that cannot be drawn is a warning, not a failed run
        logger.warning("could not write the run's HTML report: %s", exc)
        return None


def artifact_key(kind: str) -> str | None:
    """``proteoflow-<kind>-<deployment>`` in the characters artifact keys allow; None outside a deployment."""
    name = current_deployment.name
    if not name:
        return None
    slug = re.sub(r"[^a-z0-9-]+", "-", str(name).lower()).strip("-")
    return f"proteoflow-{kind}-{slug}" if slug else None


def summarize(kind: str, job: Job, outcome: Outcome, state: State, report: Path | None) -> dict[str, Any]:
    """The run's summary as plain JSON data (the notification's body)."""
    record = outcome.record
    counts = record.counts if record is not None else None
    return {
        "flow_run": str(current_flow_run.id or ""),
        "flow_run_name": current_flow_run.name,
        "deployment": current_deployment.name,
        "kind": kind,
        "state": state.name,
        "status": outcome.status,
        "message": state.message or outcome.message,
        "run_id": record.run_id if record is not None else None,
        "store": str(as_path(job.store).resolve()),
        "incoming": job.inputs[0],
        "model": job.model,
        "counts": _counts(counts),
        "report": str(report) if report is not None else None,
        "log": str(Store(job.store).log_path(record.run_id)) if record is not None else None,
        "seconds": round(outcome.seconds, 2),
    }


def _counts(counts: object) -> dict[str, Any]:
    if not isinstance(counts, ComputeCounts):
        return {}
    return {
        "sequences": counts.sequences,
        "residues": counts.residues,
        "computed_residues": counts.computed_residues,
        "residues_per_s": round(counts.residues_per_s, 1),
        "shards": counts.shards,
        "shards_computed": counts.shards_computed,
        "shards_done_before": counts.shards_done_before,
        "shards_failed": counts.shards_failed,
        "failed": counts.failed,
        "isolated_errors": counts.isolated_errors,
        "attempts": counts.attempts,
        "ingest": {k: counts.ingest.get(k) for k in ("records", "accepted", "rejected", "new_sequences")},
        "outputs": counts.outputs,
    }


def markdown(summary: dict[str, Any], outcome: Outcome, store: Store) -> str:
    """The summary artifact: how the run ended, its facts, and where to look next."""
    lines = [f"### proteoflow {summary['kind']}: {summary['state']}", "", summary["message"] or "", ""]
    if outcome.record is not None:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in facts(outcome.record, store)]
        lines.append("")
    if summary["report"]:
        lines.append(f"Report: `{summary['report']}` (self-contained HTML; or "
                     f"`proteoflow report {summary['run_id']} --store {summary['store']} --out report.html`)")  # fmt: skip
    if summary["run_id"]:
        lines.append(f"\nDetails: `proteoflow runs {summary['run_id']} --store {summary['store']}`")
    return "\n".join(lines) + "\n"


def _cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(summary: dict[str, Any], outcome: Outcome) -> list[dict[str, Any]]:
    """The table artifact: one row per measure (counts, throughput, failures, outputs)."""
    counts = summary["counts"]
    rows = [("status", summary["status"]), ("run", summary["run_id"] or "-")]
    if counts:
        ingest = counts["ingest"]
        rows += [
            ("records read", ingest.get("records")),
            ("records rejected at ingest", ingest.get("rejected")),
            ("sequences planned", counts["sequences"]),
            ("residues planned", counts["residues"]),
            ("residues computed", counts["computed_residues"]),
            ("residues per second", counts["residues_per_s"]),
            ("shards", counts["shards"]),
            ("shards computed", counts["shards_computed"]),
            ("shards done before", counts["shards_done_before"]),
            ("shards failed", counts["shards_failed"]),
            ("sequences rejected as failing", counts["isolated_errors"]),
            ("attempts", counts["attempts"]),
            ("outputs", counts["outputs"]),
        ]
        rows += [(f"failed shard {k}", v) for k, v in list(counts["failed"].items())[:10]]
    rows += [("report", summary["report"] or "-"), ("seconds", summary["seconds"])]
    return [{"measure": name, "value": "-" if value is None else value} for name, value in rows]


def send_notification(url: str, summary: dict[str, Any], logger: Logger) -> bool:
    """POST ``summary`` as JSON to ``url``; a failure is a warning in the run's log. Returns whether it went."""
    request = urllib.request.Request(
        url,
        data=json.dumps(summary, default=str).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "proteoflow"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT_S) as response:
            logger.info("notified %s (HTTP %s)", url, response.status)
            return True
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.warning("could not notify %s: %s", url, getattr(exc, "reason", exc))
        return False
