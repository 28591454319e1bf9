"""Engines as the actors see them: build one from a plain-data spec, run a shard, return Arrow tables.

This is the seam between esm_core (models, tensors) and the store's result schemas. It imports no Ray
and no Prefect, so actors that load it never touch Prefect's API. What crosses between the driver and an
actor is defined here too: a :class:`ShardTask` in, a :class:`ShardResult` (a manifest, not tables) out.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from storage import schemas
from storage.results import ModelIdentity, OutputFile, ResultRows
from storage.schemas import ROW_KEYS

Items = Sequence[tuple[str, str]]  # (seq_hash, sequence)


@dataclass
class ShardOutput:
    """What one shard produced: result tables by store table name, and the sequences that failed."""

    tables: dict[str, pa.Table]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (seq_hash, error)
    fallbacks: int = 0
    residues: int = 0  # residues the model actually ran (a truncated sequence counts its first window)
    seconds: float = 0.0


@dataclass
class ShardTask:
    """What the driver sends an actor for one shard: the sequences, where to write, and the rows the store
    already holds for them (``existing``: table -> ``seq_hash/key``, only this shard's sequences; usually
    empty), which the actor leaves out of what it writes."""

    shard_id: int
    items: list[tuple[str, str]]  # (seq_hash, sequence)
    run_id: str
    store: str  # the store's root: an absolute local path or an object-store URI
    model: ModelIdentity  # the weights the driver plans for (the actor refuses to write under others)
    existing: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class ShardResult:
    """What an actor returns for one shard once its outputs are committed to the store: the manifest of the
    files it wrote (paths, rows, sizes), the sequences that failed, and counters. Never the result rows.

    ``result_bytes`` is the Arrow size of the result tables the shard computed (what the driver received
    before actors wrote their own outputs); ``driver_bytes`` the pickled size of this result as returned."""

    outputs: list[OutputFile]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (seq_hash, error)
    fallbacks: int = 0
    residues: int = 0
    seconds: float = 0.0  # the engine's compute time
    write_seconds: float = 0.0  # committing the outputs to the store
    result_bytes: int = 0
    driver_bytes: int = 0


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


@dataclass(frozen=True)
class EmbedOptions:
    """What ``embed`` computes per sequence (see ``proteoflow embed --help``)."""

    layers: tuple[int, ...] = (-1,)
    poolings: tuple[str, ...] = ("mean",)
    per_residue: bool = False
    contacts: bool = False
    long_strategy: str = "window"
    precision: str = "auto"
    max_tokens: int | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class FoldOptions:
    """How ``fold`` runs ESMFold (see ``proteoflow fold --help``)."""

    num_recycles: int | None = None
    chunk_size: int | str | None = "auto"
    max_tokens: int | None = None
    pae: bool = False


@dataclass(frozen=True)
class VariantOptions:
    """How ``score-variants`` scores every substitution of a sequence (see ``proteoflow score-variants
    --help``). ``offset`` numbers the stored positions: the first residue is ``offset``."""

    method: str = "masked-marginals"
    offset: int = 1
    precision: str = "auto"
    max_tokens: int | None = None


@dataclass(frozen=True)
class PredictOptions:
    """How ``predict`` runs a classification head. ``head`` ("sequence" or "token") is read from the
    checkpoint's config before the run starts; it decides the table a run writes."""

    head: str = "sequence"
    long_strategy: str = "window"
    precision: str = "auto"
    max_tokens: int | None = None


PREDICTION_TABLES = {
    "sequence": "predictions",
    "token": "residue_predictions",
}  # predict's table by head kind


EngineOptions = EmbedOptions | FoldOptions | VariantOptions | PredictOptions
OPTIONS = {
    "embed": EmbedOptions,
    "fold": FoldOptions,
    "score-variants": VariantOptions,
    "predict": PredictOptions,
}


def options_from_dict(kind: str, data: dict) -> EngineOptions:
    """Typed engine options of ``kind`` from plain data (a stored run's parameters, a deployment's)."""
    cls = OPTIONS[kind]
    names = set(cls.__dataclass_fields__)
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {kind} option(s): {', '.join(sorted(unknown))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


@dataclass(frozen=True)
class EngineIdentity:
    """Who computes (the model's name and weights checksum) and the shape of what it writes."""

    model: ModelIdentity
    dim: int = 0
    num_layers: int = 0
    layers: tuple[int, ...] = ()  # requested layers resolved to fair-esm numbering (0..num_layers)
    poolings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The JSON form kept in run records (and read back by :meth:`from_dict`)."""
        return {"model": self.model.name, "sha": self.model.sha, "random_weights": self.model.random_weights,
                "dim": self.dim, "num_layers": self.num_layers, "layers": list(self.layers),
                "poolings": list(self.poolings)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> EngineIdentity:
        model = ModelIdentity(data["model"], data["sha"], bool(data.get("random_weights", False)))
        return cls(model, int(data.get("dim", 0)), int(data.get("num_layers", 0)),
                   tuple(data.get("layers", ())), tuple(data.get("poolings", ())))  # fmt: skip


def resolve_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """fair-esm layer numbers (0 = embeddings, N = last; negatives count from the end), sorted, unique;
    a ValueError naming the valid range for a layer the model does not have."""
    resolved = set()
    for layer in layers:
        value = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= value <= num_layers:
            raise ValueError(
                f"layer {layer} does not exist: this model has layers 0..{num_layers} (or -1..-{num_layers + 1})"
            )
        resolved.add(value)
    return tuple(sorted(resolved))


def wanted_rows(kind: str, options: EngineOptions, identity: EngineIdentity) -> list[ResultRows]:
    """The result rows a job needs for every sequence: a sequence lacking any of them is computed."""
    if kind == "fold":
        return [ResultRows("structures", (ROW_KEYS["structures"].of(),))]
    if isinstance(options, VariantOptions):
        return [ResultRows("variant_scores", (ROW_KEYS["variant_scores"].of(options.method),))]
    if isinstance(options, PredictOptions):
        table = PREDICTION_TABLES[options.head]
        return [ResultRows(table, (ROW_KEYS[table].of(),))]
    assert isinstance(options, EmbedOptions)
    rows = [ResultRows("embeddings", tuple(ROW_KEYS["embeddings"].of(layer, pooling)
                                           for layer in identity.layers for pooling in identity.poolings))]  # fmt: skip
    if options.per_residue:
        rows.append(
            ResultRows(
                "residue_embeddings",
                tuple(ROW_KEYS["residue_embeddings"].of(layer) for layer in identity.layers),
            )
        )
    if options.contacts:
        rows.append(ResultRows("contacts", (ROW_KEYS["contacts"].of(),)))
    return rows


class EmbedEngine:
    """ESM-2 embeddings: pooled vectors per (layer, pooling), optional per-residue vectors and contacts."""

    kind = "embed"

    def __init__(self, model: str, options: EmbedOptions, device: str | None = None) -> None:
        from esm_core.checkpoints import load_esm
        from esm_core.embedding import Embedder

        self.loaded = load_esm(model, device=device)
        self.options = options
        self.embedder = Embedder(
            self.loaded,
            layers=options.layers,
            poolings=options.poolings,
            per_residue=options.per_residue,
            contacts=options.contacts,
            long_strategy=options.long_strategy,
            precision=options.precision,
            max_tokens=options.max_tokens,
        )
        self.progress = 0  # residues finished in the current shard, read by the actor's progress()

    def identity(self) -> EngineIdentity:
        model = ModelIdentity(self.loaded.name, self.loaded.sha, self.loaded.random_weights)
        return EngineIdentity(model, self.loaded.dim, self.loaded.num_layers, tuple(self.embedder.layers),
                              tuple(self.options.poolings))  # fmt: skip

    def run(self, items: Items, run_id: str) -> ShardOutput:
        started = time.perf_counter()
        self.progress = 0
        found, errors = isolate_or_raise(self._embed, items)
        dim, dtype = self.loaded.dim, self.options.dtype
        ident = {"model": self.loaded.name, "model_sha": self.loaded.sha, "run_id": run_id,
                 "random_weights": self.loaded.random_weights}  # fmt: skip
        pooled: dict[str, list] = {name: [] for name in schemas.embeddings_schema(dim).names}
        residue: dict[str, list] = {name: [] for name in schemas.residue_embeddings_schema(dim).names}
        contacts: dict[str, list] = {name: [] for name in schemas.CONTACTS_SCHEMA.names}
        for r in found:
            for (layer, pooling), vector in sorted(r.pooled.items()):
                _append(pooled, seq_hash=r.key, layer=layer, pooling=pooling, embedding=vector, length=r.length,
                        strategy=r.strategy, precision=r.precision, **ident)  # fmt: skip
            for layer, matrix in sorted((r.per_residue or {}).items()):
                _append(residue, seq_hash=r.key, layer=layer, embedding=matrix, length=r.length,
                        strategy=r.strategy, precision=r.precision, **ident)  # fmt: skip
            if r.contacts is not None:
                _append(
                    contacts,
                    seq_hash=r.key,
                    length=r.length,
                    contacts=np.asarray(r.contacts).ravel(),
                    **ident,
                )
        tables = {"embeddings": _table(pooled, schemas.embeddings_schema(dim, dtype))}
        if self.options.per_residue:
            tables["residue_embeddings"] = _table(residue, schemas.residue_embeddings_schema(dim, dtype))
        if self.options.contacts:
            tables["contacts"] = _table(contacts, schemas.CONTACTS_SCHEMA)
        computed = sum(self._computed(r) for r in found)
        return ShardOutput(tables, errors, sum(len(r.fallbacks) for r in found), computed,
                           time.perf_counter() - started)  # fmt: skip

    def _computed(self, result) -> int:
        """Residues the model actually ran: a truncated sequence counts only its first window."""
        return (
            min(result.length, self.loaded.max_residues) if result.strategy == "truncate" else result.length
        )

    def _embed(self, items: Items) -> Iterator:
        _poisoned(items)
        for result in self.embedder.embed(items):
            self.progress += self._computed(result)
            yield result


class FoldEngine:
    """ESMFold structures with per-sequence confidence."""

    kind = "fold"

    def __init__(self, model: str, options: FoldOptions, device: str | None = None) -> None:
        from esm_core.folding import Folder, load_esmfold

        self.loaded = load_esmfold(model, device=device)
        self.options = options
        self.folder = Folder(self.loaded, num_recycles=options.num_recycles, chunk_size=options.chunk_size,
                             max_tokens=options.max_tokens, pae=options.pae)  # fmt: skip
        self.progress = 0

    def identity(self) -> EngineIdentity:
        return EngineIdentity(ModelIdentity(self.loaded.name, self.loaded.sha, self.loaded.random_weights))

    def run(self, items: Items, run_id: str) -> ShardOutput:
        started = time.perf_counter()
        self.progress = 0
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
        return ShardOutput({"structures": table}, errors, sum(len(r.fallbacks) for r in found),
                           sum(r.length for r in found), time.perf_counter() - started)  # fmt: skip

    def _fold(self, items: Items) -> Iterator:
        _poisoned(items)
        for result in self.folder.fold(items):
            self.progress += result.length
            yield result


class VariantEngine:
    """Saturation mutagenesis from a masked language model: every residue x 20 amino acids, one method."""

    kind = "score-variants"

    def __init__(self, model: str, options: VariantOptions, device: str | None = None) -> None:
        from esm_core.checkpoints import load_esm_mlm
        from esm_core.variants import VariantScorer

        self.loaded = load_esm_mlm(model, device=device)
        self.options = options
        self.scorer = VariantScorer(self.loaded, method=options.method, precision=options.precision,
                                    max_tokens=options.max_tokens)  # fmt: skip
        self.progress = 0

    def identity(self) -> EngineIdentity:
        model = ModelIdentity(self.loaded.name, self.loaded.sha, self.loaded.random_weights)
        return EngineIdentity(model, self.loaded.dim, self.loaded.num_layers)

    def run(self, items: Items, run_id: str) -> ShardOutput:
        started = time.perf_counter()
        self.progress = 0
        found, errors = isolate_or_raise(self._score, items)
        columns: dict[str, list] = {name: [] for name in schemas.VARIANT_SCORES_SCHEMA.names}
        ident = {"model": self.loaded.name, "model_sha": self.loaded.sha, "run_id": run_id,
                 "random_weights": self.loaded.random_weights, "method": self.options.method}  # fmt: skip
        for r in found:
            for position, wt, mt, score in r.rows(self.options.offset):
                _append(columns, seq_hash=r.key, position=position, wt=wt, mt=mt, score=score, **ident)
        table = _table(columns, schemas.VARIANT_SCORES_SCHEMA)
        return ShardOutput({"variant_scores": table}, errors, sum(len(r.fallbacks) for r in found),
                           sum(len(r.sequence) for r in found), time.perf_counter() - started)  # fmt: skip

    def _score(self, items: Items) -> Iterator:
        _poisoned(items)
        for result in self.scorer.score(items):
            self.progress += len(result.sequence)
            yield result


def head_identity(sha: str, head_sha: str) -> str:
    """The weights checksum a classification run records: encoder and head together, so two heads trained on
    one frozen encoder (and saved under one name) never share results."""
    digest = hashlib.sha1(f"{sha}:{head_sha}".encode(), usedforsecurity=False).hexdigest()
    return digest[: len(sha)]


class PredictEngine:
    """A sequence- or token-classification head: class probabilities per sequence, or a label per residue."""

    kind = "predict"

    def __init__(self, model: str, options: PredictOptions, device: str | None = None) -> None:
        from esm_core.heads import Classifier, load_esm_head

        self.loaded = load_esm_head(model, device=device)
        if self.loaded.kind != options.head:
            raise ValueError(
                f"model {model!r} holds a {self.loaded.kind} head, the run expects {options.head}"
            )
        self.options = options
        self.classifier = Classifier(self.loaded, long_strategy=options.long_strategy,
                                     precision=options.precision, max_tokens=options.max_tokens)  # fmt: skip
        self.progress = 0

    def identity(self) -> EngineIdentity:
        sha = head_identity(self.loaded.sha, self.loaded.head_sha)
        model = ModelIdentity(self.loaded.name, sha, self.loaded.random_weights)
        return EngineIdentity(model, self.loaded.dim, self.loaded.num_layers)

    def run(self, items: Items, run_id: str) -> ShardOutput:
        started = time.perf_counter()
        self.progress = 0
        found, errors = isolate_or_raise(self._predict, items)
        table = PREDICTION_TABLES[self.options.head]
        schema = schemas.TABLE_SCHEMAS[table]
        columns: dict[str, list] = {name: [] for name in schema.names}
        ident = {"model": self.loaded.name, "model_sha": self.identity().model.sha, "run_id": run_id,
                 "random_weights": self.loaded.random_weights}  # fmt: skip
        for r in found:
            if self.options.head == "sequence":
                for label, value in zip(r.labels, r.probabilities.tolist(), strict=True):
                    _append(columns, seq_hash=r.key, label=label, probability=value, **ident)
                continue
            best = r.probabilities.max(axis=1).tolist()
            for index, (label, value) in enumerate(zip(r.residue_labels, best, strict=True)):
                _append(columns, seq_hash=r.key, position=index + 1, label=label, probability=value, **ident)
        return ShardOutput({table: _table(columns, schema)}, errors, sum(len(r.fallbacks) for r in found),
                           sum(r.length for r in found), time.perf_counter() - started)  # fmt: skip

    def _predict(self, items: Items) -> Iterator:
        _poisoned(items)
        for result in self.classifier.predict(items):
            self.progress += result.length
            yield result


Engine = EmbedEngine | FoldEngine | VariantEngine | PredictEngine
ENGINES: dict[str, type[Engine]] = {
    "embed": EmbedEngine,
    "fold": FoldEngine,
    "score-variants": VariantEngine,
    "predict": PredictEngine,
}


def build_engine(kind: str, model: str, options: EngineOptions, device: str | None = None) -> Engine:
    """The engine for ``kind`` (a key of :data:`ENGINES`), with its model loaded."""
    return ENGINES[kind](model, options, device)  # type: ignore[arg-type]


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
