"""Ingest throughput and peak memory on >= 1 GB of FASTA, beside Biopython's parser in the same run.

The input is the E. coli proteome repeated until it reaches --size-gb (built once, cached in --workdir).
Each contender runs in its own subprocess so its peak RSS is its own:
  proteoflow: `proteoflow ingest` into a fresh store (validates, hashes, deduplicates, writes Parquet);
  baseline:   `Bio.SeqIO.parse` + `hashlib.md5` of each upper-cased sequence, nothing written.

    python bench/ingest.py --size-gb 1.0
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ECOLI = ROOT.parent / "shared" / "data" / "ecoli_k12_UP000000625.fasta.gz"

BASELINE = """
import hashlib, sys
from Bio import SeqIO
n = 0
for rec in SeqIO.parse(sys.argv[1], "fasta"):
    hashlib.md5(str(rec.seq).upper().encode()).hexdigest()
    n += 1
print(n)
"""


def build_input(path: Path, size_gb: float) -> Path:
    """Concatenate copies of the E. coli proteome (ids suffixed per copy) up to the requested size."""
    target = int(size_gb * 1e9)
    if path.exists() and path.stat().st_size >= target:
        return path
    proteome = gzip.open(ECOLI, "rb").read()
    tmp = path.with_suffix(".partial")
    written, copy = 0, 0
    with open(tmp, "wb") as out:
        while written < target:
            chunk = proteome.replace(b"\n>", f"\n>c{copy}_".encode())
            chunk = f">c{copy}_".encode() + chunk[1:]
            out.write(chunk)
            written += len(chunk)
            copy += 1
    tmp.rename(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/proteoflow-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    fasta = build_input(args.workdir / f"ecoli_x_{args.size_gb:g}gb.fasta", args.size_gb)
    size_mb = fasta.stat().st_size / 1e6
    store = args.workdir / "store"
    shutil.rmtree(store, ignore_errors=True)

    # Each measurement in a fresh interpreter launched through a tiny wrapper that reports its own peak RSS.
    wrapper = (
        "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
        "code = 0\ntry:\n    runpy.run_module(sys.argv[0], run_name='__main__') if not sys.argv[0].endswith('.py') "
        "else runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    code = e.code or 0\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\nsys.exit(code)"
    )
    results = {}
    baseline_script = args.workdir / "baseline.py"
    baseline_script.write_text(BASELINE)
    for name, cmd in {
        "proteoflow ingest": [
            sys.executable,
            "-c",
            wrapper,
            "flows.cli",
            "ingest",
            str(fasta),
            "--store",
            str(store),
            "--json",
        ],
        "SeqIO.parse + md5": [sys.executable, "-c", wrapper, str(baseline_script), str(fasta)],
    }.items():
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr}")
        fields = next(line.split() for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
        # parse workers (children) are separate processes: count each at the largest child's peak
        workers = 0 if "--workers" in cmd else (os.cpu_count() or 1) if name.startswith("proteoflow") else 0
        peak_kb = int(fields[1]) + workers * int(fields[2])
        out = proc.stdout.strip().splitlines()[-1]
        records = json.loads(out)["records"] if out.startswith("{") else int(out)
        results[name] = {"wall_s": wall, "records": records, "peak_rss_mb": peak_kb / 1024}

    print(
        f"input: {fasta} ({size_mb:,.0f} MB, {results['proteoflow ingest']['records']:,} records), "
        f"cpus={os.cpu_count()}"
    )
    print(
        f"{'':22}{'wall s':>9}{'records/s':>13}{'MB/s':>9}{'peak RSS MB':>13}  (proteoflow: main + parse workers)"
    )
    for name, r in results.items():
        print(
            f"{name:22}{r['wall_s']:9.1f}{r['records'] / r['wall_s']:13,.0f}{size_mb / r['wall_s']:9.1f}"
            f"{r['peak_rss_mb']:13.0f}"
        )
    ratio = results["SeqIO.parse + md5"]["wall_s"] / results["proteoflow ingest"]["wall_s"]
    print(
        f"speed ratio proteoflow / baseline: {ratio:.2f}x "
        f"(proteoflow also validates, deduplicates and writes Parquet)"
    )


if __name__ == "__main__":
    main()
