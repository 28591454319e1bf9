"""A run's report as one self-contained HTML file (``proteoflow report``, and each scheduled run's report):
plots as embedded PNG images, no scripts, styles or fonts fetched from anywhere, so it opens offline and can
be mailed or attached as it is.

Folding: pLDDT and pTM distributions, mean pLDDT against length, the best and worst structures. Embedding:
lengths and throughput. Both: the shard timeline per worker, failed shards and rejected records with their
reasons, the run's parameters and package versions. Reads the store only (run and shard records, the SQL
views); imports matplotlib (Agg backend, no display needed) but no Prefect, Ray or models.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from flows.errors import CliError
from flows.run_summary import facts
from storage.catalog import query
from storage.layout import Store
from storage.runs import RunRecord, load_run
from storage.shards import ShardRecord, load_shard_records

LISTED = 10  # best and worst structures shown
REJECTIONS_LISTED = 50


@dataclass
class ReportData:
    """What a report shows, read from the store."""

    record: RunRecord
    shards: list[ShardRecord] = field(default_factory=list)
    structures: list[dict] = field(default_factory=list)  # seq_hash, seq_id, length, mean_plddt, ptm
    lengths: list[int] = field(default_factory=list)  # embedded sequences' lengths
    rejections: list[dict] = field(default_factory=list)  # run_id, seq_id, rule, reason, length
    rejected_by_rule: list[tuple[str, str, int]] = field(default_factory=list)  # run_id, rule, count


def report_path(store: Store, run_id: str) -> Path:
    """Where a scheduled run leaves its report: beside the run's log in the store."""
    return store.log_path(run_id).with_name(f"{run_id}.report.html")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _rows(store: Store, sql: str) -> list[dict]:
    columns, rows = query(store.root, sql)
    return [dict(zip(columns, r, strict=True)) for r in rows]


def gather(store: Store, run_id: str) -> ReportData:
    """Everything the report shows about ``run_id`` (a one-line CliError when the store has no such run)."""
    record = load_run(store, run_id)
    if record is None:
        raise CliError(f"no run {run_id} in {store.root} (see `proteoflow runs --store {store.root}`)")
    data = ReportData(record, sorted(load_shard_records(store, run_id).values(), key=lambda s: s.shard_id))
    run = _literal(run_id)
    ingest = _literal(str(record.params.get("ingest_run") or run_id))
    if record.kind == "fold":
        data.structures = _rows(store, f"""
            SELECT s.seq_hash, min(m.seq_id) AS seq_id, any_value(s.length) AS length,
                   any_value(s.mean_plddt) AS mean_plddt, any_value(s.ptm) AS ptm
            FROM structures s LEFT JOIN members m ON m.seq_hash = s.seq_hash AND m.run_id = {ingest}
            WHERE s.run_id = {run} GROUP BY s.seq_hash ORDER BY mean_plddt DESC""")  # fmt: skip
    elif record.kind == "embed":
        found = _rows(store, f"SELECT seq_hash, any_value(length) AS length FROM embeddings "
                             f"WHERE run_id = {run} GROUP BY seq_hash")  # fmt: skip
        data.lengths = [int(r["length"]) for r in found]
    runs = f"({run}, {ingest})"
    data.rejected_by_rule = [
        (r["run_id"], r["rule"], int(r["n"]))
        for r in _rows(
            store,
            f"SELECT run_id, rule, count(*) AS n FROM rejected WHERE run_id IN {runs} "
            "GROUP BY ALL ORDER BY n DESC, rule",
        )  # fmt: skip
    ]
    data.rejections = _rows(store, f"SELECT run_id, seq_id, rule, reason, length FROM rejected "
                                   f"WHERE run_id IN {runs} ORDER BY run_id, record_index "
                                   f"LIMIT {REJECTIONS_LISTED}")  # fmt: skip
    return data


# ---------------------------------------------------------------------------------------------- plots


def _figure(width: float = 5.2, height: float = 3.2):
    """A figure drawn by the Agg backend (no display, no global pyplot state: safe in any thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _histogram(values: Sequence[float], title: str, xlabel: str, bins, colour: str) -> str:
    fig = _figure()
    ax = fig.subplots()
    ax.hist(values, bins=bins, color=colour, edgecolor="white")
    ax.set(title=title, xlabel=xlabel, ylabel="sequences")
    return _png(fig)


def plddt_against_length(structures: list[dict]) -> str:
    fig = _figure()
    ax = fig.subplots()
    ax.scatter([s["length"] for s in structures], [s["mean_plddt"] for s in structures], s=14, alpha=0.7)
    ax.set(title="mean pLDDT against length", xlabel="length (residues)", ylabel="mean pLDDT", ylim=(0, 100))
    return _png(fig)


def shard_throughput(shards: list[ShardRecord]) -> str:
    done = [s for s in shards if s.status == "done" and s.seconds > 0]
    fig = _figure()
    ax = fig.subplots()
    ax.bar([str(s.shard_id) for s in done], [s.residues / s.seconds for s in done], color="#4c72b0")
    ax.set(title="throughput per shard", xlabel="shard", ylabel="residues / s")
    if len(done) > 30:
        ax.set_xticks([])
    return _png(fig)


def shard_timeline(shards: list[ShardRecord]) -> str:
    """Each shard as a bar from its start (finished_at - seconds) to its end, one row per worker."""
    timed = [s for s in shards if s.finished_at is not None]
    t0 = min(_epoch(s.finished_at) - s.seconds for s in timed)
    workers = sorted({s.worker or "(none)" for s in timed})
    fig = _figure(7.0, 0.9 + 0.45 * len(workers))
    ax = fig.subplots()
    for row, worker in enumerate(workers):
        mine = [s for s in timed if (s.worker or "(none)") == worker]
        for status, colour in (("done", "#55a868"), ("failed", "#c44e52")):
            spans = [
                (_epoch(s.finished_at) - s.seconds - t0, max(s.seconds, 0.05))
                for s in mine
                if s.status == status
            ]
            if spans:
                ax.broken_barh(spans, (row - 0.35, 0.7), facecolors=colour, edgecolor="white", label=status)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.set_yticks(range(len(workers)), workers)
    ax.set(title="shards per worker over time", xlabel="seconds since the first shard started")
    return _png(fig)


def _epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def plots(data: ReportData) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of every plot this run has data for."""
    found = []
    if data.structures:
        found += [
            ("pLDDT distribution", _histogram([s["mean_plddt"] for s in data.structures],
                                              "mean pLDDT per structure", "mean pLDDT", range(0, 101, 5), "#4c72b0")),
            ("pTM distribution", _histogram([s["ptm"] for s in data.structures], "pTM per structure", "pTM",
                                            [i / 20 for i in range(21)], "#dd8452")),
            ("mean pLDDT against length", plddt_against_length(data.structures)),
        ]  # fmt: skip
    if data.lengths:
        found.append(("lengths", _histogram(data.lengths, "lengths of the embedded sequences",
                                            "length (residues)", 20, "#4c72b0")))  # fmt: skip
    if data.record.kind == "embed" and any(s.status == "done" and s.seconds > 0 for s in data.shards):
        found.append(("throughput", shard_throughput(data.shards)))
    if data.shards:
        found.append(("shard timeline", shard_timeline(data.shards)))
    return found


# ---------------------------------------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px;
text-align: left; vertical-align: top; } th { background: #f4f4f4; } .num { text-align: right; }
.status-completed { color: #2a7d3f; } .status-partial, .status-failed, .status-interrupted { color: #b3261e; }
.warn { background: #fff3cd; padding: 0.5em 1em; border: 1px solid #e0c060; }
figure { display: inline-block; margin: 0.5em; } figcaption { font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(columns: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> str:
    """An HTML table (numbers right-aligned); no header row when ``columns`` is None."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns or ())
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_fmt(v)}</td>' if isinstance(v, (int, float)) else f"<td>{_e(v)}</td>"
                         for v in r) + "</tr>"
        for r in rows
    )  # fmt: skip
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _fmt(value: float) -> str:
    return f"{value:,.3g}" if isinstance(value, float) else f"{value:,}"


def _structure_rows(structures: list[dict]) -> list[tuple]:
    return [(s["seq_id"] or "-", s["seq_hash"], s["length"], round(s["mean_plddt"], 1), round(s["ptm"], 3))
            for s in structures]  # fmt: skip


def render(data: ReportData) -> str:
    """The report of ``data`` as one HTML document."""
    record = data.record
    parts = [
        f"<h1>proteoflow {_e(record.kind)} run {_e(record.run_id)}: "
        f'<span class="status-{_e(record.status)}">{_e(record.status)}</span></h1>'
    ]
    if (record.params.get("identity") or {}).get("random_weights"):
        parts.append('<p class="warn">RANDOM WEIGHTS: this run used randomly initialised weights; its results '
                     "mean nothing.</p>")  # fmt: skip
    parts += ["<h2>Summary</h2>", _table(None, facts(record))]
    figures = plots(data)
    if figures:
        parts.append("<h2>Plots</h2>")
        parts += [f'<figure><img alt="{_e(c)}" src="data:image/png;base64,{b}"><figcaption>{_e(c)}</figcaption>'
                  "</figure>" for c, b in figures]  # fmt: skip
    elif record.kind != "ingest":
        parts.append("<p>This run computed nothing (every sequence already had its results), so there is "
                     "nothing to plot.</p>")  # fmt: skip
    if data.structures:
        columns = ("record", "seq_hash", "length", "mean pLDDT", "pTM")
        parts += ["<h2>Best structures</h2>", _table(columns, _structure_rows(data.structures[:LISTED]))]
        worst = list(reversed(data.structures[-LISTED:]))
        parts += ["<h2>Worst structures</h2>", _table(columns, _structure_rows(worst))]
    if data.shards:
        parts += ["<h2>Shards</h2>", _table(
            ("shard", "status", "attempt", "tries", "worker", "sequences", "residues", "seconds", "finished", "error"),
            [(s.shard_id, s.status, s.attempt, s.tries, s.worker or "-", s.sequences, s.residues, round(s.seconds, 2),
              s.finished_at.isoformat(timespec="seconds") if s.finished_at else "-", s.error or "")
             for s in data.shards])]  # fmt: skip
    parts.append("<h2>Failures and rejections</h2>")
    failed = [s for s in data.shards if s.status == "failed"]
    if failed:
        parts.append(
            _table(
                ("failed shard", "sequences", "error"), [(s.shard_id, s.sequences, s.error) for s in failed]
            )
        )
    if data.rejected_by_rule:
        parts.append(_table(("run", "rule", "records"), data.rejected_by_rule))
        parts.append(f"<p>First {len(data.rejections)} rejected records:</p>")
        parts.append(_table(("run", "record", "rule", "reason", "length"),
                            [(r["run_id"], r["seq_id"], r["rule"], r["reason"], r["length"]) for r in data.rejections]))  # fmt: skip
    if not failed and not data.rejected_by_rule:
        parts.append("<p>No shard failed and no record was rejected.</p>")
    parts += [
        "<h2>Parameters</h2>",
        f"<pre>{_e(json.dumps(record.params, indent=2, sort_keys=True, default=str))}</pre>",
    ]
    parts += ["<h2>Versions</h2>", _table(("package", "version"), sorted(record.versions.items()))]
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<p><small>Written by proteoflow report at {_e(made)}.</small></p>")
    title = f"proteoflow {record.kind} {record.run_id} ({record.status})"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")  # fmt: skip


def write_report(store: Store, run_id: str, out: Path) -> Path:
    """Gather, render and write the report of ``run_id`` to ``out`` (atomically); returns ``out``."""
    document = render(gather(store, run_id))
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(document, encoding="utf-8")
    temporary.replace(out)
    return out
