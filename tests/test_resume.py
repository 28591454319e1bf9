"""Resume trusts outputs, not records: a lost output file, a deleted plan or a damaged shard is recomputed,
and a run is `completed` only when the store holds every row its input needs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import ECOLI, write_slice

from flows.job import Job, PoolOptions
from flows.pipeline import embed_flow
from storage.catalog import query

OPTIONS = {"layers": [-1], "poolings": ["mean", "bos"], "precision": "fp32"}


@pytest.fixture(scope="module")
def slice_(tmp_path_factory) -> Path:
    return write_slice(
        ECOLI, tmp_path_factory.mktemp("in") / "e.fasta", start=11, count=30, step=53, max_length=400
    )


def job(store: Path, fasta: Path, model: Path) -> Job:
    return Job(kind="embed", store=str(store), inputs=[str(fasta)], model=str(model), engine_options=dict(OPTIONS),
               pool=PoolOptions(workers=2, cpus_per_worker=1, gpus_per_worker=0), progress=False)  # fmt: skip


def table_state(store: Path) -> tuple[int, int, int]:
    """(rows, distinct (seq_hash, layer, pooling), distinct sequences with members) of the embeddings view."""
    [(rows, keys)] = query(
        store, "SELECT count(*), count(DISTINCT (seq_hash, layer, pooling)) FROM embeddings"
    )[1]
    [(wanted,)] = query(store, "SELECT count(DISTINCT seq_hash) FROM members")[1]
    return rows, keys, wanted


def vectors(store: Path) -> dict:
    rows = query(store, "SELECT seq_hash, layer, pooling, embedding FROM embeddings")[1]
    return {(h, layer, p): hashlib.md5(str(v).encode()).hexdigest() for h, layer, p, v in rows}


def output_files(store: Path) -> list[Path]:
    return sorted((store / "embeddings").glob("*/*.parquet"))


def test_lost_output_is_recomputed(prefect_harness, ray_cluster, tiny_esm2, slice_, tmp_path) -> None:
    store = tmp_path / "store"
    first = embed_flow(job(store, slice_, tiny_esm2))
    before = vectors(store)
    victim = output_files(store)[1]
    victim.unlink()
    again = embed_flow(job(store, slice_, tiny_esm2))
    assert again.run_id == first.run_id and again.status == "completed"
    assert again.counts.shards_computed == 1  # only the shard whose output was lost
    rows, keys, wanted = table_state(store)
    assert rows == keys == 2 * wanted and vectors(store) == before


def test_deleted_plan_and_output_are_recomputed(
    prefect_harness, ray_cluster, tiny_esm2, slice_, tmp_path
) -> None:
    store = tmp_path / "store"
    first = embed_flow(job(store, slice_, tiny_esm2))
    before = vectors(store)
    [(old_max,)] = query(store, "SELECT max(shard_id) FROM shards")[1]
    output_files(store)[0].unlink()
    (store / "plans" / f"{first.run_id}.parquet").unlink()
    again = embed_flow(job(store, slice_, tiny_esm2))
    assert again.status == "completed" and vectors(store) == before
    rows, keys, wanted = table_state(store)
    assert rows == keys == 2 * wanted
    # the new plan numbers its shards after the old ones: no earlier output or record is overwritten
    [(new_min,)] = query(store, "SELECT min(shard_id) FROM shards WHERE attempt = 2")[1]
    assert new_min == old_max + 1


def test_output_without_its_record_is_recomputed_not_emptied(
    prefect_harness, ray_cluster, tiny_esm2, slice_, tmp_path
) -> None:
    """A crash between a shard's output and its record: the rerun recomputes the shard in full."""
    store = tmp_path / "store"
    first = embed_flow(job(store, slice_, tiny_esm2))
    before = vectors(store)
    (store / "shards" / f"run_id={first.run_id}" / "shard-00001.parquet").unlink()
    again = embed_flow(job(store, slice_, tiny_esm2))
    assert again.status == "completed" and again.counts.shards_computed == 1
    assert vectors(store) == before
    rows, keys, wanted = table_state(store)
    assert rows == keys == 2 * wanted


def test_damaged_own_output_is_quarantined_and_recomputed(
    prefect_harness, ray_cluster, tiny_esm2, slice_, tmp_path
) -> None:
    store = tmp_path / "store"
    embed_flow(job(store, slice_, tiny_esm2))
    before = vectors(store)
    victim = output_files(store)[2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    again = embed_flow(job(store, slice_, tiny_esm2))
    assert again.status == "completed"
    assert vectors(store) == before
    quarantined = list((store / "quarantine").rglob(victim.name))
    assert quarantined and quarantined[0].with_name(victim.name + ".why").exists()


def test_damaged_foreign_file_is_refused_with_one_line(
    prefect_harness, ray_cluster, tiny_esm2, slice_, tmp_path
) -> None:
    from flows.job import RunFailed
    from storage.results import DamagedStoreError

    store = tmp_path / "store"
    embed_flow(job(store, slice_, tiny_esm2))
    stray = output_files(store)[0].with_name("not-ours.parquet")
    stray.write_text("this is not parquet")
    with pytest.raises((DamagedStoreError, RunFailed)) as caught:
        embed_flow(job(store, slice_, tiny_esm2))
    assert "not-ours.parquet is damaged" in str(caught.value) and "proteoflow check" in str(caught.value)
