"""CLI subcommands over stored embeddings: ``search``, ``index`` and ``neighbors``. They start neither Ray nor
Prefect; torch is imported only when a query sequence must be embedded."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable

from flows.cli_args import positive_int, require_store, store_arg
from flows.errors import CliError


def _cosine(text: str) -> float:
    """An argparse type: a cosine similarity in [-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine lies in [-1, 1], got {text}")
    return value


def _vector_args(p: argparse.ArgumentParser) -> None:
    store_arg(p)
    p.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="model as stored (the `model` column) or its checkpoint (path, hub id, known name)",
    )
    p.add_argument(
        "--model-sha",
        metavar="SHA",
        help="weights checksum (or a unique prefix) when several weights share the model name",
    )
    p.add_argument(
        "--layer", type=int, metavar="L", help="layer as stored, 0..N (needed when several are stored)"
    )
    p.add_argument("--pooling", metavar="P", help="mean or bos (needed when several are stored)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register search, index and neighbors."""
    s = sub.add_parser(
        "search",
        help="nearest stored sequences by embedding cosine similarity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Find the stored sequences whose pooled embeddings are most cosine-similar to each query: one row
            per (query, distinct neighbour sequence) with its member record ids. Queries are stored record
            ids, FASTA records or a sequence; a query sequence not in the store is embedded here, in-process,
            with the same weights (its checksum must equal the stored model_sha). Uses the index built by
            `proteoflow index` when there is one, plus an exact scan of vectors added since; --exact scans
            everything.
        """),
        epilog=textwrap.dedent("""\
            examples:
              proteoflow search --store ./store --model esm2_t33_650M_UR50D --id 'sp|P0A7V8|RS4_ECOLI'
              proteoflow search --store ./store --model ./esm2_t6.pt --fasta new.faa --k 5 --min-cosine 0.9
              proteoflow search --store ./store --model esm2_t6_8M_UR50D --sequence MKTAYIAKQR --format json
        """),
    )
    _vector_args(s)
    queries = s.add_mutually_exclusive_group(required=True)
    queries.add_argument("--id", nargs="+", metavar="SEQ_ID", help="record ids of the store (members.seq_id)")
    queries.add_argument("--fasta", metavar="FILE", help="query records from a FASTA file (.gz ok)")
    queries.add_argument("--sequence", metavar="SEQ", help="one query sequence")
    s.add_argument(
        "--k", type=positive_int, default=10, metavar="N", help="neighbours per query (default 10)"
    )
    s.add_argument("--min-cosine", type=_cosine, metavar="X", help="only neighbours with cosine >= X")
    s.add_argument("--exact", action="store_true", help="exact scan of every vector, even with an index")
    s.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format (default table)"
    )
    s.set_defaults(handler=cmd_search)

    x = sub.add_parser(
        "index",
        help="build an approximate nearest-neighbour index (FAISS) of stored embeddings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Build a FAISS index of one model's vectors (one layer and pooling), stored in the store under
            indexes/<model>-<sha>/ and written atomically; a rebuild replaces it. auto = exact flat index
            below 50,000 vectors, IVF above; hnsw on request. IVF nprobe and HNSW efSearch are calibrated to
            recall@10 >= 0.97 against the exact answer on the store's own vectors. Vectors embedded after the
            build are still found: search scans them exactly.
        """),
        epilog="example:\n  proteoflow index --store ./store --model esm2_t33_650M_UR50D --layer 33 --pooling mean",
    )
    _vector_args(x)
    x.add_argument(
        "--kind",
        choices=("auto", "flat", "hnsw", "ivf"),
        default="auto",
        help="auto (default): exact flat index below 50,000 vectors, IVF above; hnsw on request",
    )
    x.set_defaults(handler=cmd_index)

    n = sub.add_parser(
        "neighbors",
        help="every sequence's k nearest neighbours as a table (and clusters)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Write every stored sequence's k nearest other sequences as rows of the `neighbors` table
            (seq_hash, neighbor_hash, rank, cosine, ...). Incremental: a rerun computes only sequences without
            rows for the same weights, layer, pooling, --k and --min-cosine. --clusters COSINE also writes the
            `clusters` table: connected components of that neighbour graph over edges with cosine >= COSINE.
            Uses the model's index when there is one (build it first on large stores).
        """),
        epilog="example:\n  proteoflow neighbors --store ./store --model esm2_t33_650M_UR50D --k 10 --clusters 0.95",
    )
    _vector_args(n)
    n.add_argument(
        "--k", type=positive_int, default=10, metavar="N", help="neighbours per sequence (default 10)"
    )
    n.add_argument("--min-cosine", type=_cosine, metavar="X", help="only neighbours with cosine >= X")
    n.add_argument("--exact", action="store_true", help="exact scans even when an index exists")
    n.add_argument(
        "--clusters", type=_cosine, metavar="COSINE", help="also write connected components >= COSINE"
    )
    n.add_argument("--json", action="store_true", help="print the summary as JSON")
    n.set_defaults(handler=cmd_neighbors)


def _vector_set(args: argparse.Namespace):
    from flows.search import resolve_set

    return resolve_set(require_store(args), args.model, args.model_sha, args.layer, args.pooling)


def _user_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Storage's VectorError is a user mistake here: a one-line CliError."""

    def run(args: argparse.Namespace) -> int:
        from storage.vectors import VectorError

        try:
            return handler(args)
        except VectorError as exc:
            raise CliError(str(exc)) from None

    run.__doc__ = handler.__doc__
    return run


@_user_errors
def cmd_search(args: argparse.Namespace) -> int:
    """Print the neighbours of each query."""
    from flows import search
    from flows.output import write_result

    vs = _vector_set(args)
    if args.id:
        queries = search.queries_from_ids(require_store(args), args.id)
    elif args.fasta:
        queries = search.queries_from_fasta(args.fasta)
    else:
        queries = [search.query_from_sequence(args.sequence)]
    rows = search.search(vs, queries, args.model, args.k, args.min_cosine, args.exact)
    write_result(search.SEARCH_COLUMNS, rows, args.format, out=sys.stdout)
    return 0


@_user_errors
def cmd_index(args: argparse.Namespace) -> int:
    """Build the index and print what it holds."""
    from storage.vectors import build_index, index_dir

    vs = _vector_set(args)
    info = build_index(vs, args.kind)
    path = (index_dir(vs) / info.index_file).relative_to(vs.root)
    print(
        json.dumps(
            {
                "model": vs.model,
                "model_sha": vs.model_sha,
                "layer": vs.layer,
                "pooling": vs.pooling,
                "kind": info.kind,
                "vectors": info.count,
                "dim": info.dim,
                "params": info.params,
                "recall_at_10": info.recall,
                "seconds": info.seconds,
                "phases": info.phases,
                "file": str(path),
            }
        )
    )
    return 0


@_user_errors
def cmd_neighbors(args: argparse.Namespace) -> int:
    """Compute missing neighbour rows (and clusters) and print a summary."""
    from flows.progress import ProgressBar
    from storage.neighbors import compute_neighbors, write_clusters

    vs = _vector_set(args)
    bar = ProgressBar("neighbors", unit="sequences")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    run = compute_neighbors(vs, args.k, args.min_cosine, exact=args.exact, progress=progress)
    bar.finish()
    if args.clusters is not None:
        run.clusters = write_clusters(vs, args.k, args.clusters, args.min_cosine)
    summary = {
        "run_id": run.run_id if run.computed else None,
        "model": vs.model,
        "model_sha": vs.model_sha,
        "layer": vs.layer,
        "pooling": vs.pooling,
        "k": args.k,
        "computed": run.computed,
        "done_before": run.done_before,
        "rows": run.rows,
        "seconds": run.seconds,
        "clusters": run.clusters,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        lines = [
            f"{vs.label}: {run.computed:,} sequences computed now ({run.rows:,} rows), "
            f"{run.done_before:,} already done for k={args.k}"
        ]
        if run.clusters:
            c = run.clusters
            lines.append(
                f"clusters at cosine >= {args.clusters:g}: {c['clusters']:,} over {c['sequences']:,} sequences "
                f"(largest {c['largest']:,}, {c['singletons']:,} singletons) in {c['path']}"
            )
        sys.stdout.write("\n".join(lines) + "\n")
    return 0
