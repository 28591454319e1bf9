"""End-to-end pipeline wall time on the E. coli proteome beside the embedding engine alone, in one run.

    engine alone:  esm_core's Embedder in this process over the proteome's distinct valid sequences
    pipeline:      `proteoflow embed` (Prefect flow + local Ray + Parquet + catalog) in a fresh store
    start-up:      `proteoflow embed` on a one-sequence input (fixed cost: imports, Prefect API, Ray, model load)

Both use the esm2_t6_8M architecture with random weights (speed does not depend on the weights) and the
engine's default precision. Goal: pipeline <= 1.15 x engine + start-up, start-up <= 20 s.

--driver-bytes measures instead the bytes that pass through the driver per computed residue, from the run
records of two `proteoflow embed` runs (pooled vectors only, then --per-residue): "before" is result_bytes
(the Arrow size of the result tables, what actors returned to the driver when it wrote the outputs), "after"
is driver_bytes (the pickled manifests actors return now that they write their outputs themselves).

    python bench/pipeline.py              # whole proteome (~1.36 M residues)
    python bench/pipeline.py --limit 500  # a quicker slice
    python bench/pipeline.py --limit 200 --driver-bytes  # driver bytes per residue, a couple of minutes
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esm_core.checkpoints import load_esm  # noqa: E402
from esm_core.embedding import Embedder  # noqa: E402
from esm_core.random_weights import write_random_hf_checkpoint  # noqa: E402
from storage.layout import Store  # noqa: E402
from storage.normalize import normalize_text, seq_hash, validate  # noqa: E402
from storage.runs import ComputeCounts, list_runs  # noqa: E402

ECOLI = ROOT.parent / "shared" / "data" / "ecoli_k12_UP000000625.fasta.gz"


def read_records(limit: int | None) -> list[tuple[str, str]]:
    text = gzip.open(ECOLI, "rt").read()
    records = []
    for chunk in text.split(">")[1:]:
        lines = chunk.splitlines()
        records.append((lines[0], "".join(lines[1:])))
    return records[:limit] if limit else records


def run_cli(args: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"proteoflow {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, help="first N proteome records only")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/proteoflow-bench-pipeline"))
    parser.add_argument(
        "--driver-bytes",
        action="store_true",
        help="only report the bytes through the driver per residue, with and without --per-residue",
    )
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    model = write_random_hf_checkpoint(args.workdir / "esm2_t6_8M_random", arch="esm2_t6_8M_UR50D")
    records = read_records(args.limit)
    fasta = args.workdir / "input.fasta"
    fasta.write_text("".join(f">{h}\n{s}\n" for h, s in records))
    one = args.workdir / "one.fasta"
    one.write_text(f">{records[0][0]}\n{records[0][1]}\n")
    distinct = {}
    for _, raw in records:
        seq = normalize_text(raw)
        if validate(seq.encode()) is None:
            distinct[seq_hash(seq)] = seq
    residues = sum(len(s) for s in distinct.values())
    if args.driver_bytes:
        driver_bytes(args.workdir, fasta, model, len(distinct), residues)
        return

    started = time.perf_counter()
    embedder = Embedder(load_esm(str(model)))
    loaded = time.perf_counter()
    for _ in embedder.embed(sorted(distinct.items())):
        pass
    engine = time.perf_counter() - loaded
    print(
        f"engine alone: {engine:.1f} s compute + {loaded - started:.1f} s load, {residues / engine:,.0f} residues/s "
        f"({len(distinct):,} sequences, {residues:,} residues, precision {embedder.precision})",
        flush=True,
    )
    del embedder

    startup = run_cli(
        [
            "embed",
            str(one),
            "--store",
            str(args.workdir / "store-one"),
            "--model",
            str(model),
            "--no-progress",
        ]
    )
    print(f"pipeline start-up (one sequence): {startup:.1f} s", flush=True)
    pipeline = run_cli(
        ["embed", str(fasta), "--store", str(args.workdir / "store"), "--model", str(model), "--no-progress"]
    )
    overhead = (pipeline - startup) / engine - 1
    print(f"pipeline end to end: {pipeline:.1f} s ({residues / pipeline:,.0f} residues/s)")
    print(
        f"overhead beyond start-up: {overhead:+.1%} of the engine's time (goal <= 15 %); "
        f"start-up {startup:.1f} s (goal <= 20 s); cpus={os.cpu_count()}"
    )


def driver_bytes(workdir: Path, fasta: Path, model: Path, sequences: int, residues: int) -> None:
    """Embed ``fasta`` twice (pooled only, then --per-residue) and print, from each run record, the bytes
    per computed residue the driver received before (result_bytes) and after (driver_bytes) actors wrote
    their own outputs."""
    print(f"driver bytes per residue: {sequences:,} sequences, {residues:,} residues, cpus={os.cpu_count()}")
    print(f"{'run':<16}{'shards':>7}{'before B/res':>14}{'after B/res':>13}{'after/before':>14}{'smaller':>10}"
          f"{'after B/shard':>15}")  # fmt: skip
    for label, extra in (("pooled", []), ("--per-residue", ["--per-residue"])):
        store = workdir / f"store-bytes-{label.strip('-')}"
        seconds = run_cli(
            ["embed", str(fasta), "--store", str(store), "--model", str(model), "--no-progress", *extra]
        )
        [record] = list_runs(Store(store), kind="embed")
        counts = record.counts
        assert isinstance(counts, ComputeCounts) and counts.computed_residues > 0
        before = counts.result_bytes / counts.computed_residues
        after = counts.driver_bytes / counts.computed_residues
        print(
            f"{label:<16}{counts.shards_computed:>7}{before:>14,.1f}{after:>13,.3f}{after / before:>14.4%}"
            f"{before / after:>9,.0f}x{counts.driver_bytes / max(counts.shards_computed, 1):>15,.0f}"
            f"   ({seconds:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
