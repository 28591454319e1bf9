"""Stores on object storage: every command against a real S3-compatible server (SeaweedFS on loopback).

The same input is embedded into a local store and into ``s3://`` one; the rows must be equal. Objects are
written once under their final keys (no temporaries, no staging on the server), `check`, `runs`, `report`,
`sql` and a rerun work on the object store, a lock there admits one holder at a time, and what a user gets
wrong (no endpoint, unknown scheme, missing input object) is one line.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pyarrow.fs as pafs
import pytest
from conftest import ECOLI, run_cli, write_slice

from storage.catalog import query
from storage.layout import Store
from storage.locks import StoreLock
from storage.objects import ObjectPath

BUCKET = "proteoflow-tests"
OPTIONS = ["--layers", "-1,1", "--pooling", "mean,bos", "--per-residue", "--precision", "fp32",
           "--workers", "1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def proteome(tmp_path_factory):
    return write_slice(
        ECOLI, tmp_path_factory.mktemp("in") / "ecoli.fasta", count=20, step=200, max_length=300
    )


@pytest.fixture(scope="module")
def stores(s3_server, proteome, tiny_esm2, tmp_path_factory):
    """(local store, s3:// store), each with the same ingest and embed run."""
    local = str(tmp_path_factory.mktemp("local") / "store")
    remote = f"s3://{BUCKET}/store-{uuid.uuid4().hex[:8]}"
    for store in (local, remote):
        done = run_cli("embed", str(proteome), "--store", store, "--model", str(tiny_esm2), *OPTIONS)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
    return local, remote


def keys(uri: str) -> list[str]:
    path = ObjectPath(uri)
    infos = path.fs.get_file_info(pafs.FileSelector(path.location, recursive=True))
    return sorted(i.path[len(path.location) + 1 :] for i in infos if i.type == pafs.FileType.File)


def test_an_embed_run_on_s3_holds_the_rows_of_a_local_run(stores):
    local, remote = stores
    pooled = "SELECT seq_hash, layer, pooling, embedding FROM embeddings ORDER BY seq_hash, layer, pooling"
    assert len(query(remote, pooled)[1]) == 16 * 4  # 16 sequences x 2 layers x 2 poolings
    assert query(remote, pooled)[1] == query(local, pooled)[1]
    per_residue = "SELECT seq_hash, layer, embedding FROM residue_embeddings ORDER BY seq_hash, layer"
    assert query(remote, per_residue)[1] == query(local, per_residue)[1]
    [(status, counts)] = query(remote, "SELECT status, counts FROM runs WHERE kind = 'embed'")[1]
    assert status == "completed" and json.loads(counts)["shards_failed"] == 0


def test_objects_are_written_once_under_their_final_keys(stores):
    _, remote = stores
    found = keys(remote)
    assert not [k for k in found if k.endswith(".tmp") or k.startswith((".staging", "locks/"))], found
    assert "proteoflow.json" in found and "catalog.sql" in found
    records = [k for k in found if k.startswith("shards/run_id=embed-")]
    assert records, found
    # check reads every shard record's manifest and finds each output object where it says
    done = run_cli("check", "--store", remote)
    assert done.returncode == 0 and "is sound" in done.stdout.decode(), (
        done.stdout.decode() + done.stderr.decode()
    )


def test_sql_runs_report_and_a_rerun_work_on_s3(stores, tmp_path):
    _, remote = stores
    done = run_cli("sql", "SELECT count(*) AS n FROM sequences", "--store", remote)
    assert done.returncode == 0 and "16" in done.stdout.decode(), done.stderr.decode()
    done = run_cli("runs", "--store", remote)
    assert done.returncode == 0 and "completed" in done.stdout.decode()
    [(run_id,)] = query(remote, "SELECT run_id FROM runs WHERE kind = 'embed'")[1]
    out = tmp_path / "report.html"
    done = run_cli("report", run_id, "--store", remote, "--out", str(out))
    assert done.returncode == 0 and out.read_text().startswith("<!DOCTYPE html>"), done.stderr.decode()
    started = time.monotonic()
    again = run_cli("embed", *json.loads(query(remote, "SELECT params FROM runs WHERE kind = 'ingest'")[1][0][0])["inputs"],
                    "--store", remote, "--model", str(stores_model(remote)), *OPTIONS)  # fmt: skip
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert "nothing to compute" in again.stdout.decode() + again.stderr.decode()
    print(f"rerun with nothing to compute on s3: {time.monotonic() - started:.1f} s")


def stores_model(remote: str) -> str:
    [(params,)] = query(remote, "SELECT params FROM runs WHERE kind = 'embed'")[1]
    return json.loads(params)["model"]


def test_a_lock_on_an_object_store_admits_one_holder_at_a_time(s3_server):
    store = Store(f"s3://{BUCKET}/lock-{uuid.uuid4().hex[:8]}")
    counter = store.root / "counter"
    counter.write_text("0")
    inside, overlaps = [0], []

    def work() -> None:
        for _ in range(4):
            with StoreLock(store, "commit", timeout_s=120):
                inside[0] += 1
                overlaps.append(inside[0])
                value = int(counter.read_text())
                time.sleep(0.02)
                counter.write_text(str(value + 1))
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert counter.read_text() == "16" and max(overlaps) == 1
    assert not list((store.root / "locks").glob("*"))  # every holder removed its object


@pytest.mark.parametrize(
    ("store", "inputs", "env", "expected"),
    [
        ("ftp://host/store", None, {}, "--store ftp://host/store: not an object-store URI"),
        ("s3://{bucket}/s", "s3://{bucket}/no/such.fasta", {}, "s3://proteoflow-tests/no/such.fasta: no such object"),
        ("s3://{bucket}/s", None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "--store s3://proteoflow-tests/s: cannot write"),
    ],
)  # fmt: skip
def test_object_store_mistakes_are_one_line_and_quick(s3_server, proteome, store, inputs, env, expected):
    started = time.monotonic()
    source = (inputs or str(proteome)).format(bucket=BUCKET)
    done = run_cli("ingest", source, "--store", store.format(bucket=BUCKET), env=env)
    err = done.stderr.decode()
    assert done.returncode != 0 and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and time.monotonic() - started < 30


def test_fold_and_export_structures_on_s3(s3_server, proteome, tmp_path):
    from esm_core.random_esmfold import write_random_esmfold_checkpoint

    model = write_random_esmfold_checkpoint(tmp_path / "tiny_esmfold", tiny=True)
    remote = f"s3://{BUCKET}/fold-{uuid.uuid4().hex[:8]}"
    done = run_cli("fold", str(proteome), "--store", remote, "--model", str(model), "--max-length", "150",
                   "--workers", "1", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    [(folded,)] = query(remote, "SELECT count(*) FROM structures")[1]
    assert folded > 0
    out = tmp_path / "pdbs"
    done = run_cli("export-structures", "--store", remote, "--out", str(out))
    assert done.returncode == 0, done.stderr.decode()
    pdbs = sorted(out.glob("*.pdb"))
    assert len(pdbs) == folded and all("\nATOM  " in p.read_text() for p in pdbs)


def test_an_index_on_s3_answers_searches_like_an_exact_scan(stores):
    _, remote = stores
    model = stores_model(remote)
    [(seq_id,)] = query(remote, "SELECT seq_id FROM members ORDER BY seq_id LIMIT 1")[1]
    search = ["search", "--store", remote, "--model", model, "--layer", "2", "--pooling", "mean", "--id", seq_id,
              "--k", "5", "--format", "json"]  # fmt: skip
    exact = run_cli(*search, "--exact")
    assert exact.returncode == 0, exact.stderr.decode()
    built = run_cli("index", "--store", remote, "--model", model, "--layer", "2", "--pooling", "mean")
    assert built.returncode == 0, built.stderr.decode()
    assert json.loads(built.stdout.decode())["file"].endswith(".faiss")
    indexed = run_cli(*search)
    assert indexed.returncode == 0, indexed.stderr.decode()
    assert json.loads(indexed.stdout) == json.loads(exact.stdout) and len(json.loads(exact.stdout)) == 5


def test_check_finds_damage_on_s3_and_repair_quarantines_it(s3_server, proteome):
    remote = f"s3://{BUCKET}/check-{uuid.uuid4().hex[:8]}"
    assert run_cli("ingest", str(proteome), "--store", remote).returncode == 0
    (ObjectPath(remote) / "sequences" / "torn.parquet").write_bytes(b"PAR1 not a footer")
    (ObjectPath(remote) / "members" / "stray.txt").write_bytes(b"?")
    found = run_cli("check", "--store", remote)
    out = found.stdout.decode() + found.stderr.decode()
    assert (
        found.returncode == 1
        and "unreadable: sequences/torn.parquet" in out
        and "stray: members/stray.txt" in out
    )
    assert run_cli("check", "--store", remote, "--repair").returncode == 0
    assert run_cli("check", "--store", remote).returncode == 0
    moved = [k for k in keys(remote) if k.startswith("quarantine/")]
    assert any(k.endswith("sequences/torn.parquet") for k in moved) and any(k.endswith(".why") for k in moved)
    [(count,)] = query(remote, "SELECT count(*) FROM sequences")[1]
    assert count == 16  # the ingest's rows, none lost


def test_a_long_commit_keeps_its_lock_on_an_object_store(s3_server):
    """No pid can be checked across hosts, so a lock object older than stale_s counts as a dead holder's: a
    holder renews its object's time, and a second writer waits for the release instead of breaking in."""
    store = Store(f"s3://{BUCKET}/longlock-{uuid.uuid4().hex[:8]}")
    released, entered = [0.0], [0.0]
    with StoreLock(store, "commit", stale_s=1.0):
        waiter = threading.Thread(target=lambda: (StoreLock(store, "commit", stale_s=1.0).acquire(),
                                                  entered.__setitem__(0, time.monotonic())))  # fmt: skip
        waiter.start()
        time.sleep(3.0)  # three times stale_s
        released[0] = time.monotonic()
    waiter.join(timeout=60)
    assert entered[0] >= released[0] > 0


def test_a_second_run_over_stored_results_and_a_copied_file_on_s3(stores, tiny_esm2):
    """Another layer over a store that holds results (planning reads their footers), then a result file copied
    under a second key: check names the copy as a duplicate and --repair quarantines it."""
    _, remote = stores
    [(inputs,)] = query(remote, "SELECT params FROM runs WHERE kind = 'ingest'")[1]
    more = run_cli("embed", *json.loads(inputs)["inputs"], "--store", remote, "--model", str(tiny_esm2),
                   "--layers", "0", "--pooling", "mean", "--precision", "fp32", "--workers", "1", "--no-progress")  # fmt: skip
    assert more.returncode == 0, more.stderr.decode()[-2000:]
    [(layers,)] = query(remote, "SELECT count(DISTINCT layer) FROM embeddings")[1]
    assert layers == 3
    original = next(k for k in keys(remote) if k.startswith("embeddings/") and k.endswith(".parquet"))
    copy = ObjectPath(f"{remote}/{original}").with_name("copied-by-hand.parquet")
    copy.write_bytes(ObjectPath(f"{remote}/{original}").read_bytes())
    found = run_cli("check", "--store", remote)
    assert found.returncode == 1 and "duplicate: " in found.stdout.decode(), found.stdout.decode()
    assert run_cli("check", "--store", remote, "--repair").returncode == 0
    assert not copy.exists() and run_cli("check", "--store", remote).returncode == 0
