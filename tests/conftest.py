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


def write_slice(
    src: Path, dest: Path, start: int = 0, count: int = 100, step: int = 1, max_length: int | None = None
) -> Path:
    """Write a deterministic slice of a real FASTA file (every ``step``-th record from ``start``)."""
    picked = []
    for header, seq in read_fasta_records(require_shared(src))[start::step]:
        if max_length is None or len(seq.rstrip("*")) <= max_length:
            picked.append((header, seq))
        if len(picked) == count:
            break
    dest.write_text("".join(f">{h}\n{s}\n" for h, s in picked))
    return dest


def run_cli(
    *args: str, input: bytes | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the real ``proteoflow`` entry point in a subprocess, as a user's shell would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        input=input,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API and database), started once per test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray cluster per session: two nodes, each with 2 CPUs and 1 logical GPU (multi-node tests)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_esm2(tmp_path_factory) -> Path:
    """A tiny random-weight ESM-2 saved by transformers (EsmForMaskedLM), loaded through the user's code path."""
    from esm_core.random_weights import write_random_hf_checkpoint

    return write_random_hf_checkpoint(tmp_path_factory.mktemp("models") / "tiny_esm2", arch="tiny_esm2")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on the loopback address, for the session; its client variables
    are set in this process too (in-process readers find the endpoint as a user's shell would)."""
    from objectstore_server import SeaweedS3, available

    why = available()
    if why:
        pytest.skip(why)
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).wait()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
