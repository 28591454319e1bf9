"""Failures a user or their machine causes end a command in one line on stderr, with a non-zero exit, no
traceback, and quickly: a store that cannot be written (read-only mount, full disk, a file), a Prefect API or
Ray cluster that does not answer, resources that are impossible or that the cluster cannot place, and option
errors (all before any worker starts). Real processes and real file systems; tests that need to mount one
skip, saying why, where this machine does not allow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ECOLI, ROOT, write_slice

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def fasta(tmp_path_factory) -> Path:
    return write_slice(ECOLI, tmp_path_factory.mktemp("failures") / "ecoli.fasta", count=200)


def cli(
    *args: str, env: dict | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.monotonic() - started


def embed(fasta: Path, store: Path, model: Path, *extra: str, env: dict | None = None, timeout: float = 120):
    return cli(
        "embed", str(fasta), "--store", str(store), "--model", str(model), "--no-progress", *extra,
        env=env, timeout=timeout,
    )  # fmt: skip


def assert_one_line(
    result: subprocess.CompletedProcess, elapsed: float, within: float, *expected: str
) -> str:
    """Non-zero exit, exactly one line on stderr (the start-up notice for random weights aside), no
    traceback, containing every ``expected`` fragment, within ``within`` seconds."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "RANDOM WEIGHTS" not in line]
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert all(text in lines[0] for text in expected), lines[0]
    assert elapsed < within, (elapsed, lines[0])
    return lines[0]


def mount(*args: str) -> None:
    """Run mount(8); skip the test (with mount's reason) where this machine or user may not mount."""
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip() or result.returncode}): needs root in a "
                    "namespace that allows mounts")  # fmt: skip


@pytest.fixture
def mounts():
    """Mount points to unmount after the test, last first."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


# ------------------------------------------------------------------------------------------ the store


def test_read_only_store_fails_before_anything_starts(tiny_esm2, fasta, tmp_path, mounts):
    """A read-only bind mount: root ignores permission bits (chmod would test nothing), not a read-only mount."""
    store = tmp_path / "store"
    store.mkdir()
    mount("--bind", str(store), str(store))
    mounts.append(store)
    mount("-o", "remount,bind,ro", str(store))
    result, elapsed = embed(fasta, store, tiny_esm2)
    assert_one_line(result, elapsed, 15, "proteoflow embed: error: --store", "read-only file system")
    assert result.returncode == 2
    result, elapsed = cli("ingest", str(fasta), "--store", str(store))
    assert_one_line(result, elapsed, 15, "proteoflow ingest: error:", "read-only file system")


def test_full_disk_is_one_line(tiny_esm2, fasta, tmp_path, mounts):
    """A real, tiny file system (tmpfs of 64 KiB): the store's first tables do not fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk))
    mounts.append(disk)
    result, elapsed = embed(fasta, disk / "store", tiny_esm2)
    assert_one_line(result, elapsed, 15, "proteoflow embed: error:", "no space left on device")
    assert result.returncode == 1
    result, elapsed = cli("ingest", str(fasta), "--store", str(disk / "store"))
    assert_one_line(result, elapsed, 15, "proteoflow ingest: error:", "no space left on device")


def test_store_that_is_a_file_is_one_line(tiny_esm2, fasta, tmp_path):
    store = tmp_path / "store.txt"
    store.write_text("not a store\n")
    for args in (
        ["embed", str(fasta), "--store", str(store), "--model", str(tiny_esm2)],
        ["ingest", str(fasta), "--store", str(store)],
        ["sql", "--store", str(store), "SELECT 1"],
    ):
        result, elapsed = cli(*args)
        assert_one_line(result, elapsed, 15, f"--store {store} is a file")
        assert result.returncode == 2
    result, elapsed = embed(fasta, store / "inner", tiny_esm2)
    assert_one_line(result, elapsed, 15, "is a file, not a directory")


# ------------------------------------------------------------------------------- services that are not there


def test_unreachable_prefect_api_is_one_line_before_ray_starts(tiny_esm2, fasta, tmp_path):
    result, elapsed = embed(
        fasta, tmp_path / "store", tiny_esm2, env={"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    )
    assert_one_line(result, elapsed, 15, "PREFECT_API_URL http://127.0.0.1:9/api does not answer")
    assert result.returncode == 2


def test_unreachable_ray_address_is_one_line(tiny_esm2, fasta, tmp_path):
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        result, elapsed = embed(fasta, tmp_path / "store", tiny_esm2, "--ray-address", address)
        assert_one_line(result, elapsed, 15, f"--ray-address {address}: no Ray cluster answers there")
        assert result.returncode == 2


# ------------------------------------------------------------------------------------------- resources


def test_impossible_or_negative_resources_are_one_line_before_any_worker_starts(tiny_esm2, fasta, tmp_path):
    cases = {
        ("--cpus-per-worker", "-1"): "--cpus-per-worker must be positive",
        ("--cpus-per-worker", "0"): "--cpus-per-worker must be positive",
        ("--gpus-per-worker", "-0.5"): "--gpus-per-worker must be 0 or more",
        ("--workers", "0"): "--workers: must be a positive integer",
        ("--workers", "-3"): "--workers: must be a positive integer",
        ("--max-attempts", "0"): "--max-attempts: must be a positive integer",
    }
    for extra, message in cases.items():
        result, elapsed = embed(fasta, tmp_path / "store", tiny_esm2, *extra)
        assert_one_line(result, elapsed, 15, message)
        assert result.returncode == 2
    assert not (tmp_path / "store").exists()  # refused before the ingest


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--gpus-per-worker", "1"), "it has no GPUs"),
        (("--workers", "50", "--cpus-per-worker", "2"), "the pool (50 workers, 2 CPUs each) does not fit"),
    ],
)
def test_a_pool_the_cluster_cannot_place_says_what_is_missing(tiny_esm2, fasta, tmp_path, extra, expected):
    """The local Ray has this machine's CPUs and no GPU: checked against the cluster before any actor exists."""
    if os.cpu_count() >= 100:
        pytest.skip("this machine has 100 CPUs or more: 50 workers of 2 CPUs would fit")
    result, elapsed = embed(fasta, tmp_path / "store", tiny_esm2, *extra)
    line = assert_one_line(result, elapsed, 15, expected)
    assert result.returncode == 2 and "Ray cluster" in line


def test_workers_that_other_jobs_keep_from_being_placed_end_the_start_up(ray_cluster, tiny_esm2):
    """The cluster could hold the pool, but another job holds every CPU: the model-load wait ends with what is
    missing once the actors have stayed unplaced for the placement timeout (60 s by default; 2 s here)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from flows.engines import options_from_dict
    from flows.job import PoolOptions
    from flows.pool import ActorPool, WorkerStartError

    cpus = int(ray.cluster_resources()["CPU"])
    held = placement_group([{"CPU": 1}] * cpus)  # "another job" reserving every CPU of the cluster
    ray.get(held.ready(), timeout=60)
    options = options_from_dict("embed", {"precision": "fp32"})
    pool = ActorPool(
        "embed", str(tiny_esm2), options, PoolOptions(workers=1, cpus_per_worker=1, gpus_per_worker=0)
    )
    started = time.monotonic()
    try:
        with pytest.raises(WorkerStartError) as error:
            pool.identity(placement_timeout=2)
    finally:
        pool.shutdown()
        remove_placement_group(held)
    elapsed = time.monotonic() - started
    message = str(error.value)
    assert "\n" not in message and message.startswith("1 of 1 workers could not be placed for 2 s"), message
    assert f"the Ray cluster has 0 of {cpus} CPUs" in message and "other jobs hold the rest" in message
    assert elapsed < 15, elapsed


@pytest.mark.slow
def test_disk_filling_up_mid_compute_is_one_line_and_recorded(tiny_esm2, fasta, tmp_path, mounts):
    """The inputs fit, the per-residue vectors do not (a tmpfs of 1 MiB; they need 2.7): the run is recorded
    failed with the file system's error, and the command says so in one line (a rerun with room resumes)."""
    from storage.catalog import query

    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk))
    mounts.append(disk)
    result, elapsed = embed(fasta, disk / "store", tiny_esm2, "--per-residue", timeout=600)
    assert_one_line(result, elapsed, 300, "proteoflow embed: error: no space left on device")
    assert result.returncode == 1
    [(status, message)] = query(disk / "store", "SELECT status, message FROM runs WHERE kind = 'embed'")[1]
    assert status == "failed" and "Errno 28" in message, (status, message)
