"""CLI subcommands for the rest of the ESM family: ``score-variants`` (variant-effect scores from a masked
language model, the ESM-1v ensemble included) and ``predict`` (classification heads). Both are compute kinds
of the same flow as ``embed``: same planner, actor pool, resume and fault handling."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from flows.cli_args import engine_budget_args
from flows.cli_compute import (
    COMMON_EPILOG,
    _input_args,
    _pool_args,
    build_job,
    cmd_compute,
    print_run_summary,
)
from flows.errors import CliError

# esm_core.variants.METHODS and esm_core.heads.LONG_STRATEGIES, spelled here so that building the parser
# imports no torch (tests/test_family_pipeline.py checks they agree).
METHODS = ("masked-marginals", "wt-marginals")
LONG_STRATEGIES = ("window", "truncate")


def _engine_args(p: argparse.ArgumentParser) -> None:
    engine_budget_args(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register score-variants and predict."""
    v = sub.add_parser(
        "score-variants",
        help="variant-effect scores (saturation mutagenesis) from ESM-1v / ESM-2 / ESM C",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Ingest the inputs, then score every substitution of every residue (20 per residue) of the
            sequences this model has not scored by this method: log p(mt) - log p(wt), masked marginals
            (one forward pass per residue, the accurate one) or wild-type marginals (one pass per sequence).
            Rows go to the variant_scores table.

            --variants CSV scores a list of mutants instead: the saturation tables of the sequences the CSV
            names are computed (only those), then each row is scored from them, a multi-mutant as the sum of
            its sites, into mutant_scores; a row that cannot be scored (wild type that does not match,
            position outside the sequence, unknown id) becomes a rejected row of that run, rule
            invalid_mutant, with the reason. CSV header: seq_id (or id) and mutant (e.g. A25G or A25G:C30T).

            --model esm1v runs the five ESM-1v checkpoints (a comma list, the checkpoints it names) one after
            another, each a run of its own; with --variants, mutant_scores holds their mean (score) and each
            member's score (member_scores, in the order of members). The saturation means are a GROUP BY over
            variant_scores (see the README).

        """)
        + COMMON_EPILOG,
        epilog=textwrap.dedent("""\
            examples:
              proteoflow score-variants bla.fasta --store ./store --model esm1v --variants dms.csv
              proteoflow score-variants proteome.faa --store ./store --model esm2_t33_650M_UR50D --max-length 400
              proteoflow sql --store ./store "SELECT position, wt, mt, score FROM variant_scores
                  WHERE seq_hash = (SELECT seq_hash FROM members WHERE seq_id = 'sp|P62593|BLAT_ECOLX' LIMIT 1)
                  ORDER BY score LIMIT 10"
        """),
    )
    _input_args(v)
    v.add_argument(
        "--model",
        default="esm2_t33_650M_UR50D",
        metavar="M",
        help="masked-LM checkpoint: known name, hub id, HF directory or fair-esm .pt; esm1v for the five "
        "ESM-1v checkpoints, or a comma list (default esm2_t33_650M_UR50D)",
    )
    v.add_argument(
        "--method",
        choices=METHODS,
        default=METHODS[0],
        help="masked-marginals (one pass per residue; default) or wt-marginals (one pass per sequence)",
    )
    v.add_argument(
        "--variants",
        metavar="CSV",
        help="score these mutants (columns seq_id and mutant) instead of whole proteomes; see above",
    )
    v.add_argument(
        "--offset",
        type=int,
        default=1,
        metavar="N",
        help="number of the first residue, in stored positions and in the CSV's mutants (default 1)",
    )
    _engine_args(v)
    _pool_args(v)
    v.set_defaults(handler=cmd_score_variants, kind="score-variants")

    p = sub.add_parser(
        "predict",
        help="classification-head predictions (EsmForSequenceClassification / EsmForTokenClassification)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Ingest the inputs, then run a fine-tuned classification checkpoint over the sequences it has not
            predicted yet. A sequence head (EsmForSequenceClassification, EsmcForSequenceClassification)
            writes one predictions row per sequence and label: the label's probability (softmax, sigmoid for
            a multi-label head; a regression head's value). A token head (EsmForTokenClassification, ...)
            writes one residue_predictions row per residue: its most probable label and that probability.
            Any other checkpoint is refused before anything starts.

        """)
        + COMMON_EPILOG,
        epilog=textwrap.dedent("""\
            examples:
              proteoflow predict proteome.faa --store ./store --model ./my-localization-classifier
              proteoflow sql --store ./store "SELECT m.seq_id, p.label, p.probability FROM predictions p
                  JOIN members m USING (seq_hash) WHERE p.label = 'membrane' AND p.probability > 0.9"
        """),
    )
    _input_args(p)
    p.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="Hugging Face directory or hub id of a sequence- or token-classification checkpoint",
    )
    p.add_argument(
        "--long-strategy",
        choices=LONG_STRATEGIES,
        default=LONG_STRATEGIES[0],
        help="proteins over the model's window: overlapping windows, outputs averaged (default), or truncate",
    )
    _engine_args(p)
    _pool_args(p)
    p.set_defaults(handler=cmd_compute, kind="predict")


def cmd_score_variants(args: argparse.Namespace) -> int:
    """One run per checkpoint of ``--model``, one after another; with ``--variants``, the CSV scored after."""
    from flows import runlog
    from flows.family import ensemble_members

    log = runlog.configure(args.verbose)
    members = ensemble_members(args.model)
    if len(members) > 1 and args.run_id:
        raise CliError(
            f"--run-id names one run; --model {args.model} runs {len(members)} (one per checkpoint)"
        )
    jobs = [build_job(args, member) for member in members]
    from flows import variants
    from flows.job import RunFailed
    from flows.launch import launch
    from flows.pool import WorkerStartError

    request = variants.read_variants_csv(args.variants) if args.variants else None

    def run(job):
        if len(jobs) > 1:
            sys.stderr.write(
                f"score-variants: checkpoint {jobs.index(job) + 1} of {len(jobs)}: {job.model}\n"
            )
        configured = os.environ.get("PREFECT_API_URL")
        try:
            return launch(job, log, report, verbose=args.verbose).record
        finally:
            _forget_temporary_api(configured)

    def report(launched) -> None:
        print_run_summary(launched.record, nothing_to_do=launched.nothing_to_do)
        sys.stdout.flush()

    try:
        if request is None:
            for job in jobs:
                run(job)
            return 0
        done = variants.score_variants(jobs, request, args.model, run)
    except WorkerStartError as exc:
        raise CliError(str(exc)) from None
    except RunFailed as exc:
        if exc.record is not None:
            print_run_summary(exc.record)
        status = exc.record.status if exc.record is not None else "failed"
        sys.stderr.write(f"proteoflow score-variants: run ended {status}: {exc}\n")
        return 1
    print_mutant_summary(done)
    return 0


def _forget_temporary_api(configured: str | None) -> None:
    """Leave this process as it was before a launch, so that the next launch starts its own temporary
    Prefect API: the launch left that API's URL (stopped now) in the environment, and Prefect's events worker,
    one per process, keeps the client it made for it."""
    if configured is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = configured
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=5)


def print_mutant_summary(done, out=sys.stdout) -> None:
    """What the scoring of a variants CSV wrote, and where."""
    random = ", RANDOM WEIGHTS: scores mean nothing" if done.model.random_weights else ""
    lines = [
        f"run            {done.run_id} (completed)",
        f"model          {done.model.name} (weights {done.model.sha}{random})",
        f"mutants        {done.scored:,} scored over {done.sequences:,} sequence(s), {done.rejected:,} rejected "
        f"(rejected WHERE run_id = '{done.run_id}')",
        f"outputs        {done.path}",
    ]
    out.write("\n".join(lines) + "\n")
