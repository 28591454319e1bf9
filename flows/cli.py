"""The ``proteoflow`` command line. Heavy packages (torch, ray, prefect) are imported only by the
subcommands that need them, so ``proteoflow sql`` answers in well under a second."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from dataclasses import asdict

from flows import cli_check, cli_compute, cli_family, cli_runs, cli_search, cli_serve, cli_sql, cli_submit
from flows.cli_args import check_object_store, positive_int, require_store, run_id_arg, store_arg
from flows.errors import CliError, interrupted_by_signal, report_interrupt

EPILOG = textwrap.dedent("""\
    typical session:
      proteoflow ingest proteome.fasta.gz --store ./store
      proteoflow embed proteome.fasta.gz --store ./store --model esm2_t33_650M_UR50D
      proteoflow sql --store ./store "SELECT count(*) FROM sequences"

    Every subcommand takes --store DIR or --store s3://bucket/prefix (default: $PROTEOFLOW_STORE).
    See `proteoflow COMMAND --help`.
""")


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="validate, deduplicate and store FASTA records",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Read protein FASTA (plain or gzip, files, directories, '-' for stdin) into the store.

            Each record is normalized (whitespace removed, upper-cased, one terminal '*' dropped) and
            checked against the alphabet ACDEFGHIKLMNPQRSTVWY + XBZUO. Accepted records become rows of
            `members`; identical sequences are stored once in `sequences`, keyed by seq_hash (MD5 of the
            normalized sequence). Every refused record becomes a `rejected` row naming the rule, the
            first offending character and its position. Re-ingesting the same input changes nothing.
        """),
        epilog="example:\n  proteoflow ingest ecoli.fasta.gz metagenome/ --store ./store --max-length 2000",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="FASTA file (.gz ok), directory of them, object (s3://bucket/x.fasta) or prefix, or '-'",
    )
    store_arg(p)
    p.add_argument(
        "--run-id",
        type=run_id_arg,
        metavar="ID",
        help="name for this run (default: derived from the input content and options)",
    )
    p.add_argument("--min-length", type=positive_int, metavar="N", help="reject sequences shorter than N")
    p.add_argument("--max-length", type=positive_int, metavar="N", help="reject sequences longer than N")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="parse in N processes (default: one per core for inputs over 32 MB, else 0 = in-process)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_ingest)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage block first), pointing at --help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; subcommand modules add their own parsers here."""
    parser = OneLineParser(
        prog="proteoflow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Proteome-scale ESM-2 embeddings and ESMFold structures: FASTA in, Parquet out, SQL on top.",
    )
    parser.add_argument("--version", action="version", version=f"proteoflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_ingest(sub)
    cli_compute.add_parsers(sub)
    cli_family.add_parsers(sub)
    cli_sql.add_parser(sub)
    cli_check.add_parser(sub)
    cli_search.add_parsers(sub)
    cli_serve.add_parser(sub)
    cli_runs.add_parsers(sub)
    cli_submit.add_parser(sub)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("proteoflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def print_ingest_summary(result, out=sys.stderr) -> None:
    """Human summary of an ingest: what was read, kept, merged and refused."""
    from flows.output import human_bytes

    c = result.counts
    if result.already_ingested:
        out.write(f"already ingested as run {result.run_id}: nothing changed; that run's counts were:\n")
    lines = [
        f"run           {result.run_id}",
        f"records       {c.records:,} ({human_bytes(c.bytes)})",
        f"accepted      {c.accepted:,} ({c.residues:,} residues)",
        f"duplicates    {c.duplicates:,} (same sequence as an earlier record of this run)",
        f"new sequences {c.new_sequences:,} ({c.already_in_store:,} already in the store)",
        f"rejected      {c.rejected:,}",
    ]
    lines += [f"  {rule:<12}{n:,}" for rule, n in c.rejected_by_rule.items()]
    if c.skipped_files:
        lines.append(f"skipped       {c.skipped_files} non-FASTA file(s) in input directories")
    out.write("\n".join(lines) + "\n")


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.output import human_bytes
    from flows.progress import ProgressBar
    from storage.ingest import ingest
    from storage.layout import Store

    store = Store(require_store(args))
    check_object_store(store.root)
    bar = ProgressBar("ingest", unit="records")
    result = ingest(
        store,
        args.inputs,
        run_id=args.run_id,
        min_length=args.min_length,
        max_length=args.max_length,
        progress=lambda info: bar.update(info["records"]),
        workers=args.workers,
    )
    bar.finish(f"ingest: {result.counts.records:,} records, {human_bytes(result.counts.bytes)} read "
               f"in {bar.elapsed:,.1f} s")  # fmt: skip
    for name in result.skipped_files:
        sys.stderr.write(f"note: skipped {name} (not a FASTA file name)\n")
    if args.json:
        payload = {
            "run_id": result.run_id,
            "already_ingested": result.already_ingested,
            **asdict(result.counts),
        }
        print(json.dumps(payload))
    else:
        print_ingest_summary(result, sys.stdout)
    return 0


NUMERIC_LIST_OPTIONS = ("--layers",)


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let ``--layers -1,6`` work: argparse would take ``-1,6`` for an option, so glue it as ``--layers=-1,6``."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in NUMERIC_LIST_OPTIONS and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn expected failures into one line on stderr: exit 2 for a usage or
    input error, 1 for a file system that refuses the store's writes, 128 + signal for Ctrl-C or SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    import duckdb

    from storage.catalog import ReadOnlyError, StoreFormatError
    from storage.fasta import InputError
    from storage.objects import ObjectStoreError
    from storage.results import DamagedStoreError

    try:
        _check_store_arg(args)
        return args.handler(args)
    except (
        CliError,
        InputError,
        ReadOnlyError,
        FileNotFoundError,
        StoreFormatError,
        DamagedStoreError,
        ObjectStoreError,
    ) as exc:
        sys.stderr.write(f"proteoflow {args.command}: error: {exc}\n")
        return 2
    except duckdb.Error as exc:
        sys.stderr.write(f"proteoflow {args.command}: SQL error: {str(exc).strip()}\n")
        return 2
    except KeyboardInterrupt as exc:
        hint = "; rerun the same command to resume" if args.command in ("embed", "fold") else ""
        code = report_interrupt(args.command, getattr(exc, "signum", None), hint)
        if interrupted_by_signal():
            # A compute run has recorded itself and stopped what it started; the interpreter's own teardown
            # (Ray's exit hook waits seconds for processes a SIGTERM to the process group already ended)
            # would only delay the exit.
            sys.stdout.flush()
            os._exit(code)
        return code
    except BrokenPipeError:
        return 0
    except OSError as exc:  # read-only store, full disk, permissions: what the file system said, where
        sys.stderr.write(
            f"proteoflow {args.command}: error: {_os_error(exc, getattr(args, 'store', None))}\n"
        )
        return 1


def _check_store_arg(args: argparse.Namespace) -> None:
    """``--store`` must be a directory (or not exist yet): a file there fails in a dozen places otherwise."""
    from storage.objects import ObjectStoreError, as_path, is_uri

    store = getattr(args, "store", None)
    if store and is_uri(store):
        try:
            as_path(store)  # an unknown scheme or a URI without a bucket: one line, before anything starts
        except ObjectStoreError as exc:
            raise CliError(f"--store {exc}") from None
    elif store and os.path.exists(store) and not os.path.isdir(store):
        raise CliError(f"--store {store} is a file, not a store directory")


def _os_error(exc: OSError, store: str | None) -> str:
    """``[Errno 28] No space left on device: 'PATH'`` becomes ``no space left on device: PATH``; Arrow's
    errors carry the errno only in their text, and no path: the store's is given then."""
    code = exc.errno
    if code is None and (found := re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)):
        code = int(found.group(1))
    what = (os.strerror(code) if code else exc.strerror or _one_line(exc)).rstrip(".")
    what = what[:1].lower() + what[1:]
    where = exc.filename or store
    return f"{what}: {where}" if where else what


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
