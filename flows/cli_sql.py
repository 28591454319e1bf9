"""``proteoflow sql``: read-only DuckDB SQL over the store's views. Imports no torch, Ray or Prefect."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

from flows.cli_args import require_store, store_arg
from flows.errors import CliError

VIEWS = "{views}"  # expanded from storage.schemas only when help is shown: building the parser stays light
DESCRIPTION = textwrap.dedent("""\
    Answer a read-only SQL query over the store's views:
    {views}

    When vectors of several widths share a store, `embeddings` has embedding FLOAT[] and each width D also
    gets a view `embeddings_dD` (likewise `residue_embeddings_dD`) with FLOAT[D].

    Only queries run: SELECT (with WITH, VALUES, PIVOT, UNPIVOT), DESCRIBE, SUMMARIZE, SHOW and EXPLAIN.
    Statements that would write (INSERT, CREATE, COPY, ATTACH, INSTALL, SET, PRAGMA, CALL, EXPLAIN ANALYZE,
    ...) are refused, and the session cannot read files outside the store's tables. A damaged file is
    skipped with a warning naming it; the other files still answer.
""")
EPILOG = textwrap.dedent("""\
    examples:
      proteoflow sql --store ./store "SELECT rule, count(*) FROM rejected GROUP BY rule"
      proteoflow sql --store ./store --format csv "SELECT seq_id, length FROM members"
      proteoflow sql --store ./store --timeout 60 "SUMMARIZE sequences"
      proteoflow sql --store ./store "WITH q AS (SELECT embedding FROM embeddings e JOIN members m
          USING (seq_hash) WHERE m.seq_id = 'sp|P0A7V8|RS4_ECOLI' AND e.layer = 6 AND e.pooling = 'mean')
        SELECT m.seq_id, array_cosine_similarity(e.embedding, q.embedding) AS cosine
        FROM embeddings e JOIN members m USING (seq_hash), q ORDER BY cosine DESC LIMIT 10"
""")


def views_help(width: int = 100) -> str:
    """One entry per view, its columns from storage.schemas (list columns with their DuckDB type)."""
    from storage.catalog import view_columns
    from storage.schemas import TABLE_SCHEMAS

    lines = []
    for table in TABLE_SCHEMAS:
        columns = [
            name if "[" not in kind else f"{name} {_short(kind)}" for name, kind in view_columns(table)
        ]
        text = f"{table}({', '.join(columns)})"
        lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def _short(kind: str) -> str:
    """A list type as help shows it: STRUCT fields elided."""
    return re.sub(r"STRUCT\(.*\)", "STRUCT", kind)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Raw description, with the views list generated when (and only when) help is printed."""

    def add_text(self, text: str | None) -> None:
        if text and VIEWS in text:
            text = text.replace(VIEWS, views_help())
        super().add_text(text)


def positive_seconds(text: str) -> float:
    """An argparse type: a time limit in seconds, above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sql``."""
    p = sub.add_parser(
        "sql",
        help="query the store with DuckDB SQL (read-only)",
        formatter_class=_HelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    store_arg(p)
    p.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format (default table)"
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="stop the query after this long, exit status 2 (default: no limit; Ctrl-C always stops it)",
    )
    p.add_argument("query", metavar="SQL", help="the query; '-' reads it from stdin")
    p.set_defaults(handler=cmd_sql)


def _warn_damaged(path: Path, reason: str) -> None:
    sys.stderr.write(f"proteoflow sql: warning: skipped damaged file {path} ({reason})\n")


def one_line(message: str) -> str:
    """DuckDB's message on one line: the caret picture of the query dropped, the rest joined."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith("LINE ") and set(line) != {"^"}]
    text = " ".join(kept)
    # A page that fails to decode surfaces through the Arrow stream the view reads: name the table instead.
    return re.sub(r"the stream registered as '_files_([a-z_]+?)(_d\d+)?'", r"the \1 files", text)


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from flows.output import write_result
    from storage.catalog import QueryTimeout, StoreFormatError, query

    sql = sys.stdin.read() if args.query == "-" else args.query
    try:
        columns, rows = query(require_store(args), sql, timeout=args.timeout, warn=_warn_damaged)
    except (QueryTimeout, StoreFormatError) as exc:
        raise CliError(str(exc)) from None
    except duckdb.Error as exc:
        raise type(exc)(one_line(str(exc))) from None
    write_result(columns, rows, args.format)
    return 0
