"""The embedding pipeline end to end: a real Prefect flow (test harness) over real Ray actors.

Results are compared with the in-process engine; faults are real (a SIGKILLed actor, a SIGKILLed driver
process group) or injected where the engine itself must fail (a poison sequence).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ECOLI, EXAMPLE, MAG, ROOT, write_slice

from esm_core.checkpoints import load_esm
from esm_core.embedding import Embedder
from flows.pipeline import Job, embed_flow
from flows.pool import PoolOptions
from storage.catalog import query
from storage.normalize import normalize_text

OPTIONS = {"layers": [-1, 1], "poolings": ["mean", "bos"], "precision": "fp32"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("inputs")
    return [
        write_slice(ECOLI, tmp / "ecoli.fasta", start=7, count=24, step=37, max_length=500),
        write_slice(MAG, tmp / "mag.faa", start=3, count=24, step=41, max_length=500),
    ]


def sequences_of(paths: list[Path]) -> dict[str, str]:
    out = {}
    for path in paths:
        for chunk in path.read_text().split(">")[1:]:
            seq = normalize_text("".join(chunk.splitlines()[1:]))
            out[hashlib.md5(seq.encode()).hexdigest()] = seq
    return out


def reference(model: Path, seqs: dict[str, str], options: dict = OPTIONS) -> dict[tuple, np.ndarray]:
    """The in-process engine's pooled vectors for the same sequences and options."""
    embedder = Embedder(
        load_esm(str(model)),
        layers=options["layers"],
        poolings=options["poolings"],
        precision=options["precision"],
    )
    return {
        (r.key, layer, pooling): vec
        for r in embedder.embed(list(seqs.items()))
        for (layer, pooling), vec in r.pooled.items()
    }


def stored(store: Path, run_id: str) -> dict[tuple, np.ndarray]:
    rows = query(
        store, f"SELECT seq_hash, layer, pooling, embedding FROM embeddings WHERE run_id = '{run_id}'"
    )[1]
    return {(h, layer, pooling): np.asarray(v, np.float32) for h, layer, pooling, v in rows}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst < 1e-5, worst


def job(store: Path, inputs: list[Path], model: Path, **pool) -> Job:
    options = {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0, **pool}
    return Job(
        kind="embed",
        store=str(store),
        inputs=[str(p) for p in inputs],
        model=str(model),
        engine_options=dict(OPTIONS),
        pool=PoolOptions(**options),
        progress=False,
    )


def test_flow_on_two_cpu_actors_equals_in_process_engine(
    prefect_harness, ray_cluster, tiny_esm2, inputs, tmp_path
):
    store = tmp_path / "store"
    first = embed_flow(job(store, inputs[:1], tiny_esm2))
    assert first.status == "completed"
    # a second input: only sequences never embedded by this model are planned
    record = embed_flow(job(store, inputs, tiny_esm2))
    assert record.status == "completed" and record.run_id != first.run_id
    seqs = sequences_of(inputs)
    assert record.counts.sequences == len(set(seqs) - set(sequences_of(inputs[:1])))
    got = stored(store, first.run_id) | stored(store, record.run_id)
    assert_same(got, reference(tiny_esm2, seqs))
    counts = record.counts
    assert counts.shards_computed == counts.shards >= 2
    assert len({p["pid"] for p in counts.placements}) == 2
    # the same command again resumes the completed run: nothing computed, nothing duplicated
    again = embed_flow(job(store, inputs, tiny_esm2))
    assert again.run_id == record.run_id and again.counts.shards_computed == 0
    assert again.counts.attempts == 2
    n, distinct = query(store, "SELECT count(*), count(DISTINCT (seq_hash, layer, pooling)) FROM embeddings")[
        1
    ][0]
    assert n == distinct == len(seqs) * 4
    # the DuckDB view exposes fixed-size vectors: nearest neighbours straight in SQL
    nn = query(
        store,
        """
        WITH q AS (SELECT embedding FROM embeddings WHERE layer = 2 AND pooling = 'mean' LIMIT 1)
        SELECT array_cosine_similarity(e.embedding, q.embedding) AS cos FROM embeddings e, q
        WHERE e.layer = 2 AND e.pooling = 'mean' ORDER BY cos DESC LIMIT 3""",
    )[1]
    assert nn[0][0] == pytest.approx(1.0, abs=1e-5) and len(nn) == 3


def test_killed_actor_is_replaced_and_results_exact(
    prefect_harness, ray_cluster, tiny_esm2, inputs, tmp_path, monkeypatch
):
    monkeypatch.setenv("PROTEOFLOW_KILL_SHARD", "1")
    monkeypatch.setenv("PROTEOFLOW_FAULT_DIR", str(tmp_path / "faults"))
    store = tmp_path / "store"
    record = embed_flow(job(store, inputs, tiny_esm2))
    assert (tmp_path / "faults" / "killed-shard-1").exists()  # the actor really died
    assert record.status == "completed"
    assert record.counts.replaced_workers >= 1 and record.counts.retries >= 1
    assert query(store, "SELECT tries FROM shards WHERE shard_id = 1")[1] == [(2,)]
    assert_same(stored(store, record.run_id), reference(tiny_esm2, sequences_of(inputs)))


def test_poison_sequence_is_isolated_as_rejected(
    prefect_harness, ray_cluster, tiny_esm2, inputs, tmp_path, monkeypatch
):
    seqs = sequences_of(inputs)
    poison = sorted(seqs)[5]
    monkeypatch.setenv("PROTEOFLOW_POISON", poison[:16])
    store = tmp_path / "store"
    record = embed_flow(job(store, inputs, tiny_esm2))
    assert record.status == "completed" and record.counts.isolated_errors == 1
    rows = query(store, f"SELECT rule, reason FROM rejected WHERE run_id = '{record.run_id}'")[1]
    assert rows and all(rule == "compute_error" and "injected poison" in reason for rule, reason in rows)
    got = stored(store, record.run_id)
    assert {h for h, _, _ in got} == set(seqs) - {poison}  # everything else of its shard was computed
    want = {k: v for k, v in reference(tiny_esm2, seqs).items() if k[0] != poison}
    assert_same(got, want)


def test_actors_spread_over_two_nodes_with_logical_gpus(
    prefect_harness, ray_cluster, tiny_esm2, inputs, tmp_path
):
    store = tmp_path / "store"
    record = embed_flow(job(store, inputs, tiny_esm2, gpus_per_worker=1))
    placements = record.counts.placements
    assert len({p["node_id"] for p in placements}) == 2  # one GPU per node, one GPU per actor
    assert all(len(p["gpu_ids"]) == 1 for p in placements)
    assert_same(stored(store, record.run_id), reference(tiny_esm2, sequences_of(inputs)))


def test_driver_process_group_killed_then_rerun_resumes(tmp_path):
    """The CLI (its own local Ray, Prefect's temporary API) is SIGKILLed with its whole process group."""
    from esm_core.random_weights import write_random_hf_checkpoint

    model = write_random_hf_checkpoint(tmp_path / "esm2_t6_8M_random", arch="esm2_t6_8M_UR50D")
    store = tmp_path / "store"
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "embed",
        str(EXAMPLE),
        "--store",
        str(store),
        "--model",
        str(model),
        "--precision",
        "fp32",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(store.glob("shards/run_id=*/shard-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in store.glob("shards/run_id=*/shard-*.parquet")}
    assert done_before, "no shard finished before the deadline"
    [run_id] = [r for (r,) in query(store, "SELECT run_id FROM runs WHERE kind = 'embed'")[1]]
    assert query(store, f"SELECT status FROM runs WHERE run_id = '{run_id}'")[1] == [("running",)]

    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    shards = query(
        store, f"SELECT shard_id, attempt, status FROM shards WHERE run_id = '{run_id}' ORDER BY 1"
    )[1]
    total = len(shards)
    assert total > len(done_before) and all(status == "done" for _, _, status in shards)
    assert sum(1 for _, attempt, _ in shards if attempt == 1) == len(done_before)  # not recomputed
    [(status, counts)] = query(store, f"SELECT status, counts FROM runs WHERE run_id = '{run_id}'")[1]
    assert status == "completed" and f'"shards_computed": {total - len(done_before)}' in counts
    seqs = sequences_of([EXAMPLE])
    options = {"layers": [-1], "poolings": ["mean"], "precision": "fp32"}
    assert_same(stored(store, run_id), reference(model, seqs, options))


def test_cli_joins_an_existing_cluster_with_ray_address(ray_cluster, tiny_esm2, inputs, tmp_path):
    """Submission to a running cluster: a separate driver process joins it, ships the code, spreads actors."""
    store = tmp_path / "store"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "embed",
            *map(str, inputs),
            "--store",
            str(store),
            "--model",
            str(tiny_esm2),
            "--layers",
            "-1,1",
            "--pooling",
            "mean,bos",
            "--precision",
            "fp32",
            "--ray-address",
            ray_cluster.address,
            "--ship-code",
            "--workers",
            "2",
            "--gpus-per-worker",
            "1",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [(run_id, counts)] = query(store, "SELECT run_id, counts FROM runs WHERE kind = 'embed'")[1]
    assert len({p["node_id"] for p in json.loads(counts)["placements"]}) == 2
    assert_same(stored(store, run_id), reference(tiny_esm2, sequences_of(inputs)))


def test_adding_a_pooling_or_per_residue_computes_only_what_is_missing(
    prefect_harness, ray_cluster, tiny_esm2, inputs, tmp_path
):
    store = tmp_path / "store"
    first = job(store, inputs[:1], tiny_esm2)
    first.engine_options = {"layers": [-1], "poolings": ["mean"], "precision": "fp32"}
    assert embed_flow(first).status == "completed"
    second = job(store, inputs[:1], tiny_esm2)
    second.engine_options = {
        "layers": [-1],
        "poolings": ["mean", "bos"],
        "precision": "fp32",
        "per_residue": True,
    }
    record = embed_flow(second)
    n = len(sequences_of(inputs[:1]))
    assert record.counts.sequences == n  # bos and per-residue rows were missing for every sequence
    rows, distinct = query(
        store, "SELECT count(*), count(DISTINCT (seq_hash, layer, pooling)) FROM embeddings"
    )[1][0]
    assert rows == distinct == 2 * n  # the mean rows were not written twice
    assert query(store, "SELECT count(*) FROM residue_embeddings")[1] == [(n,)]


def test_unknown_model_is_a_one_line_error_before_anything_starts(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "embed", str(EXAMPLE), "--store", str(tmp_path / "s"),
         "--model", str(tmp_path / "no_such_model"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("proteoflow embed: error: model ") and "not found" in result.stderr
    assert not (tmp_path / "s").exists()  # nothing ingested, no Ray, no Prefect
    assert elapsed < 15, elapsed


def test_bad_options_are_one_line_errors_before_anything_starts(tiny_esm2, tmp_path):
    cases = {
        ("--layers", "99"): "--layers: layer 99 does not exist",
        ("--pooling", "max"): "--pooling takes mean and/or bos",
        ("--min-length", "50", "--max-length", "10"): "--min-length 50 is greater than --max-length 10",
        ("--cpus-per-worker", "-1"): "--cpus-per-worker must be positive",
    }
    for extra, message in cases.items():
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "embed", str(EXAMPLE), "--store", str(tmp_path / "s"),
             "--model", str(tiny_esm2), "--no-progress", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, (extra, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "s").exists()
