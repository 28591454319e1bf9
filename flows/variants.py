"""``score-variants --variants CSV`` on the driver: the saturation tables of the sequences a CSV names are
computed by the usual flow (one run per checkpoint of an ensemble), then each CSV row is scored from the
stored tables (the sum over its sites, fair-esm's additive rule) into ``mutant_scores``; a row that cannot be
scored (unknown id, wild type that does not match, position outside the sequence...) becomes a ``rejected``
row of the run with rule ``invalid_mutant`` and its one-line reason.

The runs themselves are handed to a caller's ``run`` function (the CLI launches them; a test runs the flow in
process), so this module starts neither Ray nor Prefect.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from flows.errors import CliError
from flows.family import ensemble_name
from flows.job import Job
from flows.progress import ProgressBar
from storage import mutants
from storage.catalog import write_catalog
from storage.ingest import ingest
from storage.layout import Store
from storage.results import ModelIdentity
from storage.runs import ComputeCounts, RunRecord
from storage.schemas import MUTANT_SCORES_SCHEMA, REJECTED_SCHEMA

ID_COLUMNS = ("seq_id", "id", "sequence_id")
MUTANT_COLUMNS = ("mutant", "mutation", "mutations")
MUTANTS_KIND = "mutants"  # the run kind of the scoring step (its rejected rows and mutant_scores file)

Runner = Callable[[Job], RunRecord]


@dataclass(frozen=True)
class MutantRow:
    """One data row of a variants CSV: its 0-based index, the sequence id and the mutant label."""

    index: int
    seq_id: str
    mutant: str


@dataclass(frozen=True)
class VariantsCsv:
    """A parsed variants CSV and a digest of its bytes (part of the scoring run's id)."""

    path: str
    rows: tuple[MutantRow, ...]
    digest: str

    @property
    def ids(self) -> list[str]:
        return sorted({row.seq_id for row in self.rows})


@dataclass(frozen=True)
class MutantRun:
    """What the scoring step wrote: its run, the mutant_scores file, and how many rows were scored or refused."""

    run_id: str
    model: ModelIdentity
    scored: int
    rejected: int
    sequences: int
    path: Path | None


def read_variants_csv(path: str) -> VariantsCsv:
    """Parse a variants CSV: a header naming the sequence id column (seq_id, id or sequence_id) and the
    mutant column (mutant, mutation or mutations); other columns are ignored. One-line CliError otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"--variants {path}: cannot read ({(exc.strerror or str(exc)).lower()})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CliError(f"--variants {path}: not UTF-8 text") from None
    reader = csv.reader(text.splitlines())
    header = [name.strip().lower() for name in next(reader, [])]
    id_column = next((header.index(n) for n in ID_COLUMNS if n in header), None)
    mutant_column = next((header.index(n) for n in MUTANT_COLUMNS if n in header), None)
    if id_column is None or mutant_column is None:
        raise CliError(
            f"--variants {path}: the header must name a sequence id column ({' or '.join(ID_COLUMNS)}) and a "
            f"mutant column ({' or '.join(MUTANT_COLUMNS)}); it has {', '.join(header) or 'nothing'}"
        )
    rows = []
    for fields in reader:
        if any(field.strip() for field in fields):
            rows.append(MutantRow(len(rows), _field(fields, id_column), _field(fields, mutant_column)))
    if not rows:
        raise CliError(f"--variants {path}: no mutant rows under the header")
    return VariantsCsv(path, tuple(rows), hashlib.sha1(data, usedforsecurity=False).hexdigest())


def _field(fields: list[str], index: int) -> str:
    return fields[index].strip() if index < len(fields) else ""


@dataclass
class Selection:
    """The sequences the CSV names among the inputs' accepted records, and what the compute runs read."""

    ingest_run: str
    records: pa.Table  # storage.mutants.named_records
    inputs: list[str]


def select_inputs(job: Job, variants: VariantsCsv, workdir: Path) -> Selection:
    """Ingest the job's inputs (a no-op for content already in the store) and pick the records the CSV names.
    When the inputs hold other sequences too, the named records are written to a FASTA file in ``workdir``
    for the runs to read, so only those are scored. A CliError when the CSV names none of them."""
    store = Store(job.store)
    bar = ProgressBar(f"{job.kind}: ingest", unit="records") if job.progress else None
    ingested = ingest(store, job.inputs, min_length=job.min_length, max_length=job.max_length,
                      progress=(lambda p: bar.update(p["records"])) if bar else None)  # fmt: skip
    records = mutants.named_records(store, ingested.run_id, variants.ids)
    if bar is not None:
        bar.finish(f"{job.kind}: input {ingested.run_id}: {ingested.counts.accepted:,} records accepted, "
                   f"{records.num_rows:,} of them named by {Path(variants.path).name}")  # fmt: skip
    if not records.num_rows:
        raise CliError(
            f"--variants {variants.path}: none of its {len(variants.ids)} sequence id(s) is an accepted record "
            f"of the input (e.g. {variants.ids[0]!r}); ids are the first word of the FASTA header"
        )
    named = set(records.column("seq_hash").to_pylist())
    if named == mutants.input_hashes(store, ingested.run_id):
        return Selection(ingested.run_id, records, list(job.inputs))
    subset = workdir / f"{Path(variants.path).stem}.sequences.fasta"
    seen: set[str] = set()
    with open(subset, "w", encoding="utf-8") as fh:
        for row in records.to_pylist():
            if row["seq_id"] in seen:
                continue
            seen.add(row["seq_id"])
            header = f"{row['seq_id']} {row['description']}".rstrip() if row["description"] else row["seq_id"]
            fh.write(f">{header}\n{row['sequence']}\n")
    return Selection(ingested.run_id, records, [str(subset)])


def score_variants(jobs: list[Job], variants: VariantsCsv, model_spec: str, run: Runner) -> MutantRun:
    """Compute the saturation tables of the sequences ``variants`` names with every job (one per checkpoint,
    one after another, each a run of its own), then score the CSV from the stored tables; see the module
    docstring. A run that does not complete raises (flows.job.RunFailed) before anything is scored."""
    with tempfile.TemporaryDirectory(prefix="proteoflow-variants-") as tmp:
        selection = select_inputs(jobs[0], variants, Path(tmp))
        records = []
        for job in jobs:
            job.inputs = selection.inputs
            records.append(run(job))
    members = [identity_of(record) for record in records]
    options = jobs[0].options
    return score_csv(
        Store(jobs[0].store),
        variants,
        selection,
        members,
        ensemble_name(model_spec, [m.name for m in members]),
        options.method,  # type: ignore[union-attr]
        options.offset,  # type: ignore[union-attr]
    )


def identity_of(record: RunRecord) -> ModelIdentity:
    """The weights a compute run used, as its record keeps them."""
    ident = record.params["identity"]
    return ModelIdentity(ident["model"], ident["sha"], bool(ident.get("random_weights", False)))


def ensemble_identity(members: list[ModelIdentity], name: str) -> ModelIdentity:
    """Who scored a mutant: the one checkpoint, or the ensemble (its name and a checksum of its members')."""
    if len(members) == 1:
        return members[0]
    digest = hashlib.sha1(":".join(m.sha for m in members).encode(), usedforsecurity=False).hexdigest()
    return ModelIdentity(name, digest[:16], any(m.random_weights for m in members))


def score_csv(
    store: Store,
    variants: VariantsCsv,
    selection: Selection,
    members: list[ModelIdentity],
    name: str,
    method: str,
    offset: int,
) -> MutantRun:
    """Score every CSV row from the members' stored saturation tables and commit the run: its record, its
    ``mutant_scores`` file and its ``rejected`` rows."""
    from esm_core.variants import mutant_scores

    model = ensemble_identity(members, name)
    key = {"csv": variants.digest, "ingest": selection.ingest_run, "members": [(m.name, m.sha) for m in members],
           "method": method, "offset": offset}  # fmt: skip
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
    run_id = f"{MUTANTS_KIND}-{digest[:16]}"
    record = RunRecord(run_id=run_id, kind=MUTANTS_KIND, counts=ComputeCounts(),
                       params={"variants": variants.path, "ingest_run": selection.ingest_run, "method": method,
                               "offset": offset, "model": model.name, "sha": model.sha,
                               "members": [{"model": m.name, "sha": m.sha} for m in members]})  # fmt: skip
    record.save(store)
    by_id: dict[str, list[dict]] = {}
    for row in selection.records.to_pylist():
        found = by_id.setdefault(row["seq_id"], [])
        if all(r["seq_hash"] != row["seq_hash"] for r in found):
            found.append(row)
    hashes = sorted({r["seq_hash"] for rows in by_id.values() for r in rows})
    tables = saturation_tables(store, members, method, hashes)
    labels: dict[str, list[MutantRow]] = {}
    refused: dict[int, tuple[str, str]] = {}  # row index -> (reason, seq_hash or "")
    for row in variants.rows:
        named = by_id.get(row.seq_id, [])
        if not named:
            refused[row.index] = (f"sequence id {row.seq_id!r} is not an accepted record of the input", "")
        elif len(named) > 1:
            refused[row.index] = (f"sequence id {row.seq_id!r} names {len(named)} different sequences", "")
        elif named[0]["seq_hash"] not in tables:
            why = f"sequence {row.seq_id!r} has no saturation table (its compute run rejected it)"
            refused[row.index] = (why, named[0]["seq_hash"])
        else:
            labels.setdefault(named[0]["seq_hash"], []).append(row)
    scored: dict[int, dict] = {}  # row index -> mutant_scores row (written in CSV order)
    for seq_hash, rows in labels.items():
        results = mutant_scores(tables[seq_hash], [r.mutant for r in rows], offset)
        for row, result in zip(rows, results, strict=True):
            if result.error is not None:
                refused[row.index] = (result.error, seq_hash)
                continue
            scored[row.index] = {"seq_hash": seq_hash, "seq_id": row.seq_id, "mutant": row.mutant,
                                 "score": result.score,
                                 "member_scores": list(result.member_scores or (result.score,))}  # fmt: skip
    n = len(scored)
    common = {"model": model.name, "model_sha": model.sha, "method": method, "run_id": run_id,
              "members": [m.name for m in members]}  # fmt: skip
    table = pa.Table.from_pylist(
        [{**scored[i], **common} for i in sorted(scored)], schema=MUTANT_SCORES_SCHEMA
    )
    path = mutants.write_mutant_scores(store, model, run_id, table)
    lengths = {r["seq_hash"]: r["length"] for rows in by_id.values() for r in rows}
    rejected = [
        {"record_index": index, "seq_id": row.seq_id, "description": row.mutant, "source": variants.path,
         "rule": mutants.INVALID_MUTANT_RULE, "reason": refused[index][0],
         "length": lengths.get(refused[index][1])}
        for index, row in enumerate(variants.rows) if index in refused
    ]  # fmt: skip
    mutants.write_mutant_rejections(store, run_id, pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA))
    write_catalog(store.root)  # a new model directory of mutant_scores answers SQL at once
    assert isinstance(record.counts, ComputeCounts)
    record.counts.sequences = len(labels)
    record.counts.outputs = str(path.parent)
    record.finish(
        store, "completed", f"{n} mutant(s) scored, {len(rejected)} rejected ({mutants.INVALID_MUTANT_RULE})"
    )
    return MutantRun(run_id, model, n, len(rejected), len(labels), path)


def saturation_tables(store: Store, members: list[ModelIdentity], method: str, hashes: list[str]) -> dict:
    """seq_hash -> esm_core's VariantScores (one member) or EnsembleScores (several), rebuilt from the stored
    rows; a sequence some member lacks is left out. The residue index of a row is its position minus the
    sequence's first position, whatever --offset its run numbered them from."""
    from esm_core.variants import AMINO_ACIDS, EnsembleScores, VariantScores

    column = {aa: i for i, aa in enumerate(AMINO_ACIDS)}
    per_member: list[dict[str, tuple[str, np.ndarray]]] = []
    for member in members:
        rows = mutants.read_saturation(store, member, method, hashes)
        found: dict[str, tuple[str, np.ndarray]] = {}
        keys = np.asarray(rows.column("seq_hash").to_pylist(), dtype=object)
        positions = rows.column("position").to_numpy()
        wts = rows.column("wt").to_pylist()
        cols = np.fromiter((column.get(m, -1) for m in rows.column("mt").to_pylist()), np.int64, len(rows))
        scores = rows.column("score").to_numpy(zero_copy_only=False)
        starts = [0] + [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + [len(keys)]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            index = positions[a:b] - positions[a:b].min()
            length = int(index.max()) + 1
            table = np.full((length, len(AMINO_ACIDS)), np.nan, np.float32)
            keep = cols[a:b] >= 0
            table[index[keep], cols[a:b][keep]] = scores[a:b][keep]
            sequence = ["X"] * length
            for i, wt in zip(index.tolist(), wts[a:b], strict=True):
                sequence[i] = wt
            found[keys[a]] = ("".join(sequence), table)
        per_member.append(found)
    out: dict = {}
    for seq_hash in hashes:
        if not all(seq_hash in found for found in per_member):
            continue
        sequence, _ = per_member[0][seq_hash]
        if len(members) == 1:
            out[seq_hash] = VariantScores(seq_hash, sequence, method, per_member[0][seq_hash][1], "stored")
        else:
            stack = np.stack([found[seq_hash][1] for found in per_member])
            out[seq_hash] = EnsembleScores(
                seq_hash, sequence, method, tuple(m.name for m in members), tuple(m.sha for m in members),
                stack, any(m.random_weights for m in members), "stored",
            )  # fmt: skip
    return out
