"""Memory stays flat as the input grows: a generated input of many distinct sequences, 3x larger,
must not raise peak RSS beyond a small margin once past its fixed buffers (pass 1 streams; pass 2 works one hash bucket at a time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ECOLI, ROOT, read_fasta_records, require_shared

from storage.catalog import query

AMINO = "ACDEFGHIKLMNPQRSTVWY"
PEAK = (
    "import resource, runpy, sys; sys.argv = ['proteoflow'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('flows.cli', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
    "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)"
)


def generate(path: Path, records: int, offset: int = 0) -> Path:
    """Distinct sequences: real E. coli proteins, each prefixed with a unique 6-residue tag."""
    proteins = [s for _, s in read_fasta_records(require_shared(ECOLI))]
    with open(path, "w") as out:
        for i in range(offset, offset + records):
            seq = proteins[i % len(proteins)]
            tag = "".join(AMINO[(i // 20**k) % 20] for k in range(6))
            out.write(f">gen{i}\nM{tag}{seq[1:]}\n")
    return path


def ingest_peak_mb(fasta: Path, store: Path) -> tuple[float, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, "ingest", str(fasta), "--store", str(store), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    peak_kb = int(next(x.split()[1] for x in proc.stderr.splitlines() if x.startswith("PEAK")))
    return peak_kb / 1024, json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_and_dedup_holds(tmp_path: Path) -> None:
    small = generate(tmp_path / "small.fasta", 120_000)
    large = generate(tmp_path / "large.fasta", 360_000)
    small_mb, small_counts = ingest_peak_mb(small, tmp_path / "s1")
    large_mb, large_counts = ingest_peak_mb(large, tmp_path / "s2")
    grown_input_mb = (large.stat().st_size - small.stat().st_size) / 2**20
    assert small_counts["new_sequences"] == 120_000 and large_counts["new_sequences"] == 360_000
    assert grown_input_mb > 75
    # memory may not follow the input: 3x the records, well under half the extra input size in extra RSS
    assert large_mb - small_mb < min(40, grown_input_mb / 2), (small_mb, large_mb, grown_input_mb)
    # a second, overlapping input into the large store adds only the unseen half
    overlap = generate(tmp_path / "overlap.fasta", 40_000, offset=340_000)
    _, counts = ingest_peak_mb(overlap, tmp_path / "s2")
    assert counts["already_in_store"] == 20_000 and counts["new_sequences"] == 20_000
    assert query(tmp_path / "s2", "SELECT count(*), count(DISTINCT seq_hash) FROM sequences")[1] == [
        (380_000, 380_000)
    ]
