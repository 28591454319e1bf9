"""Shared test fixtures: real data slices from ../shared/data and a CLI runner.

Session-wide heavy fixtures (Prefect's test harness, the local Ray cluster) also live here so each
starts once per test session.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROTEOFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
ECOLI = SHARED_DATA / "ecoli_k12_UP000000625.fasta.gz"
MAG = SHARED_DATA / "mag_bdellovibrionota_prodigal.faa.gz"
EXAMPLE = ROOT / "examples" / "ecoli_200.fasta"


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when the shared real-data files are not beside the checkout."""
    if not path.exists():
        pytest.skip(f"real data {path} not present (set PROTEOFLOW_SHARED_DATA)")
    return path


def read_fasta_records(path: Path) -> list[tuple[str, str]]:
    """(header, raw sequence) pairs of a FASTA file, parsed independently of proteoflow's reader."""
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[tuple[str, str]] = []
    with opener(path, "rt") as fh:
        header, chunks = None, []
        for line in fh:
            if line.startswith(">"):
                if header is not None:
                    records.append((header, "".join(chunks)))
                header, chunks = line[1:].rstrip("\n"), []
            else:
                chunks.append(line.strip())
        if header is not None:
            records.append((header, "".join(chunks)))
    return records


def write_slice(src: Path, dest: Path, start: int = 0, count: int = 100, step: int = 1,
                max_length: int | None = None) -> Path:
    """Write a deterministic slice of a real FASTA file (every ``step``-th record from ``start``)."""
    picked = []
    for header, seq in read_fasta_records(require_shared(src))[start::step]:
        if max_length is None or len(seq.rstrip("*")) <= max_length:
            picked.append((header, seq))
        if len(picked) == count:
            break
    dest.write_text("".join(f">{h}\n{s}\n" for h, s in picked))
    return dest


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real ``proteoflow`` entry point in a subprocess, as a user's shell would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], input=input, capture_output=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
