"""``proteoflow serve``: embed or fold an incoming folder on a schedule, as a Prefect deployment served by this
process. The worker and engine options are embed's and fold's own (copied from their parsers, so they are
defined once); imports no Prefect, Ray or torch until the command runs."""

from __future__ import annotations

import argparse
import os
import re
import textwrap

from flows import cli_compute
from flows.cli_args import positive_int, store_arg
from flows.errors import CliError

KINDS = ("fold", "embed")
DESCRIPTION = textwrap.dedent("""\
    Register the Prefect deployment proteoflow-scheduled-<kind>/<name> on the server of PREFECT_API_URL and
    serve it from this process until Ctrl-C. Each run, on schedule or started by hand
    (prefect deployment run 'proteoflow-scheduled-fold/NAME'), ingests every FASTA file under --incoming
    (content already ingested is a no-op) and computes only the sequences this model has never computed,
    with the same flow as `proteoflow embed|fold`. A run with nothing new ends in seconds without loading
    the model or starting Ray.

    One run per store at a time: a run due while another runs on the same store waits for it (a Prefect
    concurrency limit named after the store), then computes only what is still missing. A run whose
    process died is marked Crashed when the next run starts. A run that ends partial (shards failed after
    their retries) is resumed by the next run over the same folder. Final states: Completed, Completed
    "Nothing new", Failed "Partial", Failed. Every run publishes Prefect artifacts (a summary and a table)
    and an HTML report beside its log in the store (STORE/logs/RUN.report.html).

    The alternative without a serving process: a work pool and a worker, with infra/prefect.yaml
    (prefect deploy --prefect-file infra/prefect.yaml; prefect worker start --pool proteoflow).
""")
EPILOG = textwrap.dedent("""\
    examples:
      prefect server start &                     # or a server backed by Postgres, see README
      export PREFECT_API_URL=http://127.0.0.1:4200/api
      proteoflow serve --store /data/store --incoming /data/incoming --kind fold --name nightly \\
                       --cron "0 2 * * *" --max-length 1000 --notify https://hooks.example.org/proteoflow
      prefect deployment run 'proteoflow-scheduled-fold/nightly'      # a run now, besides the schedule
      proteoflow runs --store /data/store
      proteoflow report RUN_ID --store /data/store --out report.html
""")
# Options of embed/fold that serve does not take (or defines itself).
NOT_COPIED = {
    "help",
    "inputs",
    "store",
    "run_id",
    "min_length",
    "max_length",
    "model",
    "no_progress",
    "verbose",
}
POOL_GROUP = "workers (Ray)"


def _deployment_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    return text


def _compute_parsers() -> dict[str, argparse.ArgumentParser]:
    """embed's and fold's own parsers, built on a scratch parser."""
    scratch = argparse.ArgumentParser(add_help=False)
    sub = scratch.add_subparsers()
    cli_compute.add_parsers(sub)
    return {kind: sub.choices[kind] for kind in KINDS}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``serve``."""
    p = sub.add_parser(
        "serve",
        help="embed or fold an incoming folder on a schedule (a served Prefect deployment)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    store_arg(p)
    p.add_argument(
        "--incoming", required=True, metavar="DIR", help="folder whose FASTA files each run ingests"
    )
    p.add_argument("--kind", required=True, choices=KINDS, help="what each run computes: fold or embed")
    p.add_argument(
        "--name", required=True, type=_deployment_name, metavar="NAME", help="deployment name (e.g. nightly)"
    )
    p.add_argument("--model", metavar="M", help="as for embed/fold (default: that command's default model)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help='cron schedule, e.g. "0 2 * * *" (02:00 every day)')
    when.add_argument("--interval", type=positive_int, metavar="SECONDS", help="a run every SECONDS seconds")
    p.add_argument("--timezone", default="UTC", metavar="TZ", help="time zone of the schedule (default UTC)")
    p.add_argument("--min-length", type=positive_int, metavar="N", help="reject sequences shorter than N")
    p.add_argument("--max-length", type=positive_int, metavar="N", help="reject sequences longer than N")
    p.add_argument(
        "--notify",
        metavar="URL",
        help="POST a JSON summary (run id, status, counts, report path) here when a run fails or ends partial",
    )
    pool = p.add_argument_group(POOL_GROUP)
    engines = {kind: p.add_argument_group(f"{kind} options (--kind {kind})") for kind in KINDS}
    shared = p.add_argument_group("engine options of both kinds")
    parsers = _compute_parsers()
    both = set.intersection(*_engine_dests(parsers).values())
    seen = {a.dest for a in p._actions}
    for kind, parser in parsers.items():
        for group in parser._action_groups:
            for action in group._group_actions:
                if action.dest in NOT_COPIED or action.dest in seen:
                    continue
                seen.add(action.dest)
                target = (
                    pool if group.title == POOL_GROUP else shared if action.dest in both else engines[kind]
                )
                if action.dest in both:
                    action.help = "; ".join(f"{k}: {_option(parsers[k], action.dest).help}" for k in KINDS)
                target._add_action(action)  # the very option embed/fold define: one definition
    p.set_defaults(handler=cmd_serve)


def _engine_dests(parsers: dict[str, argparse.ArgumentParser]) -> dict[str, set[str]]:
    """The engine options of each kind (those that are not pool options)."""
    return {
        kind: {
            a.dest
            for g in parser._action_groups
            if g.title != POOL_GROUP
            for a in g._group_actions
            if a.dest not in NOT_COPIED
        }
        for kind, parser in parsers.items()
    }


def _option(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def check_kind_options(args: argparse.Namespace, parsers: dict[str, argparse.ArgumentParser]) -> None:
    """An engine option of the other kind (``--layers`` with ``--kind fold``) is an error, not ignored."""
    dests = _engine_dests(parsers)
    defaults = {a.dest: a.default for p in parsers.values() for a in p._actions}
    other = next(k for k in KINDS if k != args.kind)
    for dest in sorted(dests[other] - dests[args.kind]):
        if getattr(args, dest, None) != defaults.get(dest):
            option = "--" + dest.replace("_", "-")
            raise CliError(f"{option} is an option of --kind {other}, not --kind {args.kind}")


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.launch import preflight
    from flows.serve import require_server, serve_scheduled

    parsers = _compute_parsers()
    check_kind_options(args, parsers)
    if not os.path.isdir(args.incoming):
        raise CliError(f"--incoming {args.incoming} is not a directory")
    if args.model is None:
        args.model = parsers[args.kind].get_default("model")
    args.inputs, args.run_id, args.no_progress = [args.incoming], None, True
    job = cli_compute.build_job(args)  # the options' own checks, as embed/fold make them
    require_server()
    preflight(job.kind, job.model, job.options)  # a missing model or layer fails here, not at 2 am
    serve_scheduled(job, args.incoming, args.name, args.cron, args.interval, args.timezone, args.notify)
    return 0
