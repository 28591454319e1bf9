"""The driver out of the data path: actors write their shards' outputs to the store themselves and return only
a manifest, so the bytes through the driver stay a small fraction of the result bytes, even with per-residue
vectors; the rows in the store are still exactly the engine's, once each, whatever dies when.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE, ROOT, write_slice

from esm_core.checkpoints import load_esm
from esm_core.embedding import Embedder
from flows.job import Job, PoolOptions
from flows.pipeline import embed_flow
from storage import results
from storage.catalog import query
from storage.check import check_store
from storage.layout import Store
from storage.normalize import normalize_text
from storage.shards import load_shard_records

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
MAX_DRIVER_SHARE = 0.05  # driver bytes at most this share of the result bytes (per-residue runs)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory) -> Path:
    return write_slice(EXAMPLE, tmp_path_factory.mktemp("in") / "e.fasta", count=40, max_length=300)


def sequences_of(path: Path) -> dict[str, str]:
    out = {}
    for chunk in path.read_text().split(">")[1:]:
        seq = normalize_text("".join(chunk.splitlines()[1:]))
        out[hashlib.md5(seq.encode()).hexdigest()] = seq
    return out


def reference(model: Path, seqs: dict[str, str], poolings: tuple[str, ...]) -> tuple[dict, dict]:
    """The in-process engine's pooled and per-residue vectors (last layer) for the same sequences."""
    embedder = Embedder(
        load_esm(str(model)), layers=[-1], poolings=poolings, per_residue=True, precision="fp32"
    )
    pooled, residue = {}, {}
    for r in embedder.embed(list(seqs.items())):
        for (_, pooling), vector in r.pooled.items():
            pooled[(r.key, pooling)] = vector
        for _, matrix in r.per_residue.items():
            residue[r.key] = matrix
    return pooled, residue


def stored(store: Path) -> tuple[dict, dict]:
    pooled = {
        (h, p): np.asarray(v, np.float32)
        for h, p, v in query(store, "SELECT seq_hash, pooling, embedding FROM embeddings")[1]
    }
    residue = {
        h: np.asarray(v, np.float32)
        for h, v in query(store, "SELECT seq_hash, embedding FROM residue_embeddings")[1]
    }
    return pooled, residue


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, vector in want.items():
        assert got[key].shape == np.shape(vector), key
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst < 1e-5, worst


def test_per_residue_embed_sends_only_manifests_through_the_driver(tiny_esm2, fasta, tmp_path) -> None:
    """The real CLI, --per-residue, two actors; the actor holding shard 1 is SIGKILLed right after it wrote
    that shard's outputs (before the driver heard of them): the shard is retried and written once."""
    store = tmp_path / "store"
    faults = tmp_path / "faults"
    env = {**ENV, "PROTEOFLOW_KILL_SHARD": "1@written", "PROTEOFLOW_FAULT_DIR": str(faults)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "embed", str(fasta), "--store", str(store), "--model", str(tiny_esm2),
         "--per-residue", "--layers", "-1", "--pooling", "mean,bos", "--precision", "fp32", "--workers", "2",
         "--cpus-per-worker", "1", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (faults / "killed-shard-1").exists()  # the actor did die after writing shard 1

    [(run_id, counts_json)] = query(store, "SELECT run_id, counts FROM runs WHERE kind = 'embed'")[1]
    counts = json.loads(counts_json)
    assert counts["replaced_workers"] >= 1 and counts["retries"] >= 1
    assert counts["shards_computed"] == counts["shards"] >= 3
    assert counts["result_bytes"] > 0 and counts["computed_residues"] > 0
    assert 0 < counts["driver_bytes"] < MAX_DRIVER_SHARE * counts["result_bytes"], counts
    # what the driver would have received: at least the per-residue matrices themselves (float32)
    dim = load_esm(str(tiny_esm2)).dim
    assert counts["result_bytes"] >= 4 * dim * counts["computed_residues"]

    # the store holds exactly the engine's rows, once each
    seqs = sequences_of(fasta)
    want_pooled, want_residue = reference(tiny_esm2, seqs, ("mean", "bos"))
    got_pooled, got_residue = stored(store)
    assert_same(got_pooled, want_pooled)
    assert_same(got_residue, want_residue)
    [(rows, distinct)] = query(store, "SELECT count(*), count(DISTINCT seq_hash) FROM residue_embeddings")[1]
    assert rows == distinct == len(seqs)
    # the shard records list what the actors wrote, and the store checks sound
    records = load_shard_records(Store(store), run_id)
    assert all(r.status == "done" and r.outputs for r in records.values())
    assert not any(results.missing_outputs(Store(store), r.outputs) for r in records.values())
    report = check_store(store, grace_s=0)
    assert report.sound, [f.line() for f in report.findings]


def _job(store: Path, fasta: Path, model: Path, poolings: list[str]) -> Job:
    options = {"layers": [-1], "poolings": poolings, "precision": "fp32"}
    return Job(kind="embed", store=str(store), inputs=[str(fasta)], model=str(model), engine_options=options,
               pool=PoolOptions(workers=2, cpus_per_worker=1, gpus_per_worker=0), progress=False)  # fmt: skip


@pytest.mark.parametrize("lapsed", [True, False])
def test_lapsed_lease_drops_rows_another_run_stored_meanwhile(
    prefect_harness, ray_cluster, tiny_esm2, fasta, tmp_path, monkeypatch, lapsed
) -> None:
    """Rows another run stored while this run computed (its lease lapsed, so nothing kept the other run off
    these sequences) are dropped from this run's shards before they are recorded, not stored twice.

    Simulated: run 1 stores the mean rows; run 2 (mean and bos) reads no stored keys at its start, as if
    run 1 wrote them only afterwards. With the lease lapsed the driver re-checks and rewrites the shards;
    with the lease held (the control case) nothing re-checks and the mean rows are stored twice."""
    store = tmp_path / "store"
    assert embed_flow(_job(store, fasta, tiny_esm2, ["mean"])).status == "completed"
    original = results.existing_keys

    def nothing_stored_yet(store, table, model, hashes, skip=()):
        return original(store, table, model, hashes, skip) if skip else set()

    monkeypatch.setattr(results, "existing_keys", nothing_stored_yet)
    monkeypatch.setattr("storage.locks.Lease.held", lambda self: not lapsed)
    record = embed_flow(_job(store, fasta, tiny_esm2, ["mean", "bos"]))
    assert record.status == "completed"
    n = len(sequences_of(fasta))
    [(rows, distinct)] = query(store, "SELECT count(*), count(DISTINCT (seq_hash, pooling)) FROM embeddings")[
        1
    ]
    assert distinct == 2 * n
    if not lapsed:
        assert rows == 3 * n  # the control: without the re-check the mean rows are there twice
        return
    assert rows == 2 * n
    records = load_shard_records(Store(store), record.run_id)
    assert sum(o.rows for r in records.values() for o in r.outputs) == n  # only the bos rows
    assert not any(results.missing_outputs(Store(store), r.outputs) for r in records.values())
    report = check_store(store, grace_s=0)
    assert report.sound, [f.line() for f in report.findings]
