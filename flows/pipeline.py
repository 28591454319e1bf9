"""The compute pipeline as Prefect flows: ingest -> plan shards -> Ray actor pool -> Parquet -> catalog.

    embed_flow(job) / fold_flow(job)
      start-workers   actors load the model (the CLI starts them while Prefect's API boots)
      ingest          FASTA -> members/rejected/sequences (idempotent by content; done already by the CLI)
      plan            sequences lacking results for this model's weights, cut into cost-balanced shards
      compute         a Prefect task that drives the Ray actors; each shard's output committed atomically
      catalog         catalog.sql rewritten so the new results answer SQL at once
      finish          completeness checked against the store; run record completed, partial or failed

Prefect stays in this driver process; the actors get plain data only. Everything about files is storage's.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.cluster import ray_session
from flows.engines import EngineIdentity, ShardResult, ShardTask, wanted_rows
from flows.job import Job, RunFailed
from flows.planning import COSTS, shard_sizes
from flows.pool import ActorPool, Dispatched
from flows.progress import ProgressBar
from flows.resources import resolve_pool
from storage import plans, results, shards
from storage.catalog import write_catalog
from storage.ingest import ingest
from storage.layout import Store
from storage.locks import Lease, StoreLock
from storage.runs import ComputeCounts, IngestCounts, RunRecord, load_run, package_versions

VERSIONED_PACKAGES = ("proteoflow", "torch", "transformers", "ray", "prefect", "pyarrow", "duckdb")


@dataclass
class Planned:
    """A run opened for this attempt: its record, its plan and the shards earlier attempts finished."""

    record: RunRecord
    plan: plans.Plan
    done: set[int]
    distrusted: dict[int, str]
    lease: Lease


# ------------------------------------------------------------------------------------------ start-up handoff

_prestarted: ActorPool | None = None


def prestart_workers(job: Job) -> ActorPool:
    """Create the actors before the flow starts, so the model loads while Prefect's API boots; the flow's
    start-workers task adopts them."""
    global _prestarted
    _prestarted = ActorPool(job.kind, job.model, job.options, job.pool)
    return _prestarted


# ---------------------------------------------------------------------------------------------- tasks


@task(name="start-workers", cache_policy=NONE)
def start_workers(job: Job) -> ActorPool:
    """The actors (already loading the model if the CLI started them), each holding one copy of the model."""
    global _prestarted
    pool, _prestarted = _prestarted, None
    return pool or ActorPool(job.kind, job.model, job.options, job.pool)


@task(name="ingest", cache_policy=NONE)
def ingest_inputs(job: Job) -> tuple[str, IngestCounts]:
    """The inputs' ingest run (ingesting them unless the caller already did) and its counts."""
    store = Store(job.store)
    if job.ingest_run:
        record = load_run(store, job.ingest_run)
        if record is not None and isinstance(record.counts, IngestCounts):
            return job.ingest_run, record.counts
    result = ingest(store, job.inputs, min_length=job.min_length, max_length=job.max_length)
    return result.run_id, result.counts


@task(name="plan", cache_policy=NONE)
def plan_shards(job: Job, ingest_run: str, identity: EngineIdentity) -> Planned:
    """Open (or resume) the run record and its plan, and claim the plan's sequences with a lease.

    Planning holds a short lock per model weights, so two runs never claim the same sequence: a sequence
    another live run has claimed is skipped here and waited for at the end. Shards of earlier attempts count
    as done only when their outputs are intact (a lost or damaged output is quarantined and recomputed)."""
    store = Store(job.store)
    run_id = job.run_id or run_id_for(job, ingest_run, identity)
    record = open_run(store, job, run_id, ingest_run, identity)
    cost = COSTS[job.kind]
    plan = plans.load_plan(store, run_id, cost)
    distrusted: dict[int, str] = {}
    if plan is not None:  # this run's own lost or damaged outputs: quarantined, their shards computed again
        _, distrusted = shards.trusted_done(store, run_id, plan.plan_id)
        for shard_id, why in distrusted.items():
            shards.quarantine_outputs(store, run_id, shard_id, f"shard record says done but {why}")
    wanted = wanted_rows(job.kind, job.options, identity)
    results.refuse_damaged(store, identity.model, [r.table for r in wanted])
    with StoreLock(store, f"plan-{identity.model.sha}"):
        done = results.done_hashes(store, identity.model, wanted)
        claimed = plans.claimed_by_others(store, identity.model.sha, run_id)
        pending = plans.Pending(store, [ingest_run], pa.concat_arrays([done, claimed]))  # a query: streamed
        if plan is None or not plans.covers(plan, pending):
            sizes = shard_sizes(plans.length_counts(pending), cost, job.pool.workers or 1)
            first = shards.next_shard_id(store, run_id)
            plan = plans.write_pending_plan(store, run_id, pending, sizes, cost, first)
        lease = Lease(store, run_id, identity.model.sha).start()
    done_shards, _ = shards.trusted_done(store, run_id, plan.plan_id)
    shards.quarantine_leftovers(
        store, run_id, [s for s in plan.shards if s not in done_shards], identity.model
    )
    return Planned(record, plan, done_shards, distrusted, lease)


@task(name="compute", cache_policy=NONE)
def compute_shards(job: Job, pool: ActorPool, planned: Planned, identity: EngineIdentity) -> ComputeCounts:
    """Drive the Ray actors over the shards not yet done; each actor commits its shard's outputs to the
    store itself and returns their manifest, from which the driver writes the shard's record.

    Rows the store already holds are never written twice: the driver reads, once, the keys stored for the
    planned sequences (a later run adding a layer or pooling, say) and sends each shard only its own
    sequences' keys, which the actor leaves out. While this run's lease is held no other run computes its
    sequences, so those keys stay right. If the lease lapsed (a stalled driver) another run may have written
    some of the shard's rows meanwhile: before recording the shard, the driver reads the keys now stored for
    its sequences in files other than the shard's own and rewrites the shard's outputs without them (rare,
    the one case where rows pass through the driver). Outputs are always whole before the shard's record."""
    store, record, plan = Store(job.store), planned.record, planned.plan
    logger = get_run_logger()
    todo = [s for s in plan.shards if s not in planned.done]
    counts = record.counts
    assert isinstance(counts, ComputeCounts)
    logger.info(
        "%d shards (%d sequences); %d done by earlier attempts; %d to compute",
        len(plan.shards), plan.sequences, len(planned.done), len(todo),
    )  # fmt: skip
    planned_hashes = plan.hashes(todo)
    wanted = wanted_rows(job.kind, job.options, identity)
    existing = {
        rows.table: keys_by_hash(results.existing_keys(store, rows.table, identity.model, planned_hashes))
        for rows in wanted
    }
    root = str(store.root.absolute())  # actors may run in another working directory
    before = sum(plan.shards[s].residues for s in planned.done)
    state = {
        "residues": before,
        "computed": 0,
        "errors": 0,
        "fallbacks": 0,
        "driver_bytes": 0,
        "result_bytes": 0,
    }
    bar = ProgressBar(job.kind, plan.residues) if job.progress else None
    started = time.monotonic()

    def shard_task(shard_id: int) -> ShardTask:
        items = plan.items(shard_id)
        known = {
            table: {k for h, _ in items for k in by_hash.get(h, ())} for table, by_hash in existing.items()
        }
        return ShardTask(shard_id, items, record.run_id, root, identity.model, known)

    def on_done(shard_id: int, result: ShardResult, sent: Dispatched) -> None:
        outputs = result.outputs
        unseen = results.missing_outputs(store, outputs)
        if unseen:  # written where this driver cannot see: a local path that is not every node's
            raise RunFailed(
                f"shard {shard_id}: a worker wrote {unseen[0]} but the store at {store.root} does not hold it as "
                "this driver sees it; on a cluster the store must be on object storage (s3://...) or a file "
                "system every Ray node mounts at the same path"
            )
        if not planned.lease.held():  # lapsed (a stalled driver): another run may have taken these sequences
            hashes = plan.hashes([shard_id])
            own = [store.root / out.path for out in outputs]
            stored = {
                r.table: results.existing_keys(store, r.table, identity.model, hashes, skip=own)
                for r in wanted
            }
            outputs = results.rewrite_without_existing(store, record.run_id, shard_id, outputs, stored)
        shards.write_compute_rejections(
            store, record.run_id, shard_id, result.errors, record.params["ingest_run"]
        )
        summary = plan.shards[shard_id]
        shards.write_shard_record(store, record.run_id, shards.ShardRecord(
            shard_id, "done", counts.attempts, sent.tries, summary.sequences, result.residues, len(result.errors),
            result.fallbacks, result.seconds, f"slot-{sent.slot}", plan_id=plan.plan_id, outputs=outputs))  # fmt: skip
        state["residues"] += summary.residues
        state["computed"] += result.residues
        state["errors"] += len(result.errors)
        state["fallbacks"] += result.fallbacks
        state["driver_bytes"] += result.driver_bytes
        state["result_bytes"] += result.result_bytes

    def on_tick(partial: int) -> None:
        if bar is not None:
            bar.update(state["residues"] + partial)

    try:
        report = pool.run(todo, shard_task, on_done, on_tick)
    except KeyboardInterrupt:
        counts.shards, counts.shards_done_before = len(plan.shards), len(planned.done)
        record.finish(store, "interrupted", "interrupted; rerun the same command to resume")
        raise
    finally:
        if bar is not None:
            bar.finish()
    for shard_id, error in report.failed.items():
        summary = plan.shards[shard_id]
        shards.write_shard_record(store, record.run_id, shards.ShardRecord(
            shard_id, "failed", counts.attempts, job.pool.max_attempts, summary.sequences, error=error,
            plan_id=plan.plan_id))  # fmt: skip
    elapsed = time.monotonic() - started
    counts.shards, counts.shards_done_before = len(plan.shards), len(planned.done)
    counts.shards_computed, counts.shards_failed = len(report.computed), len(report.failed)
    counts.failed = {str(k): v for k, v in report.failed.items()}
    counts.retries, counts.replaced_workers = report.retries, report.replaced_actors
    counts.sequences, counts.residues, counts.computed_residues = (
        plan.sequences,
        plan.residues,
        state["computed"],
    )
    counts.isolated_errors, counts.fallbacks = state["errors"], state["fallbacks"]
    counts.driver_bytes, counts.result_bytes = state["driver_bytes"], state["result_bytes"]
    counts.compute_seconds = elapsed
    counts.residues_per_s = state["computed"] / elapsed if elapsed > 0 else 0.0
    return counts


def keys_by_hash(keys: set[str]) -> dict[str, list[str]]:
    """``seq_hash/key`` strings grouped by sequence, so each shard's share is found without a scan."""
    grouped: dict[str, list[str]] = {}
    for key in keys:
        grouped.setdefault(key.partition("/")[0], []).append(key)
    return grouped


@task(name="catalog", cache_policy=NONE, retries=2, retry_delay_seconds=1)
def refresh(job: Job) -> None:
    """Rewrite catalog.sql so the new results answer SQL at once (and any DuckDB client can read them)."""
    write_catalog(job.store)


@task(name="finish", cache_policy=NONE)
def finish(
    job: Job, planned: Planned, identity: EngineIdentity, ingested: IngestCounts, started: float
) -> RunRecord:
    """Check the store holds every planned row; the run is ``completed`` only then, else ``partial``."""
    store, record = Store(job.store), planned.record
    counts = record.counts
    assert isinstance(counts, ComputeCounts)
    counts.ingest = asdict(ingested)
    counts.attempt_log.append({
        "attempt": counts.attempts, "shards_computed": counts.shards_computed,
        "shards_failed": counts.shards_failed, "wall_seconds": time.monotonic() - started})  # fmt: skip
    main = wanted_rows(job.kind, job.options, identity)[0].table
    counts.outputs = str(results.model_dir(store, main, identity.model))
    planned.lease.release()
    missing = len(missing_results(store, job, planned, identity))
    if counts.shards_failed:
        failed = ", ".join(f"{k}: {v}" for k, v in list(counts.failed.items())[:3])
        record.finish(store, "partial", f"{counts.shards_failed} shard(s) failed after retries ({failed}); "
                                        "rerun the same command to retry them")  # fmt: skip
    elif missing:
        record.finish(store, "partial", f"{missing} sequence(s) of the input lack results after the run; rerun the "
                                        "same command to compute them")  # fmt: skip
    else:
        record.finish(store, "completed")
    return record


# ---------------------------------------------------------------------------------------------- flows


def _pipeline(job: Job) -> RunRecord:
    started = time.monotonic()
    planned = None
    with ray_session(job.ray_address, ship_code=job.ship_code) as cluster:
        job.pool = resolve_pool(job.pool, cluster)
        pool = start_workers(job)
        try:
            ingest_run, ingested = ingest_inputs(job)
            identity = pool.identity()
            planned = plan_shards(job, ingest_run, identity)
            assert isinstance(planned.record.counts, ComputeCounts)
            planned.record.counts.placements = pool.placements()
            compute_shards(job, pool, planned, identity)
            for _ in range(MAX_ROUNDS - 1):
                # Sequences another run claimed were skipped; once no live claim covers what is still
                # missing (that run finished other rows, or stopped), this run computes the rest itself.
                # Shards that failed after their retries are not retried again here: the run ends partial.
                if planned.record.counts.shards_failed or not wait_for_claims(
                    Store(job.store), job, planned, identity
                ):
                    break
                planned = plan_shards(job, ingest_run, identity)
                compute_shards(job, pool, planned, identity)
        except KeyboardInterrupt:
            if planned is not None and planned.record.status == "running":
                planned.record.finish(
                    Store(job.store), "interrupted", "interrupted; rerun the same command to resume"
                )
            raise
        except Exception as exc:
            if planned is not None and planned.record.status == "running":
                planned.record.finish(Store(job.store), "failed", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            pool.shutdown()
            if planned is not None and planned.record.status != "running":
                planned.lease.release()
    refresh(job)
    record = finish(job, planned, identity, ingested, started)
    if record.status != "completed":
        raise RunFailed(record.message, record)
    return record


@flow(name="proteoflow-embed", log_prints=True)
def embed_flow(job: Job) -> RunRecord:
    """ESM embeddings for every sequence of the inputs that this model has not embedded yet."""
    return _pipeline(job)


@flow(name="proteoflow-fold", log_prints=True)
def fold_flow(job: Job) -> RunRecord:
    """ESMFold structures for every sequence of the inputs that this model has not folded yet."""
    return _pipeline(job)


@flow(name="proteoflow-score-variants", log_prints=True)
def score_variants_flow(job: Job) -> RunRecord:
    """Saturation variant-effect tables for every sequence of the inputs this model has not scored by the
    job's method yet."""
    return _pipeline(job)


@flow(name="proteoflow-predict", log_prints=True)
def predict_flow(job: Job) -> RunRecord:
    """Classification-head predictions for every sequence of the inputs this head has not predicted yet."""
    return _pipeline(job)


FLOWS = {
    "embed": embed_flow,
    "fold": fold_flow,
    "score-variants": score_variants_flow,
    "predict": predict_flow,
}


# ---------------------------------------------------------------------------------------------- runs


def run_id_for(job: Job, ingest_run: str, identity: EngineIdentity) -> str:
    """Same inputs, model weights and options -> same run id, so a rerun resumes instead of starting over."""
    key = json.dumps(
        {"kind": job.kind, "ingest": ingest_run, "model": identity.model.name, "sha": identity.model.sha,
         "options": asdict(job.options)},
        sort_keys=True, default=str,
    )  # fmt: skip
    return f"{job.kind}-{hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]}"


def run_params(job: Job, ingest_run: str, identity: EngineIdentity) -> dict:
    """What a compute run records as its parameters (JSON in the ``runs`` view)."""
    return {"model": job.model, "engine_options": asdict(job.options), "pool": asdict(job.pool),
            "inputs": job.inputs, "ingest_run": ingest_run, "identity": identity.to_dict(),
            "fingerprint": job.fingerprint}  # fmt: skip


def open_run(store: Store, job: Job, run_id: str, ingest_run: str, identity: EngineIdentity) -> RunRecord:
    """The run's record, created or resumed (a resumed record must hold the same work), marked running."""
    record = load_run(store, run_id)
    if record is None:
        record = RunRecord(run_id=run_id, kind=job.kind, params=run_params(job, ingest_run, identity),
                           counts=ComputeCounts(), versions=package_versions(VERSIONED_PACKAGES))  # fmt: skip
    else:
        check_same_run(record, job, ingest_run, identity)
        record.params["fingerprint"] = job.fingerprint or record.params.get("fingerprint", "")
    assert isinstance(record.counts, ComputeCounts)
    record.counts.attempts += 1
    record.status, record.finished_at, record.message = "running", None, ""
    record.save(store)
    return record


def check_same_run(record: RunRecord, job: Job, ingest_run: str, identity: EngineIdentity) -> None:
    """Resuming is only for the same work: refuse a run id that holds other inputs, options or weights."""

    def canonical(value: object) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    differences = [
        name
        for name, old, new in (
            ("kind", record.kind, job.kind),
            ("inputs", record.params.get("ingest_run"), ingest_run),
            ("options", canonical(record.params.get("engine_options")), canonical(asdict(job.options))),
            ("weights", record.params.get("identity", {}).get("sha"), identity.model.sha),
        )
        if old != new
    ]
    if differences:
        raise RunFailed(
            f"run {record.run_id} already holds other {', '.join(differences)}; choose another --run-id"
        )


def missing_results(store: Store, job: Job, planned: Planned, identity: EngineIdentity) -> pa.Array:
    """Sequences of the run's input that still lack a wanted row, not counting those this run isolated as
    failing to compute."""
    ingest_run = planned.record.params["ingest_run"]
    have = results.done_hashes(store, identity.model, wanted_rows(job.kind, job.options, identity))
    rejected = pa.array(sorted(shards.rejected_hashes(store, planned.record.run_id, ingest_run)), pa.string())
    todo = plans.pending_sequences(
        store, [ingest_run], pa.concat_arrays([have, rejected]), columns=("seq_hash",)
    )  # the hashes alone: at 10^7 sequences the residues would be gigabytes
    return todo.column("seq_hash").combine_chunks()


CLAIM_POLL_S = 2.0
MAX_ROUNDS = 3  # plan-and-compute rounds in one attempt (more only when other runs keep claiming sequences)


def wait_for_claims(store: Store, job: Job, planned: Planned, identity: EngineIdentity) -> int:
    """Release this run's lease, then wait while other live runs hold claims on sequences this run still
    lacks (they are computing them); returns how many sequences are still missing after that (0: done)."""
    planned.lease.release()
    logger = get_run_logger()
    while True:
        missing = missing_results(store, job, planned, identity)
        if not len(missing):
            return 0
        claimed = plans.claimed_by_others(store, identity.model.sha, planned.record.run_id)
        waiting = pc.sum(pc.is_in(missing, value_set=claimed)).as_py() or 0
        if not waiting:
            return len(missing)
        logger.info("waiting for %d sequence(s) another live run has claimed", waiting)
        time.sleep(CLAIM_POLL_S)
