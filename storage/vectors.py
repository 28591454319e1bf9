"""Pooled embedding vectors of one (model, weights, layer, pooling): found in the store, streamed from its
Parquet files in bounded blocks, and searched by cosine, exactly or through a FAISS index kept in the store.

An index never makes results stale: its manifest records the files (path, size, mtime) it covers, and a search
also scans exactly the vectors of files added or changed since, leaving out index entries of files that
changed or vanished. Imports no model code; faiss is imported only by the index functions.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import objects
from storage.catalog import fetch_arrow, file_list
from storage.layout import Store, commit, write_bytes_atomic, write_table_atomic
from storage.objects import ObjectPath, StorePath, as_path

BLOCK_ROWS = 8192  # rows decoded at a time: 8192 x 1280 floats = 42 MB
QUERY_CHUNK = 2048  # queries scored against one block at a time: a 2048 x 8192 score matrix = 67 MB
FILTER_COLUMNS = ["seq_hash", "model", "model_sha", "layer", "pooling"]
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
FLAT_BELOW = 50_000  # auto: an exact flat index below this many vectors, IVF above
TARGET_RECALL = 0.97  # build-time calibration target for recall@10 against the exact answer
CALIBRATION_QUERIES = 200
CALIBRATION_K = 10
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80


class VectorError(Exception):
    """A user-facing problem with the vectors asked for (absent, ambiguous); the message is one line."""


# ------------------------------------------------------------------------------------------ vector sets


@dataclass(frozen=True)
class VectorSet:
    """The stored vectors of one (model, model_sha, layer, pooling): what a search or an index covers."""

    root: StorePath
    model: str
    model_sha: str
    layer: int
    pooling: str
    dim: int
    rows: int
    directory: str  # the model identity's directory name, ``<model>-<sha>``, in embeddings/ and beside it
    precision: str = "fp32"
    strategies: tuple[str, ...] = ()

    @property
    def store(self) -> Store:
        return Store(self.root)

    @property
    def label(self) -> str:
        return f"{self.model} (weights {self.model_sha}) layer {self.layer} {self.pooling}"

    def table_dir(self, table: str) -> Path:
        """This model identity's directory of ``table`` (embeddings, indexes, neighbors, clusters)."""
        return self.root / table / self.directory

    def files(self, table: str = "embeddings") -> list[Path]:
        """The committed Parquet files of this model identity in ``table`` (hidden temporaries excluded)."""
        return sorted(p for p in self.table_dir(table).glob("*.parquet") if not p.name.startswith("."))

    def row_mask(self, batch: pa.RecordBatch | pa.Table) -> pa.Array:
        """Which rows of a batch of this identity's files belong to this set."""
        mask = pc.and_(
            pc.and_(
                pc.equal(batch.column("model"), self.model),
                pc.equal(batch.column("model_sha"), self.model_sha),
            ),
            pc.and_(
                pc.equal(batch.column("layer"), self.layer), pc.equal(batch.column("pooling"), self.pooling)
            ),
        )
        return pc.fill_null(mask, False)


def _safe_names(name: str) -> set[str]:
    """The file-system spellings a model name may have as a directory (this and earlier writers')."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return {base.strip("._") or "model", base.strip("._-")[:100].rstrip("._-")}


def _model_dirs(store: Store, names: Sequence[str]) -> list[Path]:
    """Embeddings directories ``<model>-<sha>`` that may hold ``names`` (all of them when none matches by
    name; the rows' ``model`` column decides)."""
    base = store.table_dir("embeddings")
    if not base.is_dir():
        return []
    dirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    wanted = set().union(*(_safe_names(n) for n in names))
    return [d for d in dirs if d.name.rsplit("-", 1)[0] in wanted] or dirs


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def stored_models(store: Store) -> list[str]:
    """Model names with embeddings in the store (read from the files: for error messages)."""
    files = store.files("embeddings")
    if not files:
        return []
    con = objects.duckdb_connection()
    table = fetch_arrow(con, f"SELECT DISTINCT model FROM read_parquet({file_list(files)}) ORDER BY 1")
    return table.column(0).to_pylist()


def describe(store: Store, names: Sequence[str]) -> pa.Table:
    """One row per stored (model, model_sha, layer, pooling) of these model names: counts, dim, precision."""
    files = [
        p
        for d in _model_dirs(store, names)
        for p in sorted(d.glob("*.parquet"))
        if not p.name.startswith(".")
    ]
    if not files:
        return pa.table({"model": pa.array([], pa.string())})
    con = objects.duckdb_connection()
    wanted = ", ".join(_sql_text(n) for n in names)
    table = fetch_arrow(
        con,
        f"""SELECT model, model_sha, layer, pooling, count(*) AS n, mode(precision) AS precision,
                   list(DISTINCT strategy ORDER BY strategy) AS strategies, min(filename) AS first_file
            FROM read_parquet({file_list(files)}, filename=true) WHERE model IN ({wanted})
            GROUP BY ALL ORDER BY model, model_sha, layer, pooling""",
    )
    return table


def _dim_of(path: str) -> int:
    return pq.read_schema(path).field("embedding").type.list_size


def resolve(
    root: str | Path,
    names: Sequence[str],
    model_sha: str | None = None,
    layer: int | None = None,
    pooling: str | None = None,
) -> VectorSet:
    """The one vector set meant by a model name (or its aliases), optional weights checksum, layer and pooling.

    Refuses, in one line, a model with no embeddings, several weights for one name without ``model_sha``
    (a unique prefix is enough), and several layers or poolings when none is given.
    """
    store = Store(root)
    if not store.exists():
        raise VectorError(
            f"{root}: not a proteoflow store (no proteoflow.json); run `proteoflow ingest` first"
        )
    rows = describe(store, names).to_pylist()
    if not rows:
        stored = stored_models(store)
        listing = ", ".join(stored) if stored else "none"
        raise VectorError(
            f"no embeddings of model {names[0]!r} in {root} (models with embeddings: {listing})"
        )
    shas = sorted({r["model_sha"] for r in rows})
    if model_sha is not None:
        picked = [s for s in shas if s.startswith(model_sha)]
        if len(picked) != 1:
            raise VectorError(
                f"model sha {model_sha!r} {'matches none' if not picked else 'is ambiguous'} "
                f"among the stored weights of {names[0]!r}: {', '.join(shas)}"
            )
        shas = picked
    elif len(shas) > 1:
        raise VectorError(
            f"model {names[0]!r} has embeddings from {len(shas)} different weights ({', '.join(shas)}); "
            "pass --model-sha"
        )
    rows = [r for r in rows if r["model_sha"] == shas[0]]
    rows = _pick(rows, "layer", layer, names[0])
    rows = _pick(rows, "pooling", pooling, names[0])
    row = rows[0]
    return VectorSet(
        root=as_path(root),
        model=row["model"],
        model_sha=row["model_sha"],
        layer=int(row["layer"]),
        pooling=row["pooling"],
        dim=_dim_of(row["first_file"]),
        rows=int(sum(r["n"] for r in rows)),
        directory=Path(row["first_file"]).parent.name,
        precision=row["precision"] or "fp32",
        strategies=tuple(s for s in row["strategies"] if s),
    )


def _pick(rows: list[dict], column: str, wanted: object, model: str) -> list[dict]:
    values = sorted({r[column] for r in rows})
    shown = ", ".join(str(v) for v in values)
    if wanted is None:
        if len(values) > 1:
            raise VectorError(f"several {column}s stored for model {model!r} ({shown}); pass --{column}")
        return rows
    kept = [r for r in rows if r[column] == wanted]
    if not kept:
        raise VectorError(f"{column} {wanted} not stored for model {model!r} (stored: {shown})")
    return kept


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Block:
    """Consecutive stored vectors of one file: their seq_hash values and unit-length float32 rows."""

    hashes: pa.Array
    vectors: np.ndarray
    file: int  # index into the file list that was read


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, a new array); zero rows stay zero."""
    out = np.array(vectors, dtype=np.float32, copy=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _matrix(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return unit_rows(flat.reshape(-1, dim))


def iter_blocks(
    vs: VectorSet, files: Sequence[Path] | None = None, block_rows: int | None = None
) -> Iterator[Block]:
    """Stream the set's vectors file by file in record batches of ``block_rows`` (default BLOCK_ROWS):
    memory holds one batch."""
    block_rows = block_rows or BLOCK_ROWS
    for number, path in enumerate(vs.files() if files is None else files):
        try:
            reader = objects.parquet_file(path)
        except FileNotFoundError:
            continue  # removed since it was listed: its vectors are gone
        for batch in reader.iter_batches(batch_size=block_rows, columns=[*FILTER_COLUMNS, "embedding"]):
            rows = batch.filter(vs.row_mask(batch))
            if rows.num_rows:
                yield Block(rows.column("seq_hash"), _matrix(rows.column("embedding"), vs.dim), number)


def stored_hashes(vs: VectorSet) -> pa.Array:
    """Distinct seq_hash values of the set (reads no vectors)."""
    files = vs.files()
    if not files:
        return pa.array([], pa.string())
    con = objects.duckdb_connection()
    sql = (
        f"SELECT DISTINCT seq_hash FROM read_parquet({file_list(files)}) WHERE model = {_sql_text(vs.model)} "
        f"AND model_sha = {_sql_text(vs.model_sha)} AND layer = {vs.layer} AND pooling = {_sql_text(vs.pooling)}"
    )
    return fetch_arrow(con, sql).column(0).combine_chunks()


def fetch(vs: VectorSet, hashes: Iterable[str]) -> dict[str, np.ndarray]:
    """Unit vectors of the given sequences that the set holds; only row groups holding them are decoded."""
    wanted = pa.array(sorted(set(hashes)), pa.string())
    found: dict[str, np.ndarray] = {}
    if not len(wanted):
        return found
    for path in vs.files():
        reader = objects.parquet_file(path)
        for group in range(reader.num_row_groups):
            keys = reader.read_row_group(group, columns=FILTER_COLUMNS)
            hit = pc.and_(vs.row_mask(keys), pc.is_in(keys.column("seq_hash"), value_set=wanted))
            if not pc.any(hit).as_py():
                continue
            rows = reader.read_row_group(group, columns=["seq_hash", "embedding"]).filter(hit)
            vectors = _matrix(rows.column("embedding"), vs.dim)
            for key, vector in zip(rows.column("seq_hash").to_pylist(), vectors, strict=True):
                found.setdefault(key, vector)
    return found


# ------------------------------------------------------------------------------------------ exact search


class TopK:
    """The ``k`` best (cosine, seq_hash) per query over the blocks seen so far."""

    def __init__(self, queries: int, k: int, missing: object = None) -> None:
        """``missing`` fills empty places: None for seq_hash names, -1 for integer ids."""
        self.k = k
        self.scores = np.full((queries, k), -np.inf, np.float32)
        self.hashes = np.full((queries, k), missing, object if missing is None else np.int64)

    def add(self, rows: slice, scores: np.ndarray, hashes: np.ndarray) -> None:
        """Merge a (queries in ``rows``) x (block) score matrix whose columns are ``hashes``."""
        k = self.k
        if scores.shape[1] > k:
            pick = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, names = np.take_along_axis(scores, pick, axis=1), hashes[pick]
        else:
            names = np.broadcast_to(hashes, scores.shape)
        both = np.concatenate([self.scores[rows], scores], axis=1)
        both_names = np.concatenate([self.hashes[rows], names], axis=1)
        pick = np.argpartition(-both, k - 1, axis=1)[:, :k]
        self.scores[rows] = np.take_along_axis(both, pick, axis=1)
        self.hashes[rows] = np.take_along_axis(both_names, pick, axis=1)


def exact_scan(
    vs: VectorSet,
    queries: np.ndarray,
    k: int,
    files: Sequence[Path] | None = None,
    exclude: Sequence[str | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (cosine, seq_hash) of unit ``queries`` over the set's vectors (or those of ``files``), in one
    streaming pass; ``exclude[i]`` is a seq_hash query i must not get back (itself)."""
    top = TopK(len(queries), k)
    own: dict[str, list[int]] = {}
    for i, key in enumerate(exclude or ()):
        if key is not None:
            own.setdefault(key, []).append(i)
    own_keys = pa.array(list(own), pa.string())
    for block in iter_blocks(vs, files):
        names = np.asarray(block.hashes.to_pylist(), dtype=object)
        masked: list[tuple[int, int]] = []
        if len(own_keys):
            for j in np.flatnonzero(
                pc.is_in(block.hashes, value_set=own_keys).to_numpy(zero_copy_only=False)
            ):
                masked += [(i, int(j)) for i in own[names[j]]]
        for start in range(0, len(queries), QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, len(queries))
            scores = queries[start:stop] @ block.vectors.T
            for i, j in masked:
                if start <= i < stop:
                    scores[i - start, j] = -np.inf
            top.add(slice(start, stop), scores, names)
    return top.scores, top.hashes


Hits = list[tuple[str, float]]


def merge_hits(
    k: int, parts: Sequence[tuple[np.ndarray, np.ndarray]], min_cosine: float | None = None
) -> list[Hits]:
    """Per query, the best ``k`` distinct sequences over several (scores, hashes) results, best first
    (ties by seq_hash), at or above ``min_cosine``."""
    queries = len(parts[0][0]) if parts else 0
    out: list[Hits] = []
    for i in range(queries):
        best: dict[str, float] = {}
        for scores, hashes in parts:
            for key, score in zip(hashes[i], scores[i], strict=True):
                if key is None or not math.isfinite(score):
                    continue
                if score > best.get(key, -math.inf):
                    best[key] = float(score)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
        if min_cosine is not None:
            ranked = [kv for kv in ranked if kv[1] >= min_cosine]
        out.append(ranked[:k])
    return out


# ------------------------------------------------------------------------------------------ index files


def index_dir(vs: VectorSet) -> StorePath:
    return vs.table_dir("indexes")


def manifest_path(vs: VectorSet) -> StorePath:
    """The index's manifest: seq_hash per FAISS id, and in its footer what the index covers."""
    return index_dir(vs) / f"layer{vs.layer}-{vs.pooling}.parquet"


FileState = tuple[int, int]  # (size, mtime_ns)


def _file_states(vs: VectorSet, files: Sequence[Path]) -> dict[str, FileState]:
    states = {}
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        states[str(path.relative_to(vs.root))] = (st.st_size, st.st_mtime_ns)
    return states


@dataclass
class IndexInfo:
    """What an index file holds and how it was built (the manifest's footer)."""

    kind: str
    index_file: str
    count: int
    dim: int
    params: dict
    recall: float | None
    files: dict[str, FileState]
    built_at: float
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds per build step: train, add, calibrate, write

    def to_json(self) -> dict:
        return {**self.__dict__, "files": [[p, *s] for p, s in sorted(self.files.items())]}

    @classmethod
    def from_json(cls, data: dict) -> IndexInfo:
        files = {p: (int(size), int(mtime)) for p, size, mtime in data["files"]}
        known = set(cls.__dataclass_fields__) - {"files"}
        return cls(**{k: v for k, v in data.items() if k in known}, files=files)


def _pick_kind(kind: str, rows: int) -> str:
    if kind not in INDEX_KINDS:
        raise VectorError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if rows < FLAT_BELOW else "ivf"


def ivf_lists(rows: int) -> int:
    """Inverted lists for ``rows`` vectors: about sqrt(rows), with at least 39 training points per list."""
    return max(1, min(int(math.sqrt(rows)), rows // 39))


@dataclass
class _Build:
    """State of one streaming pass that fills an index."""

    hashes: list[str] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    probes: list[np.ndarray] = field(default_factory=list)  # calibration queries (flat, HNSW)
    probe_ids: list[int] = field(default_factory=list)  # each calibration query's own id (-1: a duplicate)


def _sample_positions(rows: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=min(rows, count), replace=False))


def _samples(vs: VectorSet, files: Sequence[Path], *positions: np.ndarray) -> list[np.ndarray]:
    """The vectors at the given scan positions (sorted), for each set of positions, in one streaming pass."""
    taken: list[list[np.ndarray]] = [[] for _ in positions]
    offset = 0
    for block in iter_blocks(vs, files):
        n = len(block.vectors)
        for out, where in zip(taken, positions, strict=True):
            lo, hi = np.searchsorted(where, [offset, offset + n])
            if hi > lo:
                out.append(block.vectors[where[lo:hi] - offset])
        offset += n
    return [np.concatenate(t) if t else np.zeros((0, vs.dim), np.float32) for t in taken]


def build_index(
    vs: VectorSet, kind: str = "auto", progress: Callable[[int], None] | None = None
) -> IndexInfo:
    """Build a FAISS index of the set's current vectors (cosine = inner product of unit vectors) and commit
    it with its manifest, each atomically; an earlier index of the set is replaced.

    IVF and HNSW search parameters (nprobe, efSearch) are calibrated on the set's own vectors: the smallest
    reaching recall@10 >= TARGET_RECALL against the exact answer.
    """
    import faiss

    started = time.time()
    files = vs.files()
    states = _file_states(vs, files)  # before reading: a file changed during the build counts as changed
    kind = _pick_kind(kind, vs.rows)
    d = vs.dim
    probes = _sample_positions(max(vs.rows, 1), CALIBRATION_QUERIES, seed=2)  # scan positions
    truth: TopK | None = None
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        params: dict = {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
    else:
        nlist = ivf_lists(vs.rows)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True
        sample, probe_vectors = _samples(vs, files, _sample_positions(vs.rows, 40 * nlist, seed=1), probes)
        truth = TopK(len(probe_vectors), CALIBRATION_K + 1, missing=-1)  # exact answers, filled while adding
        if len(sample) < nlist:
            raise VectorError(f"too few vectors ({len(sample)}) to train an IVF index; use --kind flat")
        index.train(sample)
        params = {"nlist": nlist}
    phases = {"train": time.time() - started}
    state = _Build()
    offset = 0
    for block in iter_blocks(vs, files):
        keys = block.hashes.to_pylist()
        keep = [i for i, key in enumerate(keys) if key not in state.seen]
        state.seen.update(keys)
        n = len(block.vectors)
        ids = np.full(n, -1, np.int64)
        ids[keep] = len(state.hashes) + np.arange(len(keep))
        lo, hi = np.searchsorted(probes, [offset, offset + n])
        state.probe_ids += ids[probes[lo:hi] - offset].tolist()
        if truth is None:
            state.probes += list(block.vectors[probes[lo:hi] - offset])
        offset += n
        if not keep:
            continue
        added = block.vectors[keep] if len(keep) < n else block.vectors
        index.add(added)
        if truth is not None and len(probe_vectors):
            truth.add(slice(None), probe_vectors @ added.T, ids[keep])
        state.hashes += [keys[i] for i in keep]
        state.files += [block.file] * len(keep)
        if progress is not None:
            progress(len(state.hashes))
    if not state.hashes:
        raise VectorError(f"no vectors for {vs.label}: nothing to index")
    phases["add"] = time.time() - started - sum(phases.values())
    recall = 1.0
    if kind != "flat":
        if truth is None:
            probe_vectors = np.stack(state.probes) if state.probes else np.zeros((0, d), np.float32)
            truth_ids = faiss.downcast_index(index.storage).search(probe_vectors, CALIBRATION_K + 1)[1]
        else:
            order = np.argsort(-truth.scores, axis=1, kind="stable")
            truth_ids = np.take_along_axis(truth.hashes, order, axis=1)
        recall, tuned = _calibrate(index, kind, probe_vectors, truth_ids, state.probe_ids, params)
        params.update(tuned)
    phases["calibrate"] = time.time() - started - sum(phases.values())
    build = uuid.uuid4().hex[:12]
    info = IndexInfo(
        kind=kind,
        index_file=f"layer{vs.layer}-{vs.pooling}-{build}.faiss",
        count=len(state.hashes),
        dim=d,
        params=params,
        recall=recall,
        files=states,
        built_at=time.time(),
    )
    folder = index_dir(vs)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(folder, ObjectPath):  # one whole-object upload of the serialized index
        write_bytes_atomic(folder / info.index_file, faiss.serialize_index(index).tobytes())
    else:
        temp = folder / f".{info.index_file}.tmp"
        faiss.write_index(index, str(temp))
        commit(temp, folder / info.index_file)
    names = [str(p.relative_to(vs.root)) for p in files]
    file_ids = {name: i for i, name in enumerate(sorted(states))}
    manifest = pa.table(
        {
            "seq_hash": pa.array(state.hashes, pa.string()),
            "file": pa.array([file_ids.get(names[f], -1) for f in state.files], pa.int32()),
        }
    )
    info.seconds = round(time.time() - started, 3)
    phases["write"] = time.time() - started - sum(phases.values())
    info.phases = {name: round(value, 3) for name, value in phases.items()}
    write_table_atomic(manifest_path(vs), manifest, "vector_index", info.to_json())
    for old in folder.glob(f"layer{vs.layer}-{vs.pooling}-*.faiss"):
        if old.name != info.index_file:
            old.unlink(missing_ok=True)
    return info


def _search_params(kind: str, value: int, selector=None):
    import faiss

    if kind == "ivf":
        params = faiss.SearchParametersIVF()
        params.nprobe = value
    elif kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        params.efSearch = value
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


def _without(ids: Sequence[int], own: int, k: int) -> set[int]:
    """The first ``k`` ids of a ranked list, the probe's own id and empty places (-1) left out."""
    return set([i for i in ids if i != own and i >= 0][:k])


def _calibrate(
    index, kind: str, probes: np.ndarray, truth: np.ndarray, own: list[int], params: dict
) -> tuple[float, dict]:
    """The smallest nprobe / efSearch whose recall@10 against ``truth`` (exact ranked ids; each probe's own
    vector left out) reaches TARGET_RECALL."""
    k = CALIBRATION_K
    if kind == "ivf":
        ladder, name, top = [2**i for i in range(20)], "nprobe", params["nlist"]
    else:
        ladder, name, top = [16 * 2**i for i in range(8)], "efSearch", 2048
    want = [_without(row, me, k) for row, me in zip(truth, own, strict=True)]
    recall, value = 1.0, top
    for value in [v for v in ladder if v < top] + [top]:
        _, got = index.search(probes, k + 1, params=_search_params(kind, value))
        found = [
            len(w & _without(g, me, k)) / max(len(w), 1) for w, g, me in zip(want, got, own, strict=True)
        ]
        recall = float(np.mean(found)) if found else 1.0
        if recall >= TARGET_RECALL:
            break
    return round(recall, 4), {name: int(value)}


@dataclass
class LoadedIndex:
    """An index read back with its manifest, and how it relates to the set's current files."""

    info: IndexInfo
    index: object
    hashes: np.ndarray  # seq_hash per FAISS id
    stale_ids: np.ndarray  # ids whose file changed or vanished since the build: never returned
    uncovered: list[Path]  # files added or changed since the build: scanned exactly

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (cosine, seq_hash) of unit queries from the index alone, stale entries left out."""
        import faiss

        selector = None
        if len(self.stale_ids):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.stale_ids))
        kind = self.info.kind
        value = self.info.params.get("nprobe" if kind == "ivf" else "efSearch", 0)
        if kind == "hnsw":
            value = max(value, k)
        params = _search_params(kind, value, selector)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        names = np.where(ids >= 0, self.hashes[np.maximum(ids, 0)], None)
        return scores, names.astype(object)


def read_info(vs: VectorSet) -> IndexInfo | None:
    """The set's index description, or None when it has no index."""
    path = manifest_path(vs)
    if not path.exists():
        return None
    meta = objects.parquet_file(path).schema_arrow.metadata or {}
    return IndexInfo.from_json(json.loads(meta[b"proteoflow.provenance"]))


def load_index(vs: VectorSet) -> LoadedIndex | None:
    """The set's index with the files it does not cover, or None when it has none."""
    import faiss

    for _ in range(3):  # a rebuild may replace the index between reading its manifest and its file
        path = manifest_path(vs)
        if not path.exists():
            return None
        table = objects.read_table(path)
        info = IndexInfo.from_json(json.loads(table.schema.metadata[b"proteoflow.provenance"]))
        index_path = index_dir(vs) / info.index_file
        try:
            if isinstance(index_path, ObjectPath):
                index = faiss.deserialize_index(np.frombuffer(index_path.read_bytes(), dtype=np.uint8))
            else:
                index = faiss.read_index(str(index_path))
        except (RuntimeError, OSError):
            continue
        break
    else:
        raise VectorError(f"the index of {vs.label} keeps changing while being read; try again")
    now = _file_states(vs, vs.files())
    covered = sorted(info.files)
    changed = {p for p in covered if now.get(p) != info.files[p]}
    bad_ids = [i for i, p in enumerate(covered) if p in changed]
    file_col = table.column("file").to_numpy()
    stale = np.flatnonzero(np.isin(file_col, bad_ids) | (file_col < 0)).astype(np.int64)
    uncovered = [vs.root / p for p in sorted(now) if p not in info.files or p in changed]
    hashes = np.asarray(table.column("seq_hash").to_pylist(), dtype=object)
    return LoadedIndex(info, index, hashes, stale, uncovered)


class Searcher:
    """Cosine search over a set, its index (when present and not ``exact``) read once for many calls."""

    def __init__(self, vs: VectorSet, exact: bool = False) -> None:
        self.vs = vs
        self.index = None if exact else load_index(vs)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[str | None] | None = None,
        min_cosine: float | None = None,
    ) -> list[Hits]:
        """The ``k`` most cosine-similar distinct sequences for each query vector, best first.

        With an index: the index, plus an exact scan of the files it does not cover, merged; otherwise one
        exact streaming pass. ``exclude[i]`` is a seq_hash never returned for query i.
        """
        queries = unit_rows(queries)
        fetch_k = k + (1 if exclude else 0)
        if self.index is None:
            parts = [exact_scan(self.vs, queries, fetch_k, exclude=exclude)]
        else:
            parts = [self.index.search(queries, fetch_k)]
            if self.index.uncovered:
                parts.append(
                    exact_scan(self.vs, queries, fetch_k, files=self.index.uncovered, exclude=exclude)
                )
        if exclude:
            for scores, hashes in parts:
                for i, key in enumerate(exclude):
                    if key is not None:
                        scores[i, hashes[i] == key] = -np.inf
        return merge_hits(k, parts, min_cosine)


def search(
    vs: VectorSet,
    queries: np.ndarray,
    k: int,
    exact: bool = False,
    exclude: Sequence[str | None] | None = None,
    min_cosine: float | None = None,
) -> list[Hits]:
    """One :meth:`Searcher.search` call: the set's index if it has one (unless ``exact``), else an exact scan."""
    return Searcher(vs, exact).search(queries, k, exclude, min_cosine)
