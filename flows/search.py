"""Embedding search as the CLI runs it: which stored vectors ``--model`` means, the query vectors (stored ones,
or embedded in-process with the same weights: no Ray, no Prefect), and neighbour rows with member record ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from flows.errors import CliError
from storage import objects
from storage.catalog import fetch_arrow, file_list
from storage.layout import Store
from storage.vectors import VectorSet, fetch, resolve
from storage.vectors import search as search_vectors

SEARCH_COLUMNS = ["query", "rank", "seq_hash", "cosine", "length", "ids"]


@dataclass
class Query:
    """One query: a label for the output, its seq_hash, and its sequence when known."""

    label: str
    seq_hash: str
    sequence: str | None = None


# ------------------------------------------------------------------------------------------------ model


def model_names(spec: str) -> list[str]:
    """The stored model names a ``--model`` value may mean: itself, and the name ``load_esm`` gives it
    (a directory's name, a .pt file's stem, a known model's short name, a hub id's last part)."""
    names = [spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        names.append(path.resolve().name)
    elif path.is_file():
        names.append(path.stem)
    else:
        from esm_core.registry import lookup

        info = lookup(spec)
        names.append(info.name if info else spec.rstrip("/").rsplit("/", 1)[-1])
    return list(dict.fromkeys(names))


def resolve_set(
    store: str, model: str, model_sha: str | None = None, layer: int | None = None, pooling: str | None = None
) -> VectorSet:
    """The vector set meant by the CLI's --model/--model-sha/--layer/--pooling (VectorError when unclear)."""
    return resolve(store, model_names(model), model_sha, layer, pooling)


def _loadable(spec: str) -> bool:
    """A spec load_esm can read without guessing: a local path, a known model name, or a hub id."""
    from esm_core.registry import lookup

    return Path(spec).expanduser().exists() or lookup(spec) is not None or spec.count("/") == 1


def _run_checkpoints(vs: VectorSet) -> list[str]:
    """The --model values of the embed runs that computed this set's weights, newest first."""
    found = []
    for path in sorted(Store(vs.root).table_dir("runs").glob("*.parquet"), key=lambda p: -p.stat().st_mtime):
        for row in objects.read_table(path, columns=["kind", "params"]).to_pylist():
            params = json.loads(row["params"] or "{}")
            if row["kind"] == "embed" and params.get("identity", {}).get("sha") == vs.model_sha:
                found.append(params.get("model"))
    return [f for f in dict.fromkeys(found) if f]


def load_weights(vs: VectorSet, spec: str):
    """The checkpoint whose weights computed the set: ``spec`` or a recorded embed run's checkpoint; its
    checksum must equal the stored model_sha."""
    from esm_core.checkpoints import ModelNotFoundError, load_esm

    candidates = [c for c in dict.fromkeys([spec, *_run_checkpoints(vs)]) if _loadable(c)]
    mismatch = None
    for candidate in candidates:
        try:
            loaded = load_esm(candidate)
        except ModelNotFoundError:
            continue
        if loaded.sha == vs.model_sha:
            return loaded
        mismatch = mismatch or (candidate, loaded.sha)
    if mismatch is not None:
        raise CliError(
            f"checkpoint {mismatch[0]!r} has weights checksum {mismatch[1]}, but the stored vectors of "
            f"{vs.model!r} were computed with {vs.model_sha}: pass the checkpoint that computed them as --model"
        )
    raise CliError(
        f"embedding queries that are not in the store needs the checkpoint of {vs.model!r} "
        f"(weights {vs.model_sha}): pass its path or hub id as --model"
    )


def embed_sequences(vs: VectorSet, spec: str, items: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Pooled vectors of (seq_hash, sequence) items, computed in-process as the set's were: same weights
    (checked), layer, pooling, precision (fp32 where the stored one cannot run here) and long-sequence strategy."""
    from esm_core.embedding import Embedder

    loaded = load_weights(vs, spec)
    strategy = "truncate" if "truncate" in vs.strategies else "window"
    try:
        embedder = Embedder(
            loaded, layers=(vs.layer,), poolings=(vs.pooling,), precision=vs.precision, long_strategy=strategy
        )
    except ValueError:
        embedder = Embedder(
            loaded, layers=(vs.layer,), poolings=(vs.pooling,), precision="fp32", long_strategy=strategy
        )
    return {r.key: np.asarray(r.pooled[(vs.layer, vs.pooling)], np.float32) for r in embedder.embed(items)}


# ---------------------------------------------------------------------------------------------- queries


def _con_files(store: Store, table: str) -> tuple[duckdb.DuckDBPyConnection, str] | None:
    files = store.files(table)
    if not files:
        return None
    return objects.duckdb_connection(), f"read_parquet({file_list(files)})"


def _quoted(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def queries_from_ids(store: str, ids: list[str]) -> list[Query]:
    """One query per (record id, distinct sequence): ids are ``members.seq_id`` values."""
    found = _con_files(Store(store), "members")
    rows = []
    if found is not None:
        con, source = found
        sql = f"SELECT DISTINCT seq_id, seq_hash FROM {source} WHERE seq_id IN ({_quoted(ids)})"
        rows = fetch_arrow(con, sql).to_pylist()
    by_id: dict[str, list[str]] = {}
    for row in rows:
        by_id.setdefault(row["seq_id"], []).append(row["seq_hash"])
    missing = [i for i in ids if i not in by_id]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CliError(f"unknown id {missing[0]!r}{more}: no member record of the store has that seq_id")
    return [Query(i, h) for i in dict.fromkeys(ids) for h in sorted(by_id[i])]


def _checked(label: str, raw: str) -> Query:
    from storage.normalize import normalize_text, seq_hash, validate

    sequence = normalize_text(raw)
    problem = validate(sequence.encode("latin-1"))
    if problem is not None:
        raise CliError(f"query {label!r}: {problem.reason}")
    return Query(label, seq_hash(sequence), sequence)


def query_from_sequence(text: str) -> Query:
    return _checked("sequence", text)


def queries_from_fasta(path: str) -> list[Query]:
    """One query per record of a (plain or gzip) FASTA file, validated as ingest would."""
    from storage.fasta import Source, iter_record_chunks

    queries = []
    for chunk in iter_record_chunks(Source(path)):
        for record in chunk.split(b"\n>"):
            header, _, body = record.partition(b"\n")
            label = (header.split(None, 1) or [b""])[0].decode("utf-8", "replace")
            queries.append(_checked(label or f"record {len(queries) + 1}", body.decode("latin-1")))
    if not queries:
        raise CliError(f"{path}: no FASTA records")
    return queries


def _sequences(store: str, hashes: list[str]) -> dict[str, str]:
    found = _con_files(Store(store), "sequences")
    if found is None or not hashes:
        return {}
    con, source = found
    sql = f"SELECT seq_hash, sequence FROM {source} WHERE seq_hash IN ({_quoted(hashes)})"
    return {r["seq_hash"]: r["sequence"] for r in fetch_arrow(con, sql).to_pylist()}


def query_vectors(vs: VectorSet, queries: list[Query], model: str) -> np.ndarray:
    """A vector per query: the stored one when the set holds the sequence, else embedded on the fly."""
    hashes = list(dict.fromkeys(q.seq_hash for q in queries))
    vectors = fetch(vs, hashes)
    missing = [h for h in hashes if h not in vectors]
    if missing:
        known = {q.seq_hash: q.sequence for q in queries if q.sequence}
        known.update(_sequences(str(vs.root), [h for h in missing if h not in known]))
        items = [(h, known[h]) for h in missing]
        vectors.update(embed_sequences(vs, model, items))
    return np.stack([vectors[q.seq_hash] for q in queries])


# ---------------------------------------------------------------------------------------------- results


def member_info(store: str, hashes: list[str]) -> dict[str, tuple[int | None, list[str]]]:
    """Length and record ids (sorted, distinct) of each sequence, from the members table."""
    found = _con_files(Store(store), "members")
    if found is None or not hashes:
        return {}
    con, source = found
    sql = (
        f"SELECT seq_hash, max(length) AS length, list(DISTINCT seq_id ORDER BY seq_id) AS ids "
        f"FROM {source} WHERE seq_hash IN ({_quoted(hashes)}) GROUP BY seq_hash"
    )
    return {r["seq_hash"]: (r["length"], r["ids"]) for r in fetch_arrow(con, sql).to_pylist()}


def search(
    vs: VectorSet,
    queries: list[Query],
    model: str,
    k: int = 10,
    min_cosine: float | None = None,
    exact: bool = False,
) -> list[tuple]:
    """Output rows (query, rank, seq_hash, cosine, length, ids): one per query and distinct neighbour."""
    vectors = query_vectors(vs, queries, model)
    hits = search_vectors(vs, vectors, k, exact=exact, min_cosine=min_cosine)
    info = member_info(str(vs.root), sorted({h for found in hits for h, _ in found}))
    rows = []
    for query, found in zip(queries, hits, strict=True):
        for rank, (other, cosine) in enumerate(found, start=1):
            length, ids = info.get(other, (None, []))
            rows.append((query.label, rank, other, round(cosine, 6), length, ids))
    return rows
