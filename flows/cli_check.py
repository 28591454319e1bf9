"""``proteoflow check``: is the store sound, and ``--repair`` what can be mended without computing. The checks
live in storage.check; this module renders the report and the commands that recompute what was lost.
Imports no torch, Ray or Prefect."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from typing import TextIO

from flows.cli_args import require_store, store_arg
from flows.errors import CliError

DESCRIPTION = textwrap.dedent("""\
    Check a store's integrity, and with --repair mend what needs no computing.

    Checked: every Parquet file of every table reads to its end, with its table's columns and the
    proteoflow footer (kind, format version); proteoflow.json is there and not newer than this
    proteoflow; members + rejected = records read, per ingest run; one row per key (no seq_hash twice
    in sequences, no (seq_hash, model_sha, row key) twice in a result table); no temporary files or
    staging directories of dead writers, no stray files where the layout defines none; every result
    file listed by its shard record, every output a done shard record lists present and whole; every
    member's seq_hash in sequences; catalog.sql up to date.

    --repair moves damaged, stray and duplicate files into quarantine/ inside the store, each with a
    .why note (nothing is deleted), removes dead temporaries and staging, marks an ingest run whose
    rows are lost as failed (its record kept in quarantine/) so that rerunning it rewrites them, and
    rewrites catalog.sql; then it checks again. It computes nothing: what remains is printed with the
    command that recomputes it (a run rerun with the same arguments computes only what is missing).

    Files a running command is writing (recent temporaries, a running run's new outputs) are left
    alone and listed as notes. Exit status: 0 the store is sound, 1 problems were found (or remain
    after --repair), 2 usage errors (no store, a store of a newer proteoflow).
""")
EPILOG = textwrap.dedent("""\
    examples:
      proteoflow check --store ./store
      proteoflow check --store ./store --repair
      proteoflow check --store ./store --json | jq '.[] | select(.status == "remains")'
""")
FIX_HINTS = {
    "quarantine": "--repair quarantines it",
    "remove": "--repair removes it",
    "write-manifest": "--repair writes it",
    "mark-rerun": "--repair marks the run for rerun",
    "rewrite-catalog": "--repair rewrites it",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``check``."""
    p = sub.add_parser(
        "check",
        help="check the store's integrity (--repair: quarantine damage, remove debris)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    store_arg(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="quarantine damaged and stray files, remove dead temporaries, rewrite catalog.sql; check again",
    )
    p.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    p.set_defaults(handler=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from storage.catalog import StoreFormatError
    from storage.check import check_store

    store = require_store(args)
    try:
        report = check_store(store, repair=args.repair)
    except (FileNotFoundError, NotADirectoryError, StoreFormatError) as exc:
        raise CliError(str(exc)) from None
    if args.json:
        json.dump(report_json(report, store), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        write_report(report, store, args.repair, sys.stdout)
    return 0 if report.sound else 1


# ------------------------------------------------------------------------------------------------ reruns


def rerun_command(rerun, store: str) -> str:
    """The command line that reruns ``rerun`` (a storage.check.Rerun) with the arguments its record holds.

    ``--run-id`` names the run, so the rerun resumes it (and refuses if the options given differ from the
    run's); ingest's length limits come from the input's ingest run."""
    p, ingest = rerun.params, rerun.ingest_params
    words = ["proteoflow", rerun.kind, *(p.get("inputs") or ["INPUT..."]), "--store", store]
    if rerun.kind != "ingest":
        words += ["--model", str(p.get("model", "MODEL"))]
    words += ["--run-id", rerun.run_id]
    for option in ("min_length", "max_length"):
        if ingest.get(option) is not None:
            words += [f"--{option.replace('_', '-')}", str(ingest[option])]
    return shlex.join(words + _option_words(rerun.kind, p.get("engine_options") or {}))


def _option_words(kind: str, options: dict) -> list[str]:
    """The flags of ``embed``/``fold`` that reproduce a run's engine options (defaults left out)."""
    words: list[str] = []
    if kind == "embed":
        words.append("--layers=" + ",".join(str(x) for x in options.get("layers", [-1])))
        words += ["--pooling", ",".join(options.get("poolings", ["mean"]))]
        words += [f"--{name.replace('_', '-')}" for name in ("per_residue", "contacts") if options.get(name)]
        for name, default in (("long_strategy", "window"), ("precision", "auto"), ("dtype", "float32")):
            if options.get(name, default) != default:
                words += [f"--{name.replace('_', '-')}", str(options[name])]
    elif kind == "fold":
        if options.get("num_recycles") is not None:
            words += ["--num-recycles", str(options["num_recycles"])]
        chunk = options.get("chunk_size", "auto")
        if chunk != "auto":
            words += ["--chunk-size", "none" if chunk is None else str(chunk)]
        if options.get("pae"):
            words.append("--pae")
    if options.get("max_tokens") is not None:
        words += ["--max-tokens", str(options["max_tokens"])]
    return words


def _rerun_line(rerun, store: str) -> str:
    what = f"run {rerun.run_id}"
    if rerun.shards:
        what += f" shard{'s' if len(rerun.shards) > 1 else ''} " + ", ".join(map(str, rerun.shards))
    stdin = (
        " (its input was standard input: pipe it in again)"
        if "-" in (rerun.params.get("inputs") or [])
        else ""
    )
    return f"rerun: {rerun_command(rerun, store)}  # {what}: {rerun.why}{stdin}"


# ------------------------------------------------------------------------------------------------ output


def write_report(report, store: str, repaired: bool, out: TextIO) -> None:
    """One line per finding, grouped by kind, the repairs done, the commands that recompute, a summary."""
    for repair in report.repairs:
        out.write(f"repaired {repair.finding.kind}: {repair.finding.path}: {repair.done}\n")
    for finding in report.findings:
        hint = FIX_HINTS.get(finding.fix) if not repaired else None
        out.write(finding.line() + (f"  [{hint}]" if hint else "") + "\n")
    for rerun in report.reruns():
        out.write(_rerun_line(rerun, store) + "\n")
    for note in report.in_progress:
        out.write(f"left alone: {note.path}: {note.reason}\n")
    out.write(summary(report, store, repaired) + "\n")


def summary(report, store: str, repaired: bool) -> str:
    """The last line: sound, or how many problems of which kinds, and what to do next."""
    done = f"; {len(report.repairs)} repaired" if report.repairs else ""
    if report.sound:
        return f"check: {store} is sound ({report.files:,} Parquet files read{done})"
    kinds = ", ".join(f"{n} {kind}" for kind, n in report.by_kind().items())
    problems = f"{len(report.findings)} problem{'s' if len(report.findings) != 1 else ''}"
    if repaired:
        return f"check: {store}: {problems} remain ({kinds}){done}" + (
            "; rerun the commands above" if report.reruns() else ""
        )
    fixable = sum(1 for f in report.findings if f.fix)
    hint = f"; `proteoflow check --repair` mends {fixable} of them" if fixable else ""
    return f"check: {store}: {problems} ({kinds}){hint}"


def report_json(report, store: str) -> list[dict]:
    """Every finding as an object: kind, path, reason, status (repaired, remains or in-progress), what the
    repair does (fix) or did (done), and the command that recomputes what it lost (or null)."""

    def row(finding, status: str, done: str | None = None) -> dict:
        command = rerun_command(finding.rerun, store) if finding.rerun is not None else None
        return {"kind": finding.kind, "path": finding.path, "reason": finding.reason, "status": status,
                "fix": finding.fix or None, "done": done, "command": command}  # fmt: skip

    return (
        [row(r.finding, "repaired", r.done) for r in report.repairs]
        + [row(f, "remains") for f in report.findings]
        + [row(f, "in-progress") for f in report.in_progress]
    )
