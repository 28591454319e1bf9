"""``proteoflow submit embed|fold``: the same run as ``proteoflow embed|fold``, sent to a Ray cluster as a Ray job
through its Jobs API. Every embed/fold option is accepted and checked here as those commands check it
(their own parser's options, copied); the logic lives in flows.submit."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from flows import submit
from flows.cli_args import require_store

DESCRIPTION = textwrap.dedent("""\
    Submit `proteoflow {kind}` to a Ray cluster as a Ray job (Ray's Jobs API at --address). The job's driver
    runs on the head node as `python -m flows.cli {kind} ... --ray-address auto` and its actors on the
    cluster's workers; its runtime environment carries this checkout's code (esm_core, storage, flows as
    py_modules), or installs a pinned proteoflow (--pip), or uses the one installed on the cluster
    (--installed). Options are checked here, before anything is sent.

    The inputs, the store and a model path are read and written by the job on the cluster's nodes: either
    object storage (s3://bucket/prefix, gs://...; the job uses the cluster's credentials: the nodes'
    environment or --env AWS_ACCESS_KEY_ID=...), or absolute paths on a file system every node mounts at the
    same path (NFS, a Kubernetes PVC), which must exist here too. PREFECT_API_URL, when set here, is passed
    to the job.
""")

EPILOG = textwrap.dedent("""\
    examples:
      proteoflow submit {kind} s3://bucket/inputs/ --store s3://bucket/store --address http://head:8265
      proteoflow submit {kind} /shared/proteome.fasta.gz --store /shared/store --address http://head:8265
      proteoflow submit {kind} /shared/in.faa --store /shared/store --address http://head:8265 \\
          --pip proteoflow==0.1.0 --env HF_HOME=/shared/hf --wait
      ray job logs -f JOB_ID --address http://head:8265
""")


def _submit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (Ray Jobs API)")
    g.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        metavar="URL",
        help="the Ray dashboard of the cluster, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)",
    )
    code = g.add_mutually_exclusive_group()
    code.add_argument(
        "--pip",
        action="append",
        metavar="SPEC",
        help="install this in the job's environment instead of shipping this checkout's code "
        "(e.g. proteoflow==0.1.0 or a wheel's URL; repeatable)",
    )
    code.add_argument(
        "--installed",
        action="store_true",
        help="use the proteoflow installed on the cluster (the infra/Dockerfile image); ship nothing",
    )
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set this variable in the job's environment (repeatable; e.g. HF_HOME=/shared/hf)",
    )
    g.add_argument(
        "--wait", action="store_true", help="print the job's logs until it ends, and exit with its status"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``submit`` with its ``embed`` and ``fold`` subcommands."""
    p = sub.add_parser(
        "submit",
        help="run embed or fold on a Ray cluster as a Ray job (Jobs API)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit `proteoflow embed` or `proteoflow fold` to a Ray cluster as a Ray job.\n"
        "See `proteoflow submit embed --help`.",
    )
    kinds = p.add_subparsers(dest="submit_kind", metavar="KIND", required=True, help="embed or fold")
    for kind, parser in submit.compute_parsers().items():
        k = kinds.add_parser(
            kind,
            parents=[parser],
            conflict_handler="resolve",  # the parent's -h/--help
            help=f"submit `proteoflow {kind}` as a Ray job",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=DESCRIPTION.format(kind=kind),
            epilog=EPILOG.format(kind=kind),
        )
        for action in k._actions:
            if action.dest in submit.JOB_SETS:
                action.help = argparse.SUPPRESS  # set by the job itself
            elif action.dest == "inputs":
                action.help = ("FASTA object or prefix on object storage (s3://...), or an absolute path of a FASTA "
                               "file (.gz ok) or directory on the shared file system")  # fmt: skip
        _submit_args(k)
        k.set_defaults(handler=cmd_submit, kind=kind)


def cmd_submit(args: argparse.Namespace) -> int:
    """Check, submit, print the job id and how to follow it; with --wait, follow it to its end."""
    require_store(args)
    submit.check_shared_paths(args)
    submit.check_options(args)
    parser = submit.compute_parsers()[args.kind]
    argv = submit.job_argv(args, parser)
    submit.check_round_trip(argv, args, parser)
    env = submit.runtime_env(args.pip, args.installed, submit.env_vars(args.env))
    address = submit.dashboard_address(args.address)
    sys.stderr.write(submit.shared_note(args) + "\n")
    jobs = submit.client(address)
    job_id = submit.submit(jobs, argv, env, {"proteoflow": args.kind, "store": args.store})
    print(f"submitted {job_id}: proteoflow {args.kind} on {address}, store {args.store}")
    print(submit.how_to_follow(job_id, address), end="")
    sys.stdout.flush()
    if not args.wait:
        return 0
    try:
        status, code = submit.follow(jobs, job_id)
    except KeyboardInterrupt:
        sys.stderr.write(f"proteoflow submit: stopped following; job {job_id} goes on "
                         f"(ray job stop {job_id} --address {address})\n")  # fmt: skip
        return 130
    sys.stderr.write(f"proteoflow submit: job {job_id} ended {status}\n")
    return code
