"""Scheduled runs (``proteoflow serve``, or infra/prefect.yaml and a worker): embed or fold whatever FASTA lies
under a folder, computing only the sequences this model has never computed.

One flow per kind, ``proteoflow-scheduled-embed`` and ``proteoflow-scheduled-fold``, both made by
:func:`_scheduled_flow` from one function: its signature is the one definition of a scheduled run's
parameters. ``proteoflow serve`` builds a deployment's parameters with :func:`parameters_for`, the work-pool
route's infra/prefect.yaml names the same ones, and :func:`job_for` turns them into the CLI's :class:`Job`.

A run:

1. labels its flow run with its store, host and process, and marks ``Crashed`` the runs of that store whose
   process is gone (flows.overlap);
2. takes the store's Prefect concurrency slot: one scheduled run per store at a time; a run due while
   another holds it waits, then computes only what is still missing;
3. runs the CLI's path (flows.launch.launch): checkpoint preflight, ingest of the folder (a no-op for content
   already ingested), the fast path that ends a run with nothing new in seconds without Ray or the model,
   else the very flow ``proteoflow embed|fold`` runs, as a subflow of this one;
4. ends in a state a person reads in the UI: ``Completed``, ``Completed`` named ``Nothing new``, ``Failed``
   named ``Partial`` (shards failed; the next run over the same folder resumes the same run id and retries
   them) or ``Failed`` with the reason; and publishes Prefect artifacts, an HTML report and, for a failed or
   partial run, a notification (flows.publish).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import Flow, flow, get_run_logger
from prefect.states import Completed, Failed, State

from flows.job import Job, PoolOptions
from flows.overlap import StoreGuard
from flows.publish import Outcome, publish
from storage.objects import as_path
from storage.runs import ComputeCounts

KINDS = ("embed", "fold")
FLOW_NAMES = {kind: f"proteoflow-scheduled-{kind}" for kind in KINDS}
NOTHING_NEW = "Nothing new"
PARTIAL = "Partial"


def _scheduled_flow(kind: str) -> Flow:
    """The scheduled flow of one kind: both kinds share this signature (the deployments' parameters) and
    differ only in the flow's name, which names their deployments (``proteoflow-scheduled-<kind>/<name>``)."""

    def scheduled(
        incoming: str,
        store: str,
        model: str,
        engine_options: dict[str, Any] | None = None,
        min_length: int | None = None,
        max_length: int | None = None,
        ray_address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: float | None = None,
        gpus_per_worker: float | None = None,
        max_attempts: int = 3,
        ship_code: bool = False,
        notify: str | None = None,
    ) -> State:
        params = {"incoming": incoming, "store": store, "model": model, "engine_options": engine_options,
                  "min_length": min_length, "max_length": max_length, "ray_address": ray_address,
                  "workers": workers, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
                  "max_attempts": max_attempts, "ship_code": ship_code, "notify": notify}  # fmt: skip
        return run_scheduled(kind, params)

    scheduled.__name__ = scheduled.__qualname__ = f"scheduled_{kind}"
    scheduled.__doc__ = (
        f"{'Embed' if kind == 'embed' else 'Fold'} every sequence of the FASTA files under `incoming` that "
        f"this model has not {'embedded' if kind == 'embed' else 'folded'} yet, into the store at `store`."
    )
    return flow(name=FLOW_NAMES[kind], log_prints=True, persist_result=False)(scheduled)


scheduled_embed = _scheduled_flow("embed")
scheduled_fold = _scheduled_flow("fold")
SCHEDULED: dict[str, Flow] = {"embed": scheduled_embed, "fold": scheduled_fold}


def parameter_names() -> list[str]:
    """The parameters of a scheduled run, in order: the flows' signature, the one place they are defined."""
    return list(inspect.signature(scheduled_fold.fn).parameters)


def parameters_for(job: Job, incoming: str, notify: str | None = None) -> dict[str, Any]:
    """A deployment's parameters for running ``job`` on a schedule over ``incoming`` (the inverse of
    :func:`job_for`); paths are made absolute, since the runs may start in another directory."""
    params = {
        "incoming": str(Path(incoming).resolve()),
        "store": str(as_path(job.store).resolve()),
        "model": _absolute_if_local(job.model),
        "engine_options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(job.options).items()},
        "min_length": job.min_length,
        "max_length": job.max_length,
        "ray_address": job.ray_address,
        "workers": job.pool.workers,
        "cpus_per_worker": job.pool.cpus_per_worker,
        "gpus_per_worker": job.pool.gpus_per_worker,
        "max_attempts": job.pool.max_attempts,
        "ship_code": job.ship_code,
        "notify": notify,
    }
    assert list(params) == parameter_names(), "parameters_for is out of step with the scheduled flows"
    return params


def _absolute_if_local(model: str) -> str:
    """A model given as a local path, absolute (a name or hub id is kept as given)."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def job_for(kind: str, params: dict[str, Any]) -> Job:
    """The CLI's plain-data job for a scheduled run's parameters (a ValueError for unknown engine options)."""
    pool = PoolOptions(
        workers=params.get("workers"),
        cpus_per_worker=params.get("cpus_per_worker"),
        gpus_per_worker=params.get("gpus_per_worker"),
        max_attempts=params.get("max_attempts") or 3,
    )
    return Job(
        kind=kind,
        store=params["store"],
        inputs=[params["incoming"]],
        model=params["model"],
        engine_options=dict(params.get("engine_options") or {}),
        pool=pool,
        min_length=params.get("min_length"),
        max_length=params.get("max_length"),
        ray_address=params.get("ray_address"),
        ship_code=bool(params.get("ship_code")),
        progress=False,
    )


def run_scheduled(kind: str, params: dict[str, Any]) -> State:
    """The body of both scheduled flows; see the module docstring."""
    logger = get_run_logger()
    try:
        job = job_for(kind, params)
    except (ValueError, TypeError) as exc:
        return Failed(message=f"parameters: {exc}")
    guard = StoreGuard(job.store, logger, flow_names=list(FLOW_NAMES.values()))
    guard.announce()
    with guard.holding():
        outcome = compute(job, logger)
    state = final_state(outcome)
    publish(kind, job, outcome, state, params.get("notify"), logger)
    return state


def compute(job: Job, logger: logging.Logger | logging.LoggerAdapter) -> Outcome:
    """Run ``job`` the way ``proteoflow embed|fold`` does (flows.launch); expected failures become an
    :class:`Outcome` with their one-line message instead of a traceback."""
    from flows import runlog
    from flows.errors import CliError
    from flows.job import RunFailed
    from flows.launch import launch
    from flows.pool import WorkerStartError
    from storage.fasta import InputError, is_fasta_name

    started = time.monotonic()
    incoming = Path(job.inputs[0])
    if not incoming.is_dir():
        return Outcome("failed", f"incoming folder {incoming} does not exist or is not a directory")
    if not any(p.is_file() and is_fasta_name(p) for p in incoming.rglob("*")):
        return Outcome("nothing-new", f"no FASTA files under {incoming} yet")
    log = runlog.configure(verbose=True)
    try:
        launched = launch(job, log, report=lambda _: None, err=_LogStream(logger))
    except RunFailed as exc:
        record = exc.record
        status = record.status if record is not None else "failed"
        return Outcome(status, str(exc), record, time.monotonic() - started)
    except (CliError, InputError, WorkerStartError) as exc:
        return Outcome("failed", str(exc), seconds=time.monotonic() - started)
    record = launched.record
    if launched.nothing_to_do:
        message = (
            f"nothing new under {incoming}: every sequence already has its results (run {record.run_id})"
        )
        return Outcome("nothing-new", message, record, time.monotonic() - started)
    return Outcome(record.status, record.message, record, time.monotonic() - started)


def final_state(outcome: Outcome) -> State:
    """The flow run's final state, in words: Completed, Completed "Nothing new", Failed "Partial", Failed."""
    record = outcome.record
    if outcome.status == "nothing-new":
        return Completed(name=NOTHING_NEW, message=outcome.message)
    if outcome.status == "completed" and record is not None:
        counts = record.counts
        assert isinstance(counts, ComputeCounts)
        return Completed(
            message=f"run {record.run_id}: {counts.sequences:,} sequences, {counts.computed_residues:,} residues "
            f"computed at {counts.residues_per_s:,.0f} residues/s"
        )
    where = f"run {record.run_id}: " if record is not None else ""
    if outcome.status == "partial":
        why = outcome.message.split("; rerun the same command")[0]
        return Failed(name=PARTIAL, message=f"{where}{why}; the next run over the same folder resumes this run "
                                            "and retries them")  # fmt: skip
    return Failed(message=f"{where}{outcome.message}")


class _LogStream:
    """A text stream whose lines go to the run's logger (flows.launch writes its notices to a stream)."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.logger.warning(line.strip())
        return len(text)

    def flush(self) -> None:
        return None
