"""Embedding search on a real small store: E. coli records ingested, embedded in-process by a tiny random ESM-2,
searched exactly, through FAISS indexes, and as the neighbors/clusters tables; answers checked against numpy."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ECOLI, write_slice

from esm_core.checkpoints import load_esm
from esm_core.embedding import Embedder
from flows import cli_search
from flows import search as flow_search
from flows.errors import CliError
from storage import neighbors, vectors
from storage.ingest import ingest
from storage.layout import Store, write_table_atomic
from storage.normalize import normalize_text, seq_hash
from storage.runs import RunRecord
from storage.schemas import embeddings_schema

LAYERS, POOLINGS = (1, 2), ("mean", "bos")


def _embed_into(root: Path, loaded, items: list[tuple[str, str]], run_id: str) -> Path:
    """Write pooled vectors of ``items`` as one embeddings file, where and as the embed pipeline files them."""
    embedder = Embedder(loaded, layers=LAYERS, poolings=POOLINGS, precision="fp32")
    rows = [
        {
            "seq_hash": r.key,
            "model": loaded.name,
            "model_sha": loaded.sha,
            "layer": layer,
            "pooling": pooling,
            "embedding": vector.tolist(),
            "length": r.length,
            "strategy": r.strategy,
            "precision": r.precision,
            "run_id": run_id,
            "random_weights": loaded.random_weights,
        }
        for r in embedder.embed(items)
        for (layer, pooling), vector in sorted(r.pooled.items())
    ]
    table = pa.Table.from_pylist(rows, schema=embeddings_schema(loaded.dim))
    path = root / "embeddings" / f"{loaded.name}-{loaded.sha}" / f"{run_id}-00000.parquet"
    return write_table_atomic(path, table, "embeddings", {"run_id": run_id})


def _fasta_items(path: Path) -> list[tuple[str, str, str]]:
    """(seq_id, seq_hash, sequence) of each record of a FASTA file."""
    out = []
    for chunk in path.read_text().split(">")[1:]:
        header, *lines = chunk.splitlines()
        sequence = normalize_text("".join(lines))
        out.append((header.split()[0], seq_hash(sequence), sequence))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_esm2):
    """A store of ~200 E. coli proteins embedded at layers 1, 2 with mean and bos pooling, in two files."""
    tmp = tmp_path_factory.mktemp("search")
    fasta = write_slice(ECOLI, tmp / "ecoli.fasta", start=5, count=200, step=13, max_length=350)
    extra = write_slice(ECOLI, tmp / "extra.fasta", start=11, count=3, step=13, max_length=350)
    root = tmp / "store"
    ingest(Store(root), [str(fasta)], workers=0)
    loaded = load_esm(str(tiny_esm2))
    records = _fasta_items(fasta)
    items = sorted({(h, s) for _, h, s in records})
    _embed_into(root, loaded, items[: len(items) // 2], "embed-a")
    _embed_into(root, loaded, items[len(items) // 2 :], "embed-b")
    RunRecord(
        run_id="embed-a", kind="embed", params={"model": str(tiny_esm2), "identity": {"sha": loaded.sha}}
    ).save(Store(root))
    return {
        "root": root,
        "model": str(tiny_esm2),
        "name": loaded.name,
        "loaded": loaded,
        "records": records,
        "extra": [r for r in _fasta_items(extra) if r[1] not in {h for h, _ in items}],
        "extra_fasta": extra,
    }


@pytest.fixture
def store(base, tmp_path) -> Path:
    """A private copy of the base store, for tests that add indexes, files or tables."""
    return Path(shutil.copytree(base["root"], tmp_path / "store"))


def _set(root: Path, base: dict, layer: int = 2, pooling: str = "mean") -> vectors.VectorSet:
    return vectors.resolve(root, [base["name"]], layer=layer, pooling=pooling)


def _reference(vs: vectors.VectorSet) -> tuple[list[str], np.ndarray]:
    """Every stored vector of the set, unit length in float64, read with plain pyarrow."""
    table = pa.concat_tables(pq.read_table(p) for p in vs.files())
    rows = [r for r in table.to_pylist() if r["layer"] == vs.layer and r["pooling"] == vs.pooling]
    matrix = np.array([r["embedding"] for r in rows], np.float64)
    return [r["seq_hash"] for r in rows], matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def _assert_top_k(hits: vectors.Hits, cosines: np.ndarray, hashes: list[str], k: int) -> None:
    """``hits`` is a correct top-k: the reference's k best scores, each hash carrying its true cosine."""
    truth = dict(zip(hashes, cosines, strict=True))
    best = np.sort(cosines)[::-1][:k]
    assert len(hits) == min(k, len(hashes))
    np.testing.assert_allclose([s for _, s in hits], best, atol=1e-5)
    for key, score in hits:
        assert truth[key] == pytest.approx(score, abs=1e-5)
    assert len({key for key, _ in hits}) == len(hits)


def _recall(got: list[vectors.Hits], want: list[vectors.Hits]) -> float:
    return float(
        np.mean([len({h for h, _ in g} & {h for h, _ in w}) / len(w) for g, w in zip(got, want, strict=True)])
    )


# ------------------------------------------------------------------------------------------------ exact


def test_exact_search_equals_numpy_reference(base, monkeypatch):
    monkeypatch.setattr(vectors, "BLOCK_ROWS", 7)  # many blocks and query chunks: the streaming merge
    monkeypatch.setattr(vectors, "QUERY_CHUNK", 5)
    vs = _set(base["root"], base)
    hashes, matrix = _reference(vs)
    assert vs.rows == len(hashes) and vs.dim == base["loaded"].dim
    rng = np.random.default_rng(0)
    queries = np.concatenate([matrix[::17], rng.standard_normal((3, vs.dim))]).astype(np.float32)
    hits = vectors.search(vs, queries, 10, exact=True)
    for query, found in zip(queries, hits, strict=True):
        cosines = matrix @ (query / np.linalg.norm(query))
        _assert_top_k(found, cosines, hashes, 10)
    floor = hits[0][4][1] - 1e-6
    limited = vectors.search(vs, queries[:1], 10, exact=True, min_cosine=floor)[0]
    assert [h for h, _ in limited] == [h for h, s in hits[0] if s >= floor] and len(limited) >= 5
    assert all(s >= floor for _, s in limited)


def test_self_is_excluded_when_asked(base):
    vs = _set(base["root"], base)
    found = vectors.fetch(vs, [base["records"][0][1]])
    key = base["records"][0][1]
    with_self = vectors.search(vs, np.stack([found[key]]), 3, exact=True)[0]
    without = vectors.search(vs, np.stack([found[key]]), 3, exact=True, exclude=[key])[0]
    assert with_self[0] == (key, pytest.approx(1.0, abs=1e-5))
    assert key not in {h for h, _ in without} and without[:2] == with_self[1:]


# ---------------------------------------------------------------------------------------------- indexes


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "flat"])
def test_index_recall_against_exact(store, base, kind):
    vs = _set(store, base)
    info = vectors.build_index(vs, kind)
    assert info.kind == kind and info.count == len(set(_reference(vs)[0]))
    assert (vectors.index_dir(vs) / info.index_file).exists() and vectors.manifest_path(vs).exists()
    queries = np.stack(list(vectors.fetch(vs, vectors.stored_hashes(vs).to_pylist()).values()))
    exact = vectors.search(vs, queries, 10, exact=True)
    indexed = vectors.search(vs, queries, 10)
    assert vectors.load_index(vs).uncovered == []
    assert _recall(indexed, exact) >= 0.95
    # a rebuild replaces the index file: one per set
    again = vectors.build_index(vs, kind)
    assert [p.name for p in vectors.index_dir(vs).glob("*.faiss")] == [again.index_file]


def test_vectors_added_after_indexing_are_found_and_removed_ones_are_not(store, base):
    vs = _set(store, base)
    vectors.build_index(vs, "ivf")
    ingest(Store(store), [str(base["extra_fasta"])], workers=0)
    added = _embed_into(store, base["loaded"], [(h, s) for _, h, s in base["extra"]], "embed-c")
    vs = _set(store, base)
    loaded = vectors.load_index(vs)
    assert loaded.uncovered == [added] and not len(loaded.stale_ids)
    found = vectors.fetch(vs, [h for _, h, _ in base["extra"]])
    hits = vectors.search(vs, np.stack([found[h] for _, h, _ in base["extra"]]), 5)
    for (_, key, _), top in zip(base["extra"], hits, strict=True):
        assert top[0][0] == key and top[0][1] == pytest.approx(1.0, abs=1e-5)
    # a covered file removed after the build: its sequences are never returned from the stale index
    gone = vs.files()[0]
    lost = set(pq.read_table(gone, columns=["seq_hash"]).column(0).to_pylist())
    probe = vectors.fetch(vs, [sorted(lost)[0]])[sorted(lost)[0]]
    gone.unlink()
    assert len(vectors.load_index(vs).stale_ids) > 0
    hits = vectors.search(vs, np.stack([probe]), 20)[0]
    assert hits and not lost & {h for h, _ in hits}
    _, matrix = _reference(vs)
    assert hits[0][1] == pytest.approx(float(np.max(matrix @ (probe / np.linalg.norm(probe)))), abs=1e-5)


# --------------------------------------------------------------------------------------- query vectors


def test_on_the_fly_embedding_equals_stored_vector(base):
    vs = _set(base["root"], base)
    _, key, sequence = base["records"][3]
    fresh = flow_search.embed_sequences(vs, base["model"], [(key, sequence)])[key]
    stored = vectors.fetch(vs, [key])[key]
    cosine = float(fresh @ stored / np.linalg.norm(fresh))
    assert cosine > 0.9999


def test_query_not_in_store_is_embedded_with_the_recorded_checkpoint(base):
    vs = _set(base["root"], base)
    label, key, sequence = base["extra"][0]
    assert key not in set(vectors.stored_hashes(vs).to_pylist())
    # --model given as the stored name only: the checkpoint comes from the embed run that computed the set
    rows = flow_search.search(vs, [flow_search.query_from_sequence(sequence)], base["name"], k=5)
    own = flow_search.embed_sequences(vs, base["model"], [(key, sequence)])[key]
    hashes, matrix = _reference(vs)
    _assert_top_k([(r[2], r[3]) for r in rows], matrix @ (own / np.linalg.norm(own)), hashes, 5)
    assert [r[1] for r in rows] == [1, 2, 3, 4, 5] and all(r[0] == "sequence" for r in rows)


def test_checkpoint_with_other_weights_is_refused(base, tmp_path):
    from esm_core.random_weights import write_random_hf_checkpoint

    other = write_random_hf_checkpoint(tmp_path / "tiny_esm2", arch="tiny_esm2", seed=7)
    store_copy = Path(
        shutil.copytree(base["root"], tmp_path / "store", ignore=shutil.ignore_patterns("runs"))
    )
    vs = _set(store_copy, base)
    with pytest.raises(CliError, match="weights checksum") as err:
        flow_search.embed_sequences(vs, str(other), [("x", "MKTAYIAKQR")])
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- neighbors


def test_neighbors_incremental_without_duplicates(store, base):
    vs = _set(store, base)
    first = neighbors.compute_neighbors(vs, k=5)
    assert first.computed == vs.rows and first.done_before == 0
    again = neighbors.compute_neighbors(vs, k=5)
    assert again.computed == 0 and again.done_before == vs.rows and not again.files
    vectors.build_index(vs, "flat")  # the next run searches this exact index plus the files added after it
    ingest(Store(store), [str(base["extra_fasta"])], workers=0)
    _embed_into(store, base["loaded"], [(h, s) for _, h, s in base["extra"]], "embed-c")
    vs = _set(store, base)
    third = neighbors.compute_neighbors(vs, k=5, chunk=2)
    # two parts of new sequences; before each, the done lists that those sequences enter are rewritten
    assert third.computed == len(base["extra"]) and third.updated > 0 and len(third.files) == 4
    rows = neighbors.read_neighbors(vs, 5).to_pylist()
    pairs = [(r["seq_hash"], r["neighbor_hash"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == vs.rows * 5
    assert all(a != b for a, b in pairs)
    hashes, matrix = _reference(vs)
    index = {h: i for i, h in enumerate(hashes)}
    by_seq: dict[str, list] = {}
    for r in rows:
        by_seq.setdefault(r["seq_hash"], []).append(r)
    for key in hashes:  # every list, old ones included, is the exact top 5 of the store as it is now
        found = sorted(by_seq[key], key=lambda r: r["rank"])
        assert [r["rank"] for r in found] == [1, 2, 3, 4, 5]
        cosines = matrix @ matrix[index[key]]
        cosines[index[key]] = -np.inf
        _assert_top_k([(r["neighbor_hash"], r["cosine"]) for r in found], cosines, hashes, 5)


def test_clusters_are_components_above_the_threshold(store, base):
    vs = _set(store, base)
    neighbors.compute_neighbors(vs, k=3)
    edges = neighbors.read_neighbors(vs, 3).to_pylist()
    threshold = float(np.quantile([e["cosine"] for e in edges], 0.7))
    summary = neighbors.write_clusters(vs, 3, threshold)
    table = pq.read_table(store / summary["path"]).to_pylist()
    cluster = {r["seq_hash"]: r["cluster_id"] for r in table}
    assert len(cluster) == len(table) == vs.rows
    strong = [(e["seq_hash"], e["neighbor_hash"]) for e in edges if e["cosine"] >= np.float32(threshold)]
    assert strong and all(cluster[a] == cluster[b] for a, b in strong)
    members: dict[str, list[str]] = {}
    for key, cid in cluster.items():
        members.setdefault(cid, []).append(key)
    assert all(cid == min(keys) for cid, keys in members.items())
    assert all(r["size"] == len(members[r["cluster_id"]]) for r in table)
    assert 1 < summary["clusters"] < vs.rows and summary["clusters"] == len(members)
    # each cluster is connected by strong edges: no two components were merged
    parent = {key: key for key in cluster}

    def root(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in strong:
        parent[root(a)] = root(b)
    assert len({root(x) for x in cluster}) == summary["clusters"]


def test_components_of_a_small_graph():
    u = np.array([0, 1, 5, 6, 3])
    v = np.array([1, 2, 4, 5, 3])
    assert neighbors.components(8, u, v).tolist() == [0, 0, 0, 3, 4, 4, 4, 7]


# --------------------------------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="proteoflow")
    cli_search.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_cli_search_by_id_lists_neighbours_with_record_ids(base, capsys):
    seq_id, key, _ = base["records"][0]
    root = str(base["root"])
    argv = ["search", "--store", root, "--model", base["model"], "--layer", "2", "--pooling", "mean"]
    assert _cli(*argv, "--id", seq_id, "--k", "4", "--exact", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and {r["query"] for r in rows} == {seq_id}
    assert rows[0]["seq_hash"] == key and rows[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert seq_id in rows[0]["ids"] and all(r["length"] > 0 and r["ids"] for r in rows)
    assert len({r["seq_hash"] for r in rows}) == 4


def test_cli_index_then_search_fasta(store, base, capsys):
    common = ["--store", str(store), "--model", base["name"], "--layer", "1", "--pooling", "bos"]
    assert _cli("index", *common, "--kind", "hnsw") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "hnsw" and info["vectors"] == _set(store, base, 1, "bos").rows
    assert (store / info["file"]).is_file() and info["recall_at_10"] >= 0.95
    assert _cli("search", *common, "--fasta", str(base["extra_fasta"]), "--k", "2", "--format", "csv") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query,rank,seq_hash,cosine,length,ids" and len(lines) == 1 + 2 * len(base["extra"])


def test_cli_neighbors_with_clusters(store, base, capsys):
    argv = ["neighbors", "--store", str(store), "--model", base["model"], "--layer", "2", "--pooling", "mean"]
    assert _cli(*argv, "--k", "4", "--clusters", "0.99", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["computed"] == summary["rows"] // 4 > 0
        and summary["clusters"]["sequences"] == summary["computed"]
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--id", "no-such-record"], "unknown id 'no-such-record'"),
        (["--model", "esm2_t6_8M_UR50D", "--sequence", "MKV"], "no embeddings of model 'esm2_t6_8M_UR50D'"),
        (["--pooling", "mean", "--sequence", "MKV"], "several layers stored"),
        (["--layer", "2", "--sequence", "MKV"], "several poolings stored"),
        (["--layer", "3", "--pooling", "mean", "--sequence", "MKV"], "layer 3 not stored"),
        (["--model-sha", "ffff", "--layer", "2", "--pooling", "mean", "--sequence", "MKV"], "matches none"),
        (["--layer", "2", "--pooling", "mean", "--sequence", "MK1V"], "digit '1' at position 3"),
    ],
)
def test_cli_one_line_errors(base, argv, message):
    head = ["search", "--store", str(base["root"]), "--model", base["model"]]
    if "--model" in argv:
        head = head[:3]
    if "--id" in argv:
        argv = ["--layer", "2", "--pooling", "mean", *argv]
    with pytest.raises(CliError) as err:
        _cli(*head, *argv)
    assert message in str(err.value) and "\n" not in str(err.value)
