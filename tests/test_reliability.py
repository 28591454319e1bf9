"""Crashes at random points: `kill -9` of a real `proteoflow ingest` or `embed` (its whole process group) at a
random moment, then the same command again. The store must end exactly as an uninterrupted run leaves it,
and `proteoflow check` must find it sound.

The kill points are drawn from a seeded generator (PROTEOFLOW_RELIABILITY_SEED, default 7) and printed;
PROTEOFLOW_RELIABILITY_TRIALS (default 3 for ingest, 2 for embed) runs more of them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ECOLI, ROOT, read_fasta_records, require_shared

from storage.catalog import query
from storage.check import check_store

SEED = int(os.environ.get("PROTEOFLOW_RELIABILITY_SEED", "7"))
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def trials(default: int) -> int:
    return int(os.environ.get("PROTEOFLOW_RELIABILITY_TRIALS", default))


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: killed whole, as a crash of the machine's job would
        env={**os.environ, **(env or {})},
    )


def run_to_end(*args: str) -> None:
    proc = cli(*args)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]


def kill_group_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process group after ``seconds``; False when the command had already finished."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def ingest_state(store: Path) -> tuple:
    return (
        query(store, "SELECT seq_hash, length FROM sequences ORDER BY 1")[1],
        query(store, "SELECT record_index, seq_id, seq_hash FROM members ORDER BY 1")[1],
        query(store, "SELECT count(*) FROM runs WHERE status = 'completed'")[1],
    )


@pytest.fixture(scope="module")
def big_fasta(tmp_path_factory) -> Path:
    """~25 MB of distinct sequences (real E. coli proteins, each with a unique tag): ingest takes seconds."""
    proteins = [s for _, s in read_fasta_records(require_shared(ECOLI))]
    path = tmp_path_factory.mktemp("big") / "big.fasta"
    with open(path, "w") as out:
        for i in range(75_000):
            tag = "".join(AMINO[(i // 20**k) % 20] for k in range(5))
            out.write(f">rec{i}\nM{tag}{proteins[i % len(proteins)][1:]}\n")
    return path


def test_ingest_killed_at_random_points_then_rerun_is_exact(big_fasta, tmp_path) -> None:
    reference = tmp_path / "reference"
    started = time.monotonic()
    run_to_end("ingest", str(big_fasta), "--store", str(reference))
    duration = time.monotonic() - started
    want = ingest_state(reference)
    rng = random.Random(SEED)
    points = [round(rng.uniform(0.3, duration * 0.95), 2) for _ in range(trials(3))]
    print(f"ingest kill points (s): {points} of a {duration:.1f} s run")
    for n, point in enumerate(points):
        store = tmp_path / f"store{n}"
        killed = kill_group_after(cli("ingest", str(big_fasta), "--store", str(store)), point)
        run_to_end("ingest", str(big_fasta), "--store", str(store))
        assert ingest_state(store) == want, f"kill at {point} s (killed={killed})"
        report = check_store(store, grace_s=0)
        assert report.sound, [f.line() for f in report.findings]


def test_embed_killed_at_random_points_then_rerun_is_exact(tiny_esm2, tmp_path) -> None:
    records = read_fasta_records(require_shared(ECOLI))[::29][:60]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{h}\n{s[:400]}\n" for h, s in records))
    args = ["embed", str(fasta), "--model", str(tiny_esm2), "--workers", "1", "--layers", "-1,1",
            "--pooling", "mean,bos", "--precision", "fp32", "--no-progress"]  # fmt: skip
    slow = {"PROTEOFLOW_SHARD_DELAY_S": "1"}  # the compute phase spans several seconds to land kills in
    reference = tmp_path / "reference"
    started = time.monotonic()
    proc = cli(*args, "--store", str(reference), env=slow)
    assert proc.wait(timeout=900) == 0, proc.stderr.read().decode()[-3000:]
    duration = time.monotonic() - started
    want = query(reference, "SELECT seq_hash, layer, pooling, embedding FROM embeddings ORDER BY 1, 2, 3")[1]
    rng = random.Random(SEED + 1)
    points = [round(rng.uniform(1.0, duration * 0.95), 2) for _ in range(trials(2))]
    print(f"embed kill points (s): {points} of a {duration:.1f} s run")
    for n, point in enumerate(points):
        store = tmp_path / f"store{n}"
        killed = kill_group_after(cli(*args, "--store", str(store), env=slow), point)
        run_to_end(*args, "--store", str(store))
        got = query(store, "SELECT seq_hash, layer, pooling, embedding FROM embeddings ORDER BY 1, 2, 3")[1]
        assert len(got) == len(want) and got == want, f"kill at {point} s (killed={killed})"
        assert query(store, "SELECT status FROM runs WHERE kind = 'embed'")[1] == [("completed",)]
        report = check_store(store, grace_s=0)
        assert report.sound, [f.line() for f in report.findings]
