"""``proteoflow sql``: read-only DuckDB SQL over the store's views. Imports no torch, Ray or Prefect."""

from __future__ import annotations

import argparse
import sys
import textwrap

from flows.cli_args import require_store, store_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sql``."""
    p = sub.add_parser(
        "sql",
        help="query the store with DuckDB SQL (read-only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Answer a read-only SQL query over the store's views:
              sequences(seq_hash, sequence, length)
              members(run_id, record_index, seq_id, description, seq_hash, length, source)
              rejected(run_id, record_index, seq_id, description, source, rule, reason, length)
              runs(run_id, kind, status, started_at, finished_at, params, counts, versions, message)
              embeddings(seq_hash, model, model_sha, layer, pooling, embedding FLOAT[D], ...)
              structures(seq_hash, model, pdb, mean_plddt, ptm, ...)
            Statements that would write (INSERT, CREATE, COPY, ...) are refused.
        """),
        epilog=textwrap.dedent("""\
            examples:
              proteoflow sql --store ./store "SELECT rule, count(*) FROM rejected GROUP BY rule"
              proteoflow sql --store ./store --format csv "SELECT seq_id, length FROM members"
        """),
    )
    store_arg(p)
    p.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format (default table)"
    )
    p.add_argument("query", metavar="SQL", help="the query; '-' reads it from stdin")
    p.set_defaults(handler=cmd_sql)


def cmd_sql(args: argparse.Namespace) -> int:
    from flows.output import write_result
    from storage.catalog import query

    sql = sys.stdin.read() if args.query == "-" else args.query
    columns, rows = query(require_store(args), sql)
    write_result(columns, rows, args.format)
    return 0
