"""Every table's Arrow schema, and what names one result row: the store's column vocabulary in one module.

Writers build their tables from these schemas, the catalog types its empty views and ``sql --help`` lists its
columns from them, ``check`` validates files against them. A column added here reaches all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# ------------------------------------------------------------------------------------------------- ingest

SEQUENCE_SCHEMA = pa.schema([("seq_hash", pa.string()), ("sequence", pa.string()), ("length", pa.int32())])
MEMBER_SCHEMA = pa.schema(
    [
        ("record_index", pa.int64()),
        ("seq_id", pa.string()),
        ("description", pa.string()),
        ("seq_hash", pa.string()),
        ("length", pa.int32()),
        ("source", pa.string()),
    ]
)
ACCEPTED_SCHEMA = MEMBER_SCHEMA.append(pa.field("sequence", pa.string()))
REJECTED_SCHEMA = pa.schema(
    [
        ("record_index", pa.int64()),
        ("seq_id", pa.string()),
        ("description", pa.string()),
        ("source", pa.string()),
        ("rule", pa.string()),
        ("reason", pa.string()),
        ("length", pa.int32()),
    ]
)

# --------------------------------------------------------------------------------------------------- runs

RUN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),
        ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("params", pa.string()),
        ("counts", pa.string()),
        ("versions", pa.string()),
        ("message", pa.string()),
    ]
)

# One output file of a shard, as its record lists it: resume trusts a shard only when these match the store.
OUTPUT_TYPE = pa.struct(
    [("table", pa.string()), ("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64())]
)

# One record per computed (or failed) shard of a compute run, in shards/run_id=<run>/shard-N.parquet.
SHARD_SCHEMA = pa.schema(
    [
        ("shard_id", pa.int32()),
        ("status", pa.string()),
        ("attempt", pa.int32()),
        ("tries", pa.int32()),
        ("sequences", pa.int32()),
        ("residues", pa.int64()),
        ("errors", pa.int32()),
        ("fallbacks", pa.int32()),
        ("seconds", pa.float64()),
        ("worker", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
        ("outputs", pa.list_(OUTPUT_TYPE)),
        ("plan_id", pa.string()),
    ]
)

# A compute run's plan: one row group per shard, longest sequences first.
PLAN_SCHEMA = pa.schema(
    [
        ("shard_id", pa.int32()),
        ("seq_hash", pa.string()),
        ("length", pa.int32()),
        ("sequence", pa.string()),
    ]
)

# ------------------------------------------------------------------------------------------------ results

IDENTITY = [("seq_hash", pa.string()), ("model", pa.string()), ("model_sha", pa.string())]
PROVENANCE = [("run_id", pa.string()), ("random_weights", pa.bool_())]


def vector_type(dim: int, dtype: str = "float32") -> pa.DataType:
    """A fixed-width vector: DuckDB casts it to FLOAT[dim] for the array functions."""
    return pa.list_(pa.float16() if dtype == "float16" else pa.float32(), dim)


def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """Pooled vectors: one row per (sequence, layer, pooling)."""
    return pa.schema(
        IDENTITY
        + [
            ("layer", pa.int16()),
            ("pooling", pa.string()),
            ("embedding", vector_type(dim, dtype)),
            ("length", pa.int32()),
            ("strategy", pa.string()),
            ("precision", pa.string()),
        ]
        + PROVENANCE
    )


def residue_embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """Per-residue vectors: one row per (sequence, layer), a length x dim matrix."""
    return pa.schema(
        IDENTITY
        + [
            ("layer", pa.int16()),
            ("embedding", pa.list_(vector_type(dim, dtype))),
            ("length", pa.int32()),
            ("strategy", pa.string()),
            ("precision", pa.string()),
        ]
        + PROVENANCE
    )


CONTACTS_SCHEMA = pa.schema(
    IDENTITY + [("length", pa.int32()), ("contacts", pa.list_(pa.float32()))] + PROVENANCE  # row-major L x L
)

STRUCTURES_SCHEMA = pa.schema(
    IDENTITY
    + [
        ("mean_plddt", pa.float32()),
        ("ptm", pa.float32()),
        ("plddt", pa.list_(pa.float32())),
        ("pae", pa.list_(pa.float32())),
        ("pdb", pa.string()),
        ("cif", pa.string()),
        ("length", pa.int32()),
        ("chains", pa.int16()),
        ("num_recycles", pa.int16()),
        ("chunk_size", pa.int32()),
        ("device", pa.string()),
        ("stem_dtype", pa.string()),
        ("fallbacks", pa.list_(pa.string())),
    ]
    + PROVENANCE
)

# Saturation mutagenesis: one row per (residue, target amino acid, method). position numbers the residue from
# the run's --offset (1: the first residue is 1); score = log p(mt) - log p(wt) at that residue.
VARIANT_SCORES_SCHEMA = pa.schema(
    IDENTITY
    + [
        ("position", pa.int32()),
        ("wt", pa.string()),
        ("mt", pa.string()),
        ("score", pa.float32()),
        ("method", pa.string()),
    ]
    + PROVENANCE
)

# A sequence-classification head: one row per (sequence, label); probability is the head's softmax (sigmoid
# for multi-label heads) or, for a regression head, the regressed value.
PREDICTIONS_SCHEMA = pa.schema(
    IDENTITY + [("label", pa.string()), ("probability", pa.float32())] + PROVENANCE
)

# A token-classification head: one row per residue (1-based position): its most probable label and that
# label's probability.
RESIDUE_PREDICTIONS_SCHEMA = pa.schema(
    IDENTITY + [("position", pa.int32()), ("label", pa.string()), ("probability", pa.float32())] + PROVENANCE
)

# Mutants of a `score-variants --variants CSV` run, scored from the stored saturation tables (the sum over
# their sites). An ensemble's row holds the members' mean as score and each member's own sum.
MUTANT_SCORES_SCHEMA = pa.schema(
    [
        ("seq_hash", pa.string()),
        ("seq_id", pa.string()),
        ("mutant", pa.string()),
        ("score", pa.float32()),
        ("model", pa.string()),
        ("model_sha", pa.string()),
        ("method", pa.string()),
        ("run_id", pa.string()),
        ("member_scores", pa.list_(pa.float32())),
        ("members", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class RowKey:
    """What names one result of a sequence beyond its ``seq_hash``: one definition, three spellings.

    ``columns`` are joined with ':' (``layer:pooling`` -> ``"6:mean"``); a table with one row per sequence
    has no columns and a constant key. ``sql`` is for DuckDB inside storage, ``arrow`` for a shard's rows
    before they are written, ``of`` for the keys a job requires: a sequence is done when it has every key.

    A result of several rows (a saturation table: one row per residue and amino acid) names them apart by
    ``within``; :meth:`unique_sql` spells the key plus those columns, which no two rows of one sequence and
    weights share. The rows of one key are always written together, in one file.
    """

    columns: tuple[str, ...] = ()
    constant: str = ""
    within: tuple[str, ...] = ()

    @property
    def unique_columns(self) -> tuple[str, ...]:
        """The columns that name exactly one row of a sequence and weights."""
        return self.columns + self.within

    def unique_sql(self) -> str:
        """:meth:`sql` of the key plus ``within``: one value per row (for the one-row-per-key check)."""
        return RowKey(self.unique_columns, self.constant).sql()

    def sql(self) -> str:
        if not self.columns:
            return "'" + self.constant.replace("'", "''") + "'"
        return " || ':' || ".join(f"CAST({c} AS VARCHAR)" for c in self.columns)

    def arrow(self, rows: pa.Table) -> pa.Array:
        if not self.columns:
            return pa.array([self.constant] * rows.num_rows, pa.string())
        parts = [pc.cast(rows.column(c), pa.string()) for c in self.columns]
        return parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, ":")

    def of(self, *values: object) -> str:
        if len(values) != len(self.columns):
            raise ValueError(f"row key needs {self.columns}, got {values}")
        return ":".join(str(v) for v in values) if self.columns else self.constant


ROW_KEYS: dict[str, RowKey] = {
    "embeddings": RowKey(("layer", "pooling")),
    "residue_embeddings": RowKey(("layer",)),
    "contacts": RowKey(constant="contacts"),
    "structures": RowKey(constant="structure"),
    "variant_scores": RowKey(("method",), within=("position", "mt")),
    "predictions": RowKey(constant="prediction", within=("label",)),
    "residue_predictions": RowKey(constant="residues", within=("position",)),
}
RESULT_TABLES = tuple(ROW_KEYS)

# Derived from embeddings by `proteoflow neighbors` (see storage/neighbors.py).
NEIGHBORS_SCHEMA = pa.schema(
    [
        ("seq_hash", pa.string()),
        ("neighbor_hash", pa.string()),
        ("rank", pa.int32()),
        ("cosine", pa.float32()),
        ("model", pa.string()),
        ("model_sha", pa.string()),
        ("layer", pa.int16()),
        ("pooling", pa.string()),
        ("k", pa.int32()),
        ("min_cosine", pa.float32()),  # null: no threshold
        ("run_id", pa.string()),
    ]
)

CLUSTERS_SCHEMA = pa.schema(
    [
        ("seq_hash", pa.string()),
        ("cluster_id", pa.string()),  # the smallest seq_hash of the component: stable across reruns
        ("size", pa.int32()),
        ("model", pa.string()),
        ("model_sha", pa.string()),
        ("layer", pa.int16()),
        ("pooling", pa.string()),
        ("k", pa.int32()),
        ("threshold", pa.float32()),
    ]
)

# Tables filed per model identity: <table>/<model>-<sha>/*.parquet
MODEL_DIR_TABLES = RESULT_TABLES + ("neighbors", "clusters", "mutant_scores")

# Tables partitioned as <table>/run_id=<run>/...: the run id is the directory, not a column of the files.
HIVE_TABLES = ("members", "rejected", "shards")

# The schema each table's files carry (vector tables at width 1: their width varies by model).
TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "sequences": SEQUENCE_SCHEMA,
    "members": MEMBER_SCHEMA,
    "rejected": REJECTED_SCHEMA,
    "runs": RUN_SCHEMA,
    "shards": SHARD_SCHEMA,
    "embeddings": embeddings_schema(1),
    "residue_embeddings": residue_embeddings_schema(1),
    "contacts": CONTACTS_SCHEMA,
    "structures": STRUCTURES_SCHEMA,
    "variant_scores": VARIANT_SCORES_SCHEMA,
    "predictions": PREDICTIONS_SCHEMA,
    "residue_predictions": RESIDUE_PREDICTIONS_SCHEMA,
    "mutant_scores": MUTANT_SCORES_SCHEMA,
    "neighbors": NEIGHBORS_SCHEMA,
    "clusters": CLUSTERS_SCHEMA,
}
