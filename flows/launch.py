"""Running a compute job from the command line, fast where it can be:

1. checks that need no cluster: the checkpoint exists and fits the options (layers), in well under a second;
2. ingest of the inputs (a no-op for content already in the store);
3. a fast path: when the checkpoint's files are ones the store has seen (same fingerprint) and every sequence
   already has its rows, the run ends here, without Prefect, Ray or the model;
4. otherwise Prefect's temporary API boots on a thread while Ray starts and the actors load the model, and
   the flow (flows.pipeline) runs once both are up.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from esm_core.preflight import CheckpointInfo, inspect_checkpoint
from esm_core.weights import RANDOM_WEIGHTS_NOTICE
from flows.engines import EmbedOptions, EngineIdentity, resolve_layers, wanted_rows
from flows.errors import CliError
from flows.progress import ProgressBar
from flows.runlog import RunLog
from storage import plans, results
from storage.ingest import ingest
from storage.layout import Store
from storage.results import ModelIdentity
from storage.runs import ComputeCounts, RunRecord, list_runs, load_run

CHECKPOINT_KIND = {"embed": "esm", "fold": "esmfold"}


@dataclass
class Launched:
    """How a launch ended: the run record, and whether the fast path answered without computing."""

    record: RunRecord
    nothing_to_do: bool = False


def preflight(kind: str, model: str, options: object) -> CheckpointInfo:
    """The checkpoint's description, or a one-line CliError for a missing model or layers it does not have."""
    from esm_core.sources import ModelNotFoundError

    try:
        info = inspect_checkpoint(model, kind=CHECKPOINT_KIND[kind])
    except ModelNotFoundError as exc:
        raise CliError(str(exc)) from None
    if isinstance(options, EmbedOptions) and info.num_layers is not None:
        try:
            resolve_layers(options.layers, info.num_layers)
        except ValueError as exc:
            raise CliError(f"--layers: {exc}") from None
    return info


def known_identity(store: Store, job, info: CheckpointInfo) -> EngineIdentity | None:
    """The weights checksum of a checkpoint whose exact files an earlier run of this store loaded."""
    for record in list_runs(store):
        ident = record.params.get("identity")
        if record.kind == job.kind and ident and record.params.get("fingerprint") == info.fingerprint:
            model = ModelIdentity(ident["model"], ident["sha"], bool(ident.get("random_weights")))
            if isinstance(job.options, EmbedOptions):
                layers = resolve_layers(job.options.layers, int(ident["num_layers"]))
                return EngineIdentity(
                    model, int(ident["dim"]), int(ident["num_layers"]), layers, job.options.poolings
                )
            return EngineIdentity(model)
    return None


def nothing_left(store: Store, job, identity: EngineIdentity) -> RunRecord | None:
    """The run's record, completed, when every sequence of the ingest run already has its rows; else None."""
    from flows.pipeline import open_run, run_id_for

    wanted = wanted_rows(job.kind, job.options, identity)
    todo = plans.pending_sequences(
        store, [job.ingest_run], results.done_hashes(store, identity.model, wanted)
    )
    if todo.num_rows:
        return None
    run_id = job.run_id or run_id_for(job, job.ingest_run, identity)
    previous = load_run(store, run_id)
    if previous is not None and previous.status == "completed":
        return previous
    record = open_run(store, job, run_id, job.ingest_run, identity)
    assert isinstance(record.counts, ComputeCounts)
    record.counts.outputs = str(results.model_dir(store, wanted[0].table, identity.model))
    record.finish(store, "completed", "nothing to compute: every sequence already has its results")
    return record


def launch(
    job, log: RunLog, report: Callable[[Launched], None], verbose: bool = False, err: TextIO = sys.stderr
) -> Launched:
    """Run ``job`` (a flows.pipeline.Job) as quickly as the store allows; see the module docstring."""
    store = Store(job.store)
    info = preflight(job.kind, job.model, job.options)
    job.fingerprint = info.fingerprint
    bar = ProgressBar(f"{job.kind}: ingest", unit="records") if job.progress else None
    ingested = ingest(store, job.inputs, min_length=job.min_length, max_length=job.max_length,
                      progress=(lambda p: bar.update(p["records"])) if bar else None)  # fmt: skip
    if bar is not None:
        bar.finish(f"{job.kind}: input {ingested.run_id}: {ingested.counts.accepted:,} records accepted, "
                   f"{ingested.counts.rejected:,} rejected, {ingested.counts.distinct:,} distinct sequences")  # fmt: skip
    job.ingest_run = ingested.run_id
    identity = known_identity(store, job, info)
    if identity is not None:
        record = nothing_left(store, job, identity)
        if record is not None:
            launched = Launched(record, nothing_to_do=True)
            report(launched)
            return launched
    if info.random_weights:
        err.write(RANDOM_WEIGHTS_NOTICE.format(name=info.name) + "\n")
    if job.progress:
        err.write(f"{job.kind}: starting Ray and the workers ({info.name})...\n")
        err.flush()
    return Launched(_run_flow(job, verbose, log, lambda record: report(Launched(record))))


def _run_flow(job, verbose: bool, log: RunLog, report: Callable[[RunRecord], None]) -> RunRecord:
    """Start Prefect's API (own child process), Ray and the actors together, then run the flow; the summary
    is reported before Ray and the API are shut down (that takes seconds)."""
    from flows.cluster import ray_session
    from flows.prefect_api import TemporaryApi, api_configured
    from flows.resources import resolve_pool

    api = None if api_configured() else TemporaryApi()
    if api is not None:
        api.start()
    record = None
    try:
        with ray_session(job.ray_address, ship_code=job.ship_code, quiet=not verbose) as cluster:
            job.pool = resolve_pool(job.pool, cluster)
            from flows.pipeline import FLOWS, RunFailed, prestart_workers

            prestart_workers(job)
            if api is not None:
                api.wait_ready()
            try:
                record = FLOWS[job.kind](job)
            except RunFailed as exc:
                record = exc.record
                raise
            report(record)
            if api is not None:
                api.stop(wait=False)  # ends while Ray shuts down
            return record
    finally:
        if record is not None:
            log.save(Store(job.store).log_path(record.run_id))
        if api is not None:
            api.stop()
