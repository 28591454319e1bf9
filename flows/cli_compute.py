"""CLI subcommands that compute: ``embed``, ``fold``, plus ``models`` and ``export-structures``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import asdict
from typing import TextIO

from flows.cli_args import engine_budget_args, positive_int, require_store, run_id_arg, store_arg
from flows.errors import CliError

COMMON_EPILOG = textwrap.dedent("""\
    Runs as a Prefect flow (Prefect's temporary local API unless PREFECT_API_URL is set) over a pool of Ray
    actors (a local Ray started for the run unless --ray-address names a cluster). Each shard's output is
    committed atomically: rerun the same command after an interruption and only missing shards are computed.
    Sequences already computed by this model (same weights checksum) are never computed again.
""")


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _pool_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workers (Ray)")
    g.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="actors, each holding one copy of the model (default: one per GPU, else 1)",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        metavar="C",
        help="CPUs reserved per actor (default: all CPUs / workers on a CPU-only cluster, else 1)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="F",
        help="GPUs per actor, fractions allowed (0.5 = two actors per GPU; default 1 where GPUs exist)",
    )
    g.add_argument(
        "--max-attempts",
        type=positive_int,
        default=3,
        metavar="N",
        help="tries per shard when a worker dies before the shard is marked failed (default 3)",
    )
    g.add_argument(
        "--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. ray://head:10001 or auto)"
    )
    g.add_argument(
        "--ship-code",
        action="store_true",
        help="send proteoflow's packages to the cluster's workers (runtime_env py_modules)",
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no live progress bar (the summary is still printed)"
    )
    g.add_argument(
        "--verbose",
        action="store_true",
        help="show Prefect's, Ray's and the workers' messages too (they are always kept in STORE/logs/RUN.log)",
    )


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="FASTA file (.gz ok), directory, s3:// object or prefix, or '-'",
    )
    store_arg(p)
    p.add_argument(
        "--run-id",
        type=run_id_arg,
        metavar="ID",
        help="name of this run (default: derived from inputs, model, options)",
    )
    p.add_argument("--min-length", type=positive_int, metavar="N", help="reject sequences shorter than N")
    p.add_argument(
        "--max-length",
        type=positive_int,
        metavar="N",
        help="reject (as a `rejected` row with its reason) sequences longer than N",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register embed, fold, models and export-structures."""
    e = sub.add_parser(
        "embed",
        help="ESM-2 (or ESM C) embeddings for every new sequence of the inputs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ingest the inputs, then compute ESM-2 (ESM-1b, ESM-1v or ESM C) embeddings for the "
        "sequences this model lacks.\n\n" + COMMON_EPILOG,
        epilog=textwrap.dedent("""\
            examples:
              proteoflow embed proteome.fasta.gz --store ./store --model esm2_t33_650M_UR50D
              proteoflow embed proteome.fasta.gz --store ./store --model esmc_300m
              proteoflow embed mags/ --store ./store --model ./esm2_t6_8M_UR50D.pt --layers 6,-1 --pooling mean,bos
              proteoflow sql --store ./store "SELECT seq_hash, array_cosine_similarity(embedding, ...) ..."
        """),
    )
    _input_args(e)
    e.add_argument(
        "--model",
        default="esm2_t33_650M_UR50D",
        metavar="M",
        help="known name (see `proteoflow models`), hub id, local HF directory or fair-esm .pt "
        "(default esm2_t33_650M_UR50D)",
    )
    e.add_argument(
        "--layers",
        type=_csv_ints,
        default=[-1],
        metavar="L,...",
        help="layers to pool, fair-esm style (0 = embeddings, -1 = last; default -1)",
    )
    e.add_argument(
        "--pooling", type=_csv, default=["mean"], metavar="P,...", help="mean and/or bos (default mean)"
    )
    e.add_argument(
        "--per-residue", action="store_true", help="also store per-residue vectors (residue_embeddings)"
    )
    e.add_argument(
        "--contacts", action="store_true", help="also store contact maps from the model's contact head"
    )
    e.add_argument(
        "--long-strategy",
        choices=("window", "truncate"),
        default="window",
        help="sequences over the model's 1,022 residues: overlapping windows (default) or truncate",
    )
    engine_budget_args(e)
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored vector type")
    _pool_args(e)
    e.set_defaults(handler=cmd_compute, kind="embed")

    f = sub.add_parser(
        "fold",
        help="ESMFold structures for every new sequence of the inputs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ingest the inputs, then predict ESMFold structures for the sequences this model lacks.\n"
        "Complexes: chains separated by ':' in one record.\n\n" + COMMON_EPILOG,
        epilog=textwrap.dedent("""\
            examples:
              proteoflow fold new_contigs.faa --store ./store --max-length 1000
              proteoflow sql --store ./store "SELECT m.seq_id, s.mean_plddt, s.ptm FROM structures s
                                              JOIN members m USING (seq_hash) WHERE s.ptm > 0.7"
              proteoflow export-structures --store ./store --out pdbs/ --min-plddt 70
        """),
    )
    _input_args(f)
    f.add_argument(
        "--model",
        default="facebook/esmfold_v1",
        metavar="M",
        help="hub id or local HF directory of EsmForProteinFolding (default facebook/esmfold_v1)",
    )
    f.add_argument("--num-recycles", type=int, metavar="N", help="trunk recycles (default: the model's, 4)")
    f.add_argument(
        "--chunk-size",
        default="auto",
        metavar="N|auto|none",
        help="axial-attention chunk size: auto (smaller for longer chains), a number, or none",
    )
    f.add_argument(
        "--max-tokens", type=positive_int, metavar="N", help="residues per batch, padding included"
    )
    f.add_argument("--pae", action="store_true", help="also store the predicted aligned error matrix")
    _pool_args(f)
    f.set_defaults(handler=cmd_compute, kind="fold")

    m = sub.add_parser(
        "models",
        help="list the ESM models known by name (ESM-2, ESM-1b, ESM-1v, ESM C)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            The ESM-2, ESM-1b, ESM-1v and ESM C checkpoints proteoflow knows by short name: hub id,
            parameters, layers and embedding width. Any of these names (or its hub id) works as --model; so
            does a local Hugging Face directory or a fair-esm .pt file (`score-variants --model esm1v` runs
            the five ESM-1v checkpoints). Weights come from the local Hugging Face cache (or
            the hub when reachable); a checkpoint's weights checksum is recorded with every result.
        """),
        epilog="examples:\n  proteoflow models\n  proteoflow models --format csv > models.csv",
    )
    m.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format (default table)"
    )
    m.set_defaults(handler=cmd_models)

    x = sub.add_parser(
        "export-structures",
        help="write predicted structures as PDB or mmCIF files",
        description="Write one file per member record whose structure passes the filters; names come from the "
        "record ids, made file-system safe and unique.",
    )
    store_arg(x)
    x.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created)")
    x.add_argument(
        "--min-plddt", type=float, metavar="X", help="only structures with mean pLDDT >= X (0-100)"
    )
    x.add_argument(
        "--format", choices=("pdb", "cif"), default="pdb", help="file format: pdb (default) or cif (mmCIF)"
    )
    x.add_argument("--json", action="store_true", help="print the summary as JSON")
    x.add_argument("--run-id", metavar="ID", help="only records of this ingest or fold run")
    x.add_argument("--model", metavar="M", help="only structures of this model name")
    x.set_defaults(handler=cmd_export)


def _chunk_size(text: str) -> int | str | None:
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise CliError(f"--chunk-size takes a positive number, auto or none, not {text!r}") from None
    if value < 1:
        raise CliError(f"--chunk-size takes a positive number, auto or none, not {text!r}")
    return value


POOLINGS = ("mean", "bos")


def check_options(args: argparse.Namespace) -> None:
    """Option errors a user can make, reported before anything starts (one line each)."""
    if args.min_length and args.max_length and args.min_length > args.max_length:
        raise CliError(f"--min-length {args.min_length} is greater than --max-length {args.max_length}")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise CliError(f"--cpus-per-worker must be positive, got {args.cpus_per_worker:g}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise CliError(f"--gpus-per-worker must be 0 or more, got {args.gpus_per_worker:g}")
    if args.kind == "embed":
        unknown = [p for p in args.pooling if p not in POOLINGS]
        if unknown or not args.pooling:
            raise CliError(
                f"--pooling takes {' and/or '.join(POOLINGS)}, not {','.join(unknown) or 'nothing'}"
            )
        if not args.layers:
            raise CliError("--layers needs at least one layer (e.g. -1 for the last)")
    elif args.kind == "fold" and args.num_recycles is not None and args.num_recycles < 0:
        raise CliError(f"--num-recycles must be 0 or more, got {args.num_recycles}")


def build_job(args: argparse.Namespace, model: str | None = None):
    """Translate parsed arguments into the flow's plain-data Job (for ``model`` instead of ``--model``: one
    member of an ensemble). ``score-variants`` and ``predict`` read the checkpoint's head here, so a
    checkpoint that cannot serve them is refused before anything starts."""
    from flows.engines import EmbedOptions, FoldOptions, PredictOptions, VariantOptions
    from flows.family import head_kind, require_masked_lm
    from flows.job import Job, PoolOptions

    check_options(args)
    model = model or args.model
    options: EmbedOptions | FoldOptions | VariantOptions | PredictOptions
    if args.kind == "embed":
        options = EmbedOptions(
            layers=tuple(args.layers),
            poolings=tuple(dict.fromkeys(args.pooling)),
            per_residue=args.per_residue,
            contacts=args.contacts,
            long_strategy=args.long_strategy,
            precision=args.precision,
            max_tokens=args.max_tokens,
            dtype=args.dtype,
        )
    elif args.kind == "fold":
        options = FoldOptions(
            num_recycles=args.num_recycles,
            chunk_size=_chunk_size(args.chunk_size),
            max_tokens=args.max_tokens,
            pae=args.pae,
        )
    elif args.kind == "score-variants":
        require_masked_lm(model)
        options = VariantOptions(
            method=args.method, offset=args.offset, precision=args.precision, max_tokens=args.max_tokens
        )
    else:
        options = PredictOptions(
            head=head_kind(model),
            long_strategy=args.long_strategy,
            precision=args.precision,
            max_tokens=args.max_tokens,
        )
    pool = PoolOptions(
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        max_attempts=args.max_attempts,
    )
    return Job(
        kind=args.kind,
        store=require_store(args),
        inputs=args.inputs,
        model=model,
        engine_options=options,
        pool=pool,
        min_length=args.min_length,
        max_length=args.max_length,
        run_id=args.run_id,
        ray_address=args.ray_address,
        ship_code=args.ship_code,
        progress=not args.no_progress,
    )


def print_run_summary(record, out: TextIO | None = None, nothing_to_do: bool = False) -> None:
    """What a compute run did, where its outputs are, and how fast it went."""
    out = out or sys.stdout  # resolved per call: a default bound at import outlives a redirected stream
    c = record.counts
    ident = record.params.get("identity", {})
    weights = f"weights {ident.get('sha')}" + (
        ", RANDOM WEIGHTS: results mean nothing" if ident.get("random_weights") else ""
    )
    if nothing_to_do:
        lines = [
            f"run            {record.run_id} ({record.status}): nothing to compute",
            f"model          {ident.get('model')} ({weights})",
            "sequences      every sequence of the input already has its results for these weights",
            f"outputs        {c.outputs}",
        ]
        out.write("\n".join(lines) + "\n")
        return
    lines = [
        f"run            {record.run_id} ({record.status})",
        f"model          {ident.get('model')} ({weights})",
        f"sequences      {c.sequences:,} planned, {c.residues:,} residues",
        f"shards         {c.shards} total: {c.shards_computed} computed now, "
        f"{c.shards_done_before} done by earlier attempts, {c.shards_failed} failed",
        f"throughput     {c.residues_per_s:,.0f} residues/s ({c.computed_residues:,} residues computed "
        f"in {c.compute_seconds:,.1f} s)",
        f"retries        {c.retries} shard retries, {c.replaced_workers} workers replaced, "
        f"{c.isolated_errors} sequences isolated as rejected, {c.fallbacks} OOM fallbacks",
        f"outputs        {c.outputs}",
    ]
    if record.message:
        lines.append(f"message        {record.message}")
    out.write("\n".join(lines) + "\n")


def cmd_compute(args: argparse.Namespace) -> int:
    from flows import runlog

    log = runlog.configure(args.verbose)
    job = build_job(args)
    from ray.exceptions import RayError

    from flows.job import RunFailed
    from flows.launch import launch
    from flows.pool import WorkerStartError, first_line

    def report(launched) -> None:
        print_run_summary(launched.record, nothing_to_do=launched.nothing_to_do)
        sys.stdout.flush()

    try:
        launch(job, log, report, verbose=args.verbose)
    except WorkerStartError as exc:
        raise CliError(str(exc)) from None
    except RayError as exc:
        # the cluster failed under the run (a lost node, a dead GCS): Ray's reason, in one line
        raise CliError(f"Ray: {first_line(exc)}") from None
    except RunFailed as exc:
        if exc.record is not None:
            print_run_summary(exc.record)
        status = exc.record.status if exc.record is not None else "failed"
        sys.stderr.write(f"proteoflow {job.kind}: run ended {status}: {exc}\n")
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from esm_core.registry import model_table
    from flows.output import write_result

    rows = model_table(include_esmc=True)
    columns = list(rows[0])
    write_result(columns, [tuple(r[c] for c in columns) for r in rows], args.format)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flows.export import export_structures

    done = export_structures(
        require_store(args),
        args.out,
        fmt=args.format,
        min_plddt=args.min_plddt,
        run_id=args.run_id,
        model=args.model,
    )
    if args.json:
        print(json.dumps(asdict(done)))
    elif done.written:
        print(f"wrote {done.written:,} {done.fmt.upper()} file(s) to {done.out}")
    else:
        print(f"no structure matched the filters; nothing written to {done.out}")
    return 0
