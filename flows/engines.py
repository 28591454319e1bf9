"""Engines as the actors see them: build one from a plain-data spec, run a shard, return Arrow tables.

This is the seam between esm_core (models, tensors) and the store's result schemas. It imports no Ray
and no Prefect, so actors that load it never touch Prefect's API.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from storage import schemas

Items = Sequence[tuple[str, str]]  # (seq_hash, sequence)


@dataclass
class ShardOutput:
    """What one shard produced: result tables by store table name, and the sequences that failed."""

    tables: dict[str, pa.Table]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (seq_hash, error)
    fallbacks: int = 0
    residues: int = 0
    seconds: float = 0.0


def isolate_failures(run: Callable[[Items], Iterator], items: Items) -> tuple[list, list[tuple[str, str]]]:
    """Run ``items``, keeping every result produced; if the engine raises, bisect what is left until each
    failing sequence stands alone.

    A poison sequence (one that always fails) costs about log2(n) extra calls over the unfinished part and
    ends as one error, instead of failing its whole shard on every retry.
    """
    found: list = []
    try:
        for result in run(items):
            found.append(result)
        return found, []
    except Exception as exc:  # noqa: BLE001 - any engine failure is isolated, not swallowed
        finished = {r.key for r in found}
        rest = [item for item in items if item[0] not in finished]
        if len(rest) <= 1:
            return found, [(item[0], f"{type(exc).__name__}: {exc}".strip()[:2000]) for item in rest]
    half = len(rest) // 2
    left, left_errors = isolate_failures(run, rest[:half])
    right, right_errors = isolate_failures(run, rest[half:])
    return found + left + right, left_errors + right_errors


def isolate_or_raise(run: Callable[[Items], Iterator], items: Items) -> tuple[list, list[tuple[str, str]]]:
    """:func:`isolate_failures`, except that a shard in which every sequence failed raises: that is a broken
    worker (a dead CUDA context, say), not poison, and the pool retries the shard on a fresh actor."""
    found, errors = isolate_failures(run, items)
    if not found and len(errors) > 1:
        raise RuntimeError(f"every sequence of the shard failed, e.g. {errors[0][1]}")
    return found, errors


def _poisoned(items: Items) -> None:
    """Test hook: PROTEOFLOW_POISON lists seq_hash prefixes that make the engine fail, as a bad input would."""
    prefixes = [p for p in os.environ.get("PROTEOFLOW_POISON", "").split(",") if p]
    for seq_hash, _ in items:
        if any(seq_hash.startswith(p) for p in prefixes):
            raise RuntimeError(f"injected poison sequence {seq_hash}")


class EmbedEngine:
    """ESM-2 embeddings: pooled vectors per (layer, pooling), optional per-residue vectors and contacts."""

    kind = "embed"

    def __init__(self, model: str, options: dict, device: str | None = None) -> None:
        from esm_core.checkpoints import load_esm
        from esm_core.embedding import Embedder

        self.loaded = load_esm(model, device=device)
        self.options = options
        self.dtype = options.get("dtype", "float32")
        self.embedder = Embedder(
            self.loaded,
            layers=tuple(options.get("layers", (-1,))),
            poolings=tuple(options.get("poolings", ("mean",))),
            per_residue=options.get("per_residue", False),
            contacts=options.get("contacts", False),
            long_strategy=options.get("long_strategy", "window"),
            precision=options.get("precision", "auto"),
            max_tokens=options.get("max_tokens"),
        )
        self.layers = list(self.embedder.layers)

    def identity(self) -> dict:
        """Who computes: the model's name and weights checksum, and the shape of what it writes."""
        return {
            "model": self.loaded.name,
            "sha": self.loaded.sha,
            "random_weights": self.loaded.random_weights,
            "dim": self.loaded.dim,
            "num_layers": self.loaded.num_layers,
            "layers": self.layers,
            "poolings": list(self.options.get("poolings", ("mean",))),
        }

    def run(self, items: Items, run_id: str) -> ShardOutput:
        started = time.perf_counter()
        found, errors = isolate_or_raise(self._embed, items)
        ident = {
            "model": self.loaded.name,
            "model_sha": self.loaded.sha,
            "run_id": run_id,
            "random_weights": self.loaded.random_weights,
        }
        pooled: dict[str, list] = {name: [] for name in schemas.embeddings_schema(self.loaded.dim).names}
        residue: dict[str, list] = {
            name: [] for name in schemas.residue_embeddings_schema(self.loaded.dim).names
        }
        contacts: dict[str, list] = {name: [] for name in schemas.CONTACTS_SCHEMA.names}
        fallbacks = 0
        for r in found:
            fallbacks += len(r.fallbacks)
            for (layer, pooling), vector in sorted(r.pooled.items()):
                _append(
                    pooled,
                    seq_hash=r.key,
                    layer=layer,
                    pooling=pooling,
                    embedding=vector,
                    length=r.length,
                    strategy=r.strategy,
                    precision=r.precision,
                    **ident,
                )
            for layer, matrix in sorted((r.per_residue or {}).items()):
                _append(
                    residue,
                    seq_hash=r.key,
                    layer=layer,
                    embedding=matrix,
                    length=r.length,
                    strategy=r.strategy,
                    precision=r.precision,
                    **ident,
                )
            if r.contacts is not None:
                _append(
                    contacts,
                    seq_hash=r.key,
                    length=r.length,
                    contacts=np.asarray(r.contacts).ravel(),
                    **ident,
                )
        tables = {"embeddings": _table(pooled, schemas.embeddings_schema(self.loaded.dim, self.dtype))}
        if self.options.get("per_residue"):
            tables["residue_embeddings"] = _table(
                residue, schemas.residue_embeddings_schema(self.loaded.dim, self.dtype)
            )
        if self.options.get("contacts"):
            tables["contacts"] = _table(contacts, schemas.CONTACTS_SCHEMA)
        return ShardOutput(
            tables, errors, fallbacks, sum(r.length for r in found), time.perf_counter() - started
        )

    def _embed(self, items: Items) -> Iterator:
        _poisoned(items)
        yield from self.embedder.embed(items)


class FoldEngine:
    """ESMFold structures with per-sequence confidence."""

    kind = "fold"

    def __init__(self, model: str, options: dict, device: str | None = None) -> None:
        from esm_core.folding import Folder, load_esmfold

        self.loaded = load_esmfold(model, device=device)
        self.options = options
        self.folder = Folder(
            self.loaded,
            num_recycles=options.get("num_recycles"),
            chunk_size=options.get("chunk_size", "auto"),
            max_tokens=options.get("max_tokens"),
            pae=options.get("pae", False),
        )

    def identity(self) -> dict:
        return {
            "model": self.loaded.name,
            "sha": self.loaded.sha,
            "random_weights": self.loaded.random_weights,
        }

    def run(self, items: Items, run_id: str) -> ShardOutput:
        started = time.perf_counter()
        found, errors = isolate_or_raise(self._fold, items)
        columns: dict[str, list] = {name: [] for name in schemas.STRUCTURES_SCHEMA.names}
        for r in found:
            _append(
                columns,
                seq_hash=r.key,
                model=self.loaded.name,
                model_sha=self.loaded.sha,
                run_id=run_id,
                random_weights=self.loaded.random_weights,
                mean_plddt=r.mean_plddt,
                ptm=r.ptm,
                plddt=np.asarray(r.plddt, np.float32),
                pae=None if r.pae is None else np.asarray(r.pae, np.float32).ravel(),
                pdb=r.pdb,
                cif=r.cif,
                length=r.length,
                chains=len(r.chains),
                num_recycles=r.settings.get("num_recycles"),
                chunk_size=r.settings.get("chunk_size"),
                device=str(r.settings.get("device")),
                stem_dtype=str(r.settings.get("stem_dtype")),
                fallbacks=list(r.fallbacks),
            )
        table = _table(columns, schemas.STRUCTURES_SCHEMA)
        return ShardOutput(
            {"structures": table},
            errors,
            sum(len(r.fallbacks) for r in found),
            sum(r.length for r in found),
            time.perf_counter() - started,
        )

    def _fold(self, items: Items) -> Iterator:
        _poisoned(items)
        yield from self.folder.fold(items)


ENGINES = {"embed": EmbedEngine, "fold": FoldEngine}


def build_engine(kind: str, model: str, options: dict, device: str | None = None):
    """The engine for ``kind`` ("embed" or "fold"), with its model loaded."""
    return ENGINES[kind](model, options, device)


def _append(columns: dict[str, list], **row) -> None:
    for name, value in row.items():
        columns[name].append(value)


def _table(columns: dict[str, list], schema: pa.Schema) -> pa.Table:
    """Build a result table; numpy vectors and matrices become fixed-size list columns."""
    arrays = []
    for f in schema:
        values = columns[f.name]
        if pa.types.is_fixed_size_list(f.type) and values:
            flat = np.stack(values).astype(f.type.value_type.to_pandas_dtype()).ravel()
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), f.type.list_size))
        elif pa.types.is_list(f.type) and pa.types.is_fixed_size_list(f.type.value_type) and values:
            inner = f.type.value_type
            offsets = np.concatenate([[0], np.cumsum([len(m) for m in values])]).astype(np.int32)
            flat = np.concatenate([np.asarray(m).reshape(-1) for m in values]).astype(
                inner.value_type.to_pandas_dtype()
            )
            rows = pa.FixedSizeListArray.from_arrays(pa.array(flat), inner.list_size)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), rows))
        else:
            arrays.append(pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
