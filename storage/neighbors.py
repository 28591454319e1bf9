"""The ``neighbors`` and ``clusters`` tables: every sequence's k nearest neighbours in one vector set, computed
incrementally, and the connected components of that graph above a cosine threshold.

Files: ``neighbors/<model>-<sha>/<run>-<part>.parquet`` (one per chunk of sequences, committed atomically, so an
interrupted run keeps its finished chunks) and ``clusters/<model>-<sha>/layer<L>-<pooling>-k<k>-t<threshold>.parquet``
(recomputed whole and replaced atomically). A sequence is done for (model_sha, layer, pooling, k, min_cosine) when
it has a row for that key: reruns compute only the others, so (seq_hash, neighbor_hash) never repeats in a key,
and rewrite the lists of done sequences that the new ones enter, so no list goes stale.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage import objects
from storage.catalog import fetch_arrow, file_list, write_catalog
from storage.layout import write_table_atomic
from storage.schemas import CLUSTERS_SCHEMA, NEIGHBORS_SCHEMA
from storage.vectors import Hits, Searcher, VectorSet, iter_blocks, stored_hashes

NEIGHBOR_CHUNK = 16_384  # sequences per part file; without an index, one exact pass over the set per part


def _key_sql(vs: VectorSet, k: int, min_cosine: float | None) -> str:
    model = vs.model.replace("'", "''")
    threshold = "min_cosine IS NULL" if min_cosine is None else f"min_cosine = CAST({min_cosine!r} AS FLOAT)"
    return (
        f"model = '{model}' AND model_sha = '{vs.model_sha}' AND layer = {vs.layer} "
        f"AND pooling = '{vs.pooling.replace(chr(39), chr(39) * 2)}' AND k = {k} AND {threshold}"
    )


def done_hashes(vs: VectorSet, k: int, min_cosine: float | None = None) -> pa.Array:
    """Sequences that already have neighbour rows for this (set, k, min_cosine)."""
    files = vs.files("neighbors")
    if not files:
        return pa.array([], pa.string())
    con = objects.duckdb_connection()
    sql = (
        f"SELECT DISTINCT seq_hash FROM read_parquet({file_list(files)}) WHERE {_key_sql(vs, k, min_cosine)}"
    )
    return fetch_arrow(con, sql).column(0).combine_chunks()


def read_neighbors(vs: VectorSet, k: int, min_cosine: float | None = None, columns: str = "*") -> pa.Table:
    """The stored neighbour rows of this (set, k, min_cosine)."""
    files = vs.files("neighbors")
    if not files:
        return NEIGHBORS_SCHEMA.empty_table()
    con = objects.duckdb_connection()
    sql = f"SELECT {columns} FROM read_parquet({file_list(files)}) WHERE {_key_sql(vs, k, min_cosine)}"
    return fetch_arrow(con, sql)


@dataclass
class NeighborsRun:
    """What a neighbors run did."""

    run_id: str
    computed: int = 0
    updated: int = 0
    done_before: int = 0
    rows: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    clusters: dict | None = None


def _rows(
    vs: VectorSet, keys: list[str], hits: list[Hits], k: int, min_cosine: float | None, run_id: str
) -> pa.Table:
    seq, nbr, rank, cos = [], [], [], []
    for key, found in zip(keys, hits, strict=True):
        for r, (other, score) in enumerate(found, start=1):
            seq.append(key)
            nbr.append(other)
            rank.append(r)
            cos.append(score)
    n = len(seq)
    return pa.table(
        {
            "seq_hash": pa.array(seq, pa.string()),
            "neighbor_hash": pa.array(nbr, pa.string()),
            "rank": pa.array(rank, pa.int32()),
            "cosine": pa.array(cos, pa.float32()),
            "model": pa.array([vs.model] * n, pa.string()),
            "model_sha": pa.array([vs.model_sha] * n, pa.string()),
            "layer": pa.array([vs.layer] * n, pa.int16()),
            "pooling": pa.array([vs.pooling] * n, pa.string()),
            "k": pa.array([k] * n, pa.int32()),
            "min_cosine": pa.array([min_cosine] * n, pa.float32()),
            "run_id": pa.array([run_id] * n, pa.string()),
        },
        schema=NEIGHBORS_SCHEMA,
    )


@dataclass
class _Parts:
    """Writes a run's part files, numbered in order, each atomically."""

    vs: VectorSet
    run: NeighborsRun
    k: int
    part: int = 0

    def write(self, table: pa.Table) -> None:
        path = self.vs.table_dir("neighbors") / f"{self.run.run_id}-{self.part:05d}.parquet"
        write_table_atomic(
            path, table, "neighbors", {"run_id": self.run.run_id, "part": self.part, "k": self.k}
        )
        self.run.rows += table.num_rows
        self.run.files.append(str(path.relative_to(self.vs.root)))
        self.part += 1


def _chunks(vs: VectorSet, todo: pa.Array, size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """The vectors of the ``todo`` sequences, streamed in scan order, in chunks of ``size`` (the last smaller)."""
    taken: set[str] = set()
    keys: list[str] = []
    parts: list[np.ndarray] = []
    for block in iter_blocks(vs):
        wanted = pc.is_in(block.hashes, value_set=todo).to_numpy(zero_copy_only=False)
        names = block.hashes.to_pylist()
        pick = [i for i in np.flatnonzero(wanted) if names[i] not in taken]
        if not pick:
            continue
        taken.update(names[i] for i in pick)
        keys += [names[i] for i in pick]
        parts.append(block.vectors[pick])
        while len(keys) >= size:
            matrix = np.concatenate(parts)
            yield keys[:size], matrix[:size]
            keys, parts = keys[size:], [matrix[size:]]
    if keys:
        yield keys, np.concatenate(parts)


def compute_neighbors(
    vs: VectorSet,
    k: int,
    min_cosine: float | None = None,
    exact: bool = False,
    chunk: int = NEIGHBOR_CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> NeighborsRun:
    """Each sequence of the set lacking rows for (k, min_cosine): its ``k`` nearest other sequences, written
    as neighbors part files, using the set's index when present (plus an exact scan of what it does not cover).

    Sequences already done whose lists the new sequences enter are rewritten first (their old rows dropped,
    then their new lists written), so the table never goes stale, and a crash at any point leaves either
    the old rows or none, which the next run computes.
    """
    started = time.time()
    run = NeighborsRun(f"nn-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}")
    done = done_hashes(vs, k, min_cosine)
    everything = stored_hashes(vs)
    todo = pc.filter(everything, pc.invert(pc.is_in(everything, value_set=done)))
    run.done_before = len(everything) - len(todo)
    if not len(todo):
        return run
    parts = _Parts(vs, run, k)
    if len(done):
        for keys, matrix in _chunks(vs, todo, chunk):
            run.updated += _update_existing(vs, k, min_cosine, done, keys, matrix, parts)
    searcher = Searcher(vs, exact)  # the index, when there is one, is read once
    for keys, matrix in _chunks(vs, todo, chunk):
        hits = searcher.search(matrix, k, exclude=keys, min_cosine=min_cosine)
        parts.write(_rows(vs, keys, hits, k, min_cosine, run.run_id))
        run.computed += len(keys)
        if progress is not None:
            progress(run.computed, len(todo))
    run.seconds = round(time.time() - started, 3)
    write_catalog(
        vs.root
    )  # the first neighbors file of a model directory: catalog.sql answers for it at once
    return run


def _update_existing(
    vs: VectorSet,
    k: int,
    min_cosine: float | None,
    done: pa.Array,
    keys: list[str],
    matrix: np.ndarray,
    parts: _Parts,
) -> int:
    """Rewrite the lists of done sequences that new sequences (``keys``, unit ``matrix``) enter: one exact
    pass of the done vectors against the new ones. Returns how many lists changed."""
    con = objects.duckdb_connection()
    files = vs.files("neighbors")
    source = f"read_parquet({file_list(files)}, filename=true)"
    where = _key_sql(vs, k, min_cosine)
    state = {
        r["seq_hash"]: (r["n"], r["low"])
        for r in fetch_arrow(
            con, f"SELECT seq_hash, count(*) AS n, min(cosine) AS low FROM {source} WHERE {where} GROUP BY 1"
        ).to_pylist()
    }
    floor = -np.inf if min_cosine is None else np.float32(min_cosine)
    found: dict[str, list[tuple[str, float]]] = {}
    for block in iter_blocks(vs):
        rows = np.flatnonzero(pc.is_in(block.hashes, value_set=done).to_numpy(zero_copy_only=False))
        if not len(rows):
            continue
        names = block.hashes.take(pa.array(rows)).to_pylist()
        scores = block.vectors[rows] @ matrix.T
        bar = np.array([state[a][1] if a in state and state[a][0] >= k else floor for a in names], np.float32)
        enters = (scores > bar[:, None]) & (scores >= floor)
        for row in np.flatnonzero(enters.any(axis=1)):
            cols = np.flatnonzero(enters[row])
            best = cols[np.argsort(-scores[row, cols], kind="stable")[:k]]
            found.setdefault(names[row], []).extend((keys[c], float(scores[row, c])) for c in best)
    if not found:
        return 0
    con.register("affected", pa.table({"seq_hash": pa.array(sorted(found), pa.string())}))
    old = fetch_arrow(
        con,
        f"SELECT seq_hash, neighbor_hash, cosine, filename FROM {source} SEMI JOIN affected USING (seq_hash) "
        f"WHERE {where}",
    ).to_pylist()
    lists: dict[str, dict[str, float]] = {a: {} for a in found}
    for r in old:
        lists[r["seq_hash"]][r["neighbor_hash"]] = r["cosine"]
    for a, extra in found.items():
        for b, score in extra:
            lists[a][b] = max(score, lists[a].get(b, -np.inf))
    ordered = sorted(found)
    hits = [sorted(lists[a].items(), key=lambda kv: (-kv[1], kv[0]))[:k] for a in ordered]
    _drop_rows(
        vs, k, min_cosine, sorted({r["filename"] for r in old}), pa.array(ordered, pa.string()), parts.run
    )
    parts.write(_rows(vs, ordered, hits, k, min_cosine, parts.run.run_id))
    return len(ordered)


def _drop_rows(
    vs: VectorSet, k: int, min_cosine: float | None, files: list[str], hashes: pa.Array, run: NeighborsRun
) -> None:
    """Remove this key's rows of ``hashes`` from the given part files, each rewritten atomically."""
    for name in files:
        path = objects.as_path(name)
        table = objects.read_table(path)
        mask = pc.and_(
            pc.is_in(table.column("seq_hash"), value_set=hashes),
            pc.and_(pc.equal(table.column("k"), k), pc.equal(table.column("layer"), vs.layer)),
        )
        mask = pc.and_(mask, pc.equal(table.column("pooling"), vs.pooling))
        if min_cosine is None:
            mask = pc.and_(mask, pc.is_null(table.column("min_cosine")))
        else:
            mask = pc.and_(mask, pc.equal(table.column("min_cosine"), pa.scalar(min_cosine, pa.float32())))
        keep = table.filter(pc.invert(pc.fill_null(mask, False)))
        if keep.num_rows == table.num_rows:
            continue
        if keep.num_rows == 0:
            path.unlink(missing_ok=True)
            continue
        meta = json.loads((table.schema.metadata or {}).get(b"proteoflow.provenance", b"{}"))
        write_table_atomic(
            path, keep.replace_schema_metadata(None), "neighbors", {**meta, "rewritten_by": run.run_id}
        )


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on nodes 0..n-1: each node's smallest node index.

    Min-label hooking with pointer jumping, in numpy (O(edges) per round, few rounds).
    """
    labels = np.arange(n, dtype=np.int64)
    if not len(u):
        return labels
    while True:
        lu, lv = labels[u], labels[v]
        low = np.minimum(lu, lv)
        np.minimum.at(labels, lu, low)
        np.minimum.at(labels, lv, low)
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels[u], labels[v]):
            return labels


def clusters_path(vs: VectorSet, k: int, threshold: float) -> Path:
    return vs.table_dir("clusters") / f"layer{vs.layer}-{vs.pooling}-k{k}-t{threshold:g}.parquet"


def write_clusters(vs: VectorSet, k: int, threshold: float, min_cosine: float | None = None) -> dict:
    """Connected components of the k-nearest-neighbour graph (rows of this key) restricted to edges with
    cosine >= ``threshold``; every sequence of the set gets a row (singletons are their own cluster)."""
    edges = read_neighbors(vs, k, min_cosine, "seq_hash, neighbor_hash, cosine")
    edges = edges.filter(pc.greater_equal(edges.column("cosine"), pa.scalar(threshold, pa.float32())))
    nodes = pc.unique(
        pa.chunked_array(
            [stored_hashes(vs), *edges.column("seq_hash").chunks, *edges.column("neighbor_hash").chunks],
            pa.string(),
        )
    )
    nodes = pc.take(nodes, pc.sort_indices(nodes))
    u = pc.index_in(edges.column("seq_hash"), value_set=nodes).to_numpy(zero_copy_only=False)
    v = pc.index_in(edges.column("neighbor_hash"), value_set=nodes).to_numpy(zero_copy_only=False)
    labels = components(len(nodes), u.astype(np.int64), v.astype(np.int64))
    sizes = np.bincount(labels, minlength=len(nodes))
    n = len(nodes)
    table = pa.table(
        {
            "seq_hash": nodes,
            "cluster_id": pc.take(nodes, pa.array(labels)),
            "size": pa.array(sizes[labels], pa.int32()),
            "model": pa.array([vs.model] * n, pa.string()),
            "model_sha": pa.array([vs.model_sha] * n, pa.string()),
            "layer": pa.array([vs.layer] * n, pa.int16()),
            "pooling": pa.array([vs.pooling] * n, pa.string()),
            "k": pa.array([k] * n, pa.int32()),
            "threshold": pa.array([threshold] * n, pa.float32()),
        },
        schema=CLUSTERS_SCHEMA,
    )
    path = clusters_path(vs, k, threshold)
    write_table_atomic(path, table, "clusters", {"k": k, "threshold": threshold, "min_cosine": min_cosine})
    write_catalog(vs.root)
    clusters = int(np.count_nonzero(sizes))
    return {
        "clusters": clusters,
        "sequences": n,
        "largest": int(sizes.max()) if n else 0,
        "singletons": int(np.count_nonzero(sizes == 1)),
        "path": str(path.relative_to(vs.root)),
    }
