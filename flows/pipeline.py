"""The compute pipeline as Prefect flows: ingest -> plan shards -> Ray actor pool -> Parquet -> catalog.

    embed_flow(job) / fold_flow(job)
      start_workers   actors begin loading the model while the input is ingested
      ingest          FASTA -> members/rejected/sequences (idempotent by content)
      plan            (seq_hash, model) pairs not yet computed, cut into cost-balanced shards
      compute         a Prefect task that drives the Ray actors; each shard's output committed atomically
      refresh         DuckDB views checked and catalog.sql rewritten
      finish          run record completed (or partial, with the failed shards' errors)

Prefect stays in this driver process; the actors get plain data only.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.cluster import ray_session
from flows.engines import ShardOutput
from flows.output import ProgressLine
from flows.planning import Plan, embedding_cost, folding_cost, load_plan, pending_sequences, write_plan
from flows.pool import ActorPool, PoolOptions
from flows.resources import resolve_pool
from storage import results
from storage.catalog import refresh_catalog
from storage.ingest import ingest
from storage.layout import Store, write_table_atomic
from storage.runs import RunRecord, load_run, package_versions, utcnow
from storage.schemas import REJECTED_SCHEMA, SHARD_SCHEMA

COSTS = {"embed": embedding_cost, "fold": folding_cost}


@dataclass
class Job:
    """Everything a run needs, as plain data (it is also what the run record stores as parameters)."""

    kind: str  # "embed" | "fold"
    store: str
    inputs: list[str]
    model: str
    engine_options: dict = field(default_factory=dict)
    pool: PoolOptions = field(default_factory=PoolOptions)
    min_length: int | None = None
    max_length: int | None = None
    run_id: str | None = None
    ray_address: str | None = None
    ship_code: bool = False
    progress: bool = True


class RunFailed(Exception):
    """The run ended partial or failed; the message says which shards and why."""

    def __init__(self, message: str, record: RunRecord | None = None) -> None:
        super().__init__(message)
        self.record = record


# ---------------------------------------------------------------------------------------------- tasks


@task(name="start-workers", cache_policy=NONE)
def start_workers(job: Job) -> ActorPool:
    """Create the actors; they load the model in the background while ingest runs."""
    return ActorPool(job.kind, job.model, job.engine_options, job.pool)


@task(name="ingest", cache_policy=NONE)
def ingest_inputs(job: Job) -> dict:
    """Ingest the inputs (a no-op for content already ingested); returns the ingest run id and counts."""
    result = ingest(Store(job.store), job.inputs, min_length=job.min_length, max_length=job.max_length)
    return {"run_id": result.run_id, "counts": result.counts, "already": result.already_ingested}


@task(name="plan", cache_policy=NONE)
def plan_shards(job: Job, ingest_run: str, identity: dict) -> tuple[RunRecord, Plan, set[int]]:
    """Open (or resume) the run record and its plan; returns shards already done by earlier attempts."""
    store = Store(job.store)
    run_id = job.run_id or _run_id(job, ingest_run, identity)
    record = load_run(store, run_id)
    params = {
        "model": job.model,
        "engine_options": job.engine_options,
        "pool": asdict(job.pool),
        "inputs": job.inputs,
        "ingest_run": ingest_run,
        "identity": identity,
    }
    if record is None:
        record = RunRecord(
            run_id=run_id,
            kind=job.kind,
            params=params,
            versions=package_versions(
                ("proteoflow", "torch", "transformers", "ray", "prefect", "pyarrow", "duckdb")
            ),
        )
    else:
        _check_same_run(record, job, ingest_run, identity)
    attempt = int(record.counts.get("attempts", 0)) + 1
    record.status, record.finished_at, record.message = "running", None, ""
    record.counts["attempts"] = attempt
    record.save(store)
    plan_file = store.root / "plans" / f"{run_id}.parquet"
    cost = COSTS[job.kind]
    if plan_file.exists():
        plan = load_plan(plan_file, cost)
    else:
        todo = pending_sequences(
            store, [ingest_run], _done_hashes(store, job, identity), pa.array([], pa.string())
        )
        plan = write_plan(store, run_id, todo, cost, job.pool.workers)
    return record, plan, _done_shards(store, run_id)


@task(name="compute", cache_policy=NONE)
def compute_shards(
    job: Job, pool: ActorPool, record: RunRecord, plan: Plan, done: set[int], identity: dict
) -> dict:
    """Drive the Ray actors over the shards not yet done; each result is committed as it arrives."""
    store = Store(job.store)
    logger = get_run_logger()
    todo = [s for s in plan.shards if s not in done]
    total_seqs = plan.sequences
    state = {
        "seqs": sum(plan.shards[s][0] for s in done),
        "residues": sum(plan.shards[s][1] for s in done),
        "new_residues": 0,
        "errors": 0,
        "fallbacks": 0,
    }
    started = time.monotonic()
    bar = ProgressLine(job.kind) if job.progress else None
    logger.info(
        "%d shards (%d sequences); %d already done by earlier attempts; %d to compute",
        len(plan.shards),
        total_seqs,
        len(done),
        len(todo),
    )
    attempt = record.counts["attempts"]
    members = _member_index(store, record.params["ingest_run"])

    planned = plan.hashes()
    existing = {
        table: results.existing_keys(
            store, table, identity["model"], identity["sha"], ROW_KEYS[table], planned
        )
        for table in _tables(job)
    }

    def on_done(shard_id: int, output: ShardOutput, meta: dict) -> None:
        for table, rows in output.tables.items():
            if existing.get(table):  # rows an earlier run already wrote (e.g. another pooling was added)
                keys = pc.binary_join_element_wise(rows.column("seq_hash"), _row_key(rows, table), "/")
                rows = rows.filter(pc.invert(pc.is_in(keys, value_set=pa.array(list(existing[table])))))
            path = results.shard_path(
                store, table, identity["model"], identity["sha"], record.run_id, shard_id
            )
            results.write_shard(path, rows, {"run_id": record.run_id, "shard_id": shard_id})
        if output.errors:
            _write_rejections(store, record.run_id, shard_id, output.errors, members)
        else:
            _rejections_path(store, record.run_id, shard_id).unlink(missing_ok=True)  # left by an earlier try
        n, residues, _ = plan.shards[shard_id]
        _write_shard_record(
            store,
            record.run_id,
            shard_id,
            "done",
            attempt,
            meta["attempts"],
            n,
            output.residues,
            len(output.errors),
            output.fallbacks,
            output.seconds,
            f"slot-{meta['slot']}",
            "",
        )
        state["seqs"] += n
        state["residues"] += residues
        state["new_residues"] += residues
        state["errors"] += len(output.errors)
        state["fallbacks"] += output.fallbacks

    def on_tick() -> None:
        if bar is None:
            return
        elapsed = time.monotonic() - started
        rate = state["new_residues"] / elapsed if elapsed > 0 else 0.0
        left = plan.residues - state["residues"]
        eta = f"{left / rate:,.0f} s" if rate > 0 else "?"
        bar.update(
            f"{state['seqs']:,}/{total_seqs:,} sequences, {state['residues']:,}/{plan.residues:,} residues, "
            f"{rate:,.0f} residues/s, ETA {eta}"
        )

    try:
        report = pool.run(todo, plan.items, record.run_id, on_done, on_tick)
    except KeyboardInterrupt:
        record.counts.update(shards=len(plan.shards), shards_done_before=len(done))
        record.finish(store, "interrupted", "interrupted; rerun the same command to resume")
        raise
    finally:
        if bar is not None:
            on_tick()
            bar.close()
    for shard_id, error in report.failed.items():
        n, residues, _ = plan.shards[shard_id]
        _write_shard_record(
            store,
            record.run_id,
            shard_id,
            "failed",
            attempt,
            job.pool.max_attempts,
            n,
            0,
            0,
            0,
            0.0,
            "",
            error,
        )
    elapsed = time.monotonic() - started
    return {
        "shards": len(plan.shards),
        "shards_done_before": len(done),
        "shards_computed": len(report.computed),
        "shards_failed": len(report.failed),
        "failed": {str(k): v for k, v in report.failed.items()},
        "retries": report.retries,
        "replaced_workers": report.replaced_actors,
        "sequences": total_seqs,
        "residues": plan.residues,
        "computed_residues": state["new_residues"],
        "isolated_errors": state["errors"],
        "fallbacks": state["fallbacks"],
        "compute_seconds": elapsed,
        "residues_per_s": state["new_residues"] / elapsed if elapsed > 0 else 0.0,
    }


@task(name="refresh-catalog", cache_policy=NONE, retries=2, retry_delay_seconds=1)
def refresh(job: Job) -> dict:
    """Re-read the store's views (and rewrite catalog.sql) so the new results answer SQL at once."""
    return refresh_catalog(job.store)


@task(name="finish", cache_policy=NONE)
def finish(job: Job, record: RunRecord, computed: dict, ingested: dict, started: float) -> RunRecord:
    """Complete the run record; ``partial`` when some shards failed after their retries."""
    store = Store(job.store)
    previous_attempts = record.counts.get("attempt_log", [])
    record.counts.update(computed)
    record.counts["ingest"] = ingested["counts"]
    record.counts["attempt_log"] = previous_attempts + [
        {
            "attempt": record.counts["attempts"],
            "shards_computed": computed["shards_computed"],
            "shards_failed": computed["shards_failed"],
            "wall_seconds": time.monotonic() - started,
        }
    ]
    record.counts["outputs"] = str(
        results.model_dir(
            store, _main_table(job.kind), record.params["identity"]["model"], record.params["identity"]["sha"]
        )
    )
    if computed["shards_failed"]:
        failed = ", ".join(f"{k}: {v}" for k, v in list(computed["failed"].items())[:3])
        record.finish(
            store,
            "partial",
            f"{computed['shards_failed']} shard(s) failed after retries ({failed}); "
            "rerun the same command to retry them",
        )
    else:
        record.finish(store, "completed")
    return record


# ---------------------------------------------------------------------------------------------- flows


def _pipeline(job: Job) -> RunRecord:
    started = time.monotonic()
    record = None
    with ray_session(job.ray_address, ship_code=job.ship_code) as cluster:
        job.pool = resolve_pool(job.pool, cluster)
        pool = start_workers(job)
        try:
            ingested = ingest_inputs(job)
            identity = pool.identity()
            placements = pool.placements()
            record, plan, done = plan_shards(job, ingested["run_id"], identity)
            record.counts["placements"] = placements
            computed = compute_shards(job, pool, record, plan, done, identity)
        except Exception as exc:
            if record is not None and record.status == "running":
                record.finish(Store(job.store), "failed", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            pool.shutdown()
    refresh(job)
    record = finish(job, record, computed, ingested, started)
    if record.status != "completed":
        raise RunFailed(record.message, record)
    return record


@flow(name="proteoflow-embed", log_prints=True)
def embed_flow(job: Job) -> RunRecord:
    """ESM-2 embeddings for every sequence of the inputs that this model has not embedded yet."""
    return _pipeline(job)


@flow(name="proteoflow-fold", log_prints=True)
def fold_flow(job: Job) -> RunRecord:
    """ESMFold structures for every sequence of the inputs that this model has not folded yet."""
    return _pipeline(job)


FLOWS = {"embed": embed_flow, "fold": fold_flow}


def _start_prefect_api() -> None:
    """Start Prefect's temporary local API (a subprocess) now, so it boots while Ray starts."""
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().start()


def run_job(job: Job) -> RunRecord:
    """Run a job's flow, overlapping the two slow start-ups: Prefect's temporary API and the local Ray."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    starter = None
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        starter = threading.Thread(target=_start_prefect_api, name="prefect-api", daemon=True)
        starter.start()
    with ray_session(job.ray_address, ship_code=job.ship_code):
        if starter is not None:
            starter.join()
        return FLOWS[job.kind](job)


# ---------------------------------------------------------------------------------------------- helpers


def _main_table(kind: str) -> str:
    return "embeddings" if kind == "embed" else "structures"


# The expression that names one row of a result table for one sequence: what "already computed" is keyed on.
ROW_KEYS = {
    "embeddings": "CAST(layer AS VARCHAR) || ':' || pooling",
    "residue_embeddings": "CAST(layer AS VARCHAR)",
    "contacts": "'contacts'",
    "structures": "'structure'",
}


def _tables(job: Job) -> list[str]:
    """The result tables a job writes."""
    if job.kind == "fold":
        return ["structures"]
    options = job.engine_options
    return (
        ["embeddings"]
        + (["residue_embeddings"] if options.get("per_residue") else [])
        + (["contacts"] if options.get("contacts") else [])
    )


def _required_keys(table: str, identity: dict) -> list[str]:
    if table == "embeddings":
        return [f"{layer}:{pooling}" for layer in identity["layers"] for pooling in identity["poolings"]]
    if table == "residue_embeddings":
        return [str(layer) for layer in identity["layers"]]
    return ["contacts" if table == "contacts" else "structure"]


def _row_key(rows: pa.Table, table: str) -> pa.Array:
    """The ROW_KEYS value of each row, computed with Arrow for a shard's output."""
    if table == "embeddings":
        return pc.binary_join_element_wise(
            pc.cast(rows.column("layer"), pa.string()), rows.column("pooling"), ":"
        )
    if table == "residue_embeddings":
        return pc.cast(rows.column("layer"), pa.string())
    return pa.array(["contacts" if table == "contacts" else "structure"] * rows.num_rows, pa.string())


def _done_hashes(store: Store, job: Job, identity: dict) -> pa.Array:
    """Sequences with every row this job would write already in the store, for this model's weights."""
    done = None
    for table in _tables(job):
        hashes = results.computed_hashes(
            store, table, identity["model"], identity["sha"], ROW_KEYS[table], _required_keys(table, identity)
        )
        done = hashes if done is None else done.filter(pc.is_in(done, value_set=hashes))
    return done


def _check_same_run(record: RunRecord, job: Job, ingest_run: str, identity: dict) -> None:
    """Resuming is only for the same work: refuse a run id that holds other inputs, options or weights."""

    def canonical(value: object) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    differences = [
        name
        for name, old, new in (
            ("kind", record.kind, job.kind),
            ("inputs", record.params.get("ingest_run"), ingest_run),
            ("options", canonical(record.params.get("engine_options")), canonical(job.engine_options)),
            ("weights", record.params.get("identity", {}).get("sha"), identity["sha"]),
        )
        if old != new
    ]
    if differences:
        raise RunFailed(
            f"run {record.run_id} already holds other {', '.join(differences)}; choose another --run-id"
        )


def _run_id(job: Job, ingest_run: str, identity: dict) -> str:
    """Same inputs, model weights and options -> same run id, so a rerun resumes instead of starting over."""
    key = json.dumps(
        {
            "kind": job.kind,
            "ingest": ingest_run,
            "model": identity["model"],
            "sha": identity["sha"],
            "options": job.engine_options,
        },
        sort_keys=True,
        default=str,
    )
    return f"{job.kind}-{hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]}"


def _shard_dir(store: Store, run_id: str):
    return store.run_dir("shards", run_id)


def _rejections_path(store: Store, run_id: str, shard_id: int):
    """Where a shard's isolated sequences are recorded as rejected rows of the compute run."""
    return store.run_dir("rejected", run_id) / f"shard-{shard_id:05d}.parquet"


def _done_shards(store: Store, run_id: str) -> set[int]:
    done = set()
    for path in sorted(_shard_dir(store, run_id).glob("shard-*.parquet")):
        row = pq.read_table(path, columns=["shard_id", "status"]).to_pylist()[0]
        if row["status"] == "done":
            done.add(row["shard_id"])
    return done


def _write_shard_record(
    store: Store,
    run_id: str,
    shard_id: int,
    status: str,
    attempt: int,
    tries: int,
    sequences: int,
    residues: int,
    errors: int,
    fallbacks: int,
    seconds: float,
    worker: str,
    error: str,
) -> None:
    """The shard's record, written after its outputs: its status ``done`` is what resume trusts."""
    row = {
        "shard_id": shard_id,
        "status": status,
        "attempt": attempt,
        "tries": tries,
        "sequences": sequences,
        "residues": residues,
        "errors": errors,
        "fallbacks": fallbacks,
        "seconds": seconds,
        "worker": worker,
        "finished_at": utcnow(),
        "error": error,
    }
    table = pa.Table.from_pylist([row], schema=SHARD_SCHEMA)
    write_table_atomic(
        _shard_dir(store, run_id) / f"shard-{shard_id:05d}.parquet", table, "shard", {"run_id": run_id}
    )


def _member_index(store: Store, ingest_run: str) -> pa.Table:
    files = list(store.run_dir("members", ingest_run).glob("*.parquet"))
    if not files:
        return pa.table(
            {
                "record_index": pa.array([], pa.int64()),
                "seq_id": pa.array([], pa.string()),
                "description": pa.array([], pa.string()),
                "source": pa.array([], pa.string()),
                "seq_hash": pa.array([], pa.string()),
                "length": pa.array([], pa.int32()),
            }
        )
    return pa.concat_tables(
        pq.read_table(f, columns=["record_index", "seq_id", "description", "source", "seq_hash", "length"])
        for f in files
    )


def _write_rejections(
    store: Store, run_id: str, shard_id: int, errors: list[tuple[str, str]], members: pa.Table
) -> None:
    """Each record whose sequence always failed becomes a rejected row of this run, with the error."""
    reasons = dict(errors)
    rows = members.filter(pc.is_in(members.column("seq_hash"), value_set=pa.array(list(reasons))))
    table = pa.table(
        {
            "record_index": rows.column("record_index"),
            "seq_id": rows.column("seq_id"),
            "description": rows.column("description"),
            "source": rows.column("source"),
            "rule": pa.array(["compute_error"] * rows.num_rows),
            "reason": pa.array([reasons[h] for h in rows.column("seq_hash").to_pylist()]),
            "length": rows.column("length"),
        },
        schema=REJECTED_SCHEMA,
    )
    write_table_atomic(
        _rejections_path(store, run_id, shard_id), table, "rejected", {"run_id": run_id, "shard_id": shard_id}
    )
