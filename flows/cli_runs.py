"""``proteoflow runs`` (the store's runs, newest first, or one run in full) and ``proteoflow report`` (one run as
a self-contained HTML file). Both read the store only: no Prefect, Ray or models."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

from flows.cli_args import require_store, store_arg
from flows.errors import CliError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``runs`` and ``report``."""
    r = sub.add_parser(
        "runs",
        help="list the store's runs, newest first (or show one run in full)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            List the store's runs (ingest, embed, fold), newest first: id, kind, status, start, duration,
            sequences, residues/s and model. With a RUN_ID, show that run in full: its message, counts,
            shards, failures, outputs, log, parameters and package versions.
        """),
        epilog=textwrap.dedent("""\
            examples:
              proteoflow runs --store ./store
              proteoflow runs --store ./store --kind fold --status partial
              proteoflow runs --store ./store --format csv > runs.csv
              proteoflow runs fold-1a2b3c4d5e6f7a8b --store ./store
        """),
    )
    r.add_argument("run_id", nargs="?", metavar="RUN_ID", help="show this run in full")
    store_arg(r)
    r.add_argument("--kind", choices=("ingest", "embed", "fold"), help="only runs of this kind")
    r.add_argument(
        "--status",
        metavar="STATUS",
        help="only runs with this status: completed, partial, failed, interrupted, running",
    )
    r.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format (default table)"
    )
    r.set_defaults(handler=cmd_runs)

    p = sub.add_parser(
        "report",
        help="write one run's report as a self-contained HTML file with plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Write the report of one run as ONE HTML file that opens offline (plots embedded as PNG): for
            fold runs the pLDDT and pTM distributions, mean pLDDT against length and the best and worst
            structures; for embed runs the lengths and the throughput per shard; for both the shard
            timeline per worker, failed shards and rejected records with their reasons, and the run's
            parameters and package versions.
        """),
        epilog=textwrap.dedent("""\
            examples:
              proteoflow report fold-1a2b3c4d5e6f7a8b --store ./store --out fold-report.html
              proteoflow runs --store ./store --kind fold     # to find run ids
        """),
    )
    p.add_argument("run_id", metavar="RUN_ID", help="the run to report on (see `proteoflow runs`)")
    store_arg(p)
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default: RUN_ID.html here)")
    p.set_defaults(handler=cmd_report)


def _open_store(args: argparse.Namespace):
    from storage.layout import Store

    store = Store(require_store(args))
    if not store.exists():
        raise CliError(f"{store.root} is not a proteoflow store (no proteoflow.json)")
    return store


def cmd_runs(args: argparse.Namespace) -> int:
    from flows.output import write_result
    from flows.run_summary import ROW_COLUMNS, facts, row, table_row
    from storage.runs import STATUSES, list_runs, load_run

    if args.status is not None and args.status not in STATUSES:
        raise CliError(f"--status takes one of {', '.join(STATUSES)}, not {args.status!r}")
    store = _open_store(args)
    if args.run_id:
        record = load_run(store, args.run_id)
        if record is None:
            raise CliError(
                f"no run {args.run_id} in {store.root} (see `proteoflow runs --store {store.root}`)"
            )
        if args.format == "json":
            print(json.dumps(asdict(record), indent=1, default=str))
            return 0
        if args.format == "csv":
            write_result(("field", "value"), facts(record, store), "csv")
            return 0
        width = max(len(name) for name, _ in facts(record, store))
        for name, value in facts(record, store):
            print(f"{name:<{width}}  {value}")
        print(f"{'parameters':<{width}}  {json.dumps(record.params, sort_keys=True, default=str)}")
        print(f"{'versions':<{width}}  " + ", ".join(f"{k} {v}" for k, v in sorted(record.versions.items())))
        return 0
    records = [r for r in list_runs(store, args.kind) if args.status in (None, r.status)]
    if args.format == "table":
        columns = ("id", "kind", "status", "started (UTC)", "duration", "sequences", "residues/s", "model")
        write_result(columns, [table_row(r) for r in records], "table")
    else:
        write_result(ROW_COLUMNS, [row(r) for r in records], args.format)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.report import write_report

    store = _open_store(args)
    out = Path(args.out or f"{args.run_id}.html")
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; name the HTML file to write")
    write_report(store, args.run_id, out)
    print(f"wrote {out} ({out.stat().st_size / 1000:,.0f} KB): open it in any browser, no network needed")
    sys.stdout.flush()
    return 0
