"""Running a compute job from the command line, fast where it can be:

1. checks that need no cluster: the checkpoint exists and fits the options (layers), in well under a second;
2. ingest of the inputs (a no-op for content already in the store);
3. a fast path: when the checkpoint's files are ones the store has seen (same fingerprint) and every sequence
   already has its rows, the run ends here, without Prefect, Ray or the model;
4. otherwise Prefect's temporary API boots (own child process) while Ray starts and the actors load the model,
   and the flow (flows.pipeline) runs once both are up.

Ctrl-C and SIGTERM end the run the same way (see :class:`Interrupts`): the run records itself
``interrupted`` and the command exits 130 or 143 within seconds, with one line on stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TextIO

from esm_core.preflight import CheckpointInfo, inspect_checkpoint
from esm_core.weights import RANDOM_WEIGHTS_NOTICE
from flows.cli_args import check_object_store
from flows.engines import EmbedOptions, EngineIdentity, resolve_layers, wanted_rows
from flows.errors import CliError, Interrupted, note_signal, report_interrupt
from flows.progress import ProgressBar
from flows.runlog import RunLog
from storage import plans, results
from storage.catalog import write_catalog
from storage.ingest import ingest
from storage.layout import Store
from storage.objects import ObjectPath, StorePath
from storage.runs import ComputeCounts, RunRecord, list_runs, load_run, run_path

CHECKPOINT_KIND = {"embed": "esm", "fold": "esmfold", "score-variants": "esm", "predict": "esm"}


@dataclass
class Launched:
    """How a launch ended: the run record, and whether the fast path answered without computing."""

    record: RunRecord
    nothing_to_do: bool = False


class Interrupts:
    """SIGINT (a terminal's Ctrl-C) and SIGTERM both raise :class:`Interrupted` in the main thread, so the run
    ends the way Ctrl-C ends it: the compute task records the run ``interrupted``, the actors are killed,
    Ray and Prefect's API are stopped, and the CLI writes one line and exits 128 + signal.

    Ray's ``init`` and Prefect's flow engine each install their own SIGTERM handler (``sys.exit``, and an
    exception the pipeline does not treat as an interruption): :meth:`keep_sigterm` keeps both off while Ray
    and the flow run.

    Cleanup is bounded: ``grace`` seconds after the first signal, or at once on a second one, the process
    writes the line and exits without further cleanup; the kernel and the reaper (flows.cluster) then end
    Ray's processes and Prefect's API with it, and the run record already says ``interrupted``.

    Inside a Prefect flow run (a served deployment, flows.scheduled) nothing is installed: signals there are
    Prefect's (a cancellation is a SIGTERM from its runner).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, command: str, hint: str = "", grace: float = 8.0) -> None:
        self.command, self.hint, self.grace = command, hint, grace
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self.active = threading.current_thread() is threading.main_thread() and not _inside_flow_run()

    def install(self) -> None:
        """(Re)install the handlers; a no-op outside the main thread (signals go to the main thread only) and
        inside a Prefect flow run."""
        if not self.active:
            return
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """Put back the handlers found by the first :meth:`install` (not after a signal: the process is
        ending, and a second Ctrl-C during its last cleanup must still end it at once, without a traceback)."""
        if self.received is None and self.active:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(report_interrupt(self.command, self.received, self.hint))
        self.received = signum
        note_signal(signum)
        threading.Thread(target=self._exit_after_grace, name="interrupt-grace", daemon=True).start()
        raise Interrupted(signum)

    def _exit_after_grace(self) -> None:
        time.sleep(self.grace)
        assert self.received is not None
        os._exit(report_interrupt(self.command, self.received, self.hint))

    @contextlib.contextmanager
    def keep_sigterm(self) -> Iterator[None]:
        """Start Ray and run a flow with these handlers in place. ``ray.init`` replaces the SIGTERM handler
        with ``sys.exit`` (a SIGTERM during Ray's start-up would end the command with status 15 or 1), and
        Prefect's flow engine with one raising its ``TerminationSignal``, which skips the pipeline's
        ``interrupted`` bookkeeping (Prefect uses it for cancellations sent by its runners, which a command
        line run has none of): both hooks are switched off meanwhile (``prefect.flow_engine.capture_sigterm``
        and ``ray._private.utils.set_sigterm_handler``; absent ones are left alone).

        Ray's C++ core also installs a crash handler for SIGTERM while ``ray.init`` connects the driver (it
        prints a stack dump, then passes the signal on): :meth:`install` again once Ray is up. A SIGTERM in
        that second of ``ray.init`` still ends the command with 143, after a few lines of Ray's."""
        import prefect.flow_engine as engine
        import ray._private.utils as ray_utils

        patches = [(engine, "capture_sigterm", contextlib.nullcontext),
                   (ray_utils, "set_sigterm_handler", lambda handler: None)]  # fmt: skip
        originals = [
            (m, name, getattr(m, name)) for m, name, _ in patches if self.active and hasattr(m, name)
        ]
        for module, name, replacement in patches:
            if any(m is module and n == name for m, n, _ in originals):
                setattr(module, name, replacement)
        self.install()
        try:
            yield
        finally:
            for module, name, original in originals:
                setattr(module, name, original)


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


def _inside_flow_run() -> bool:
    """Whether this thread runs inside a Prefect flow run (never true before Prefect is imported)."""
    context = sys.modules.get("prefect.context")
    return bool(context is not None and context.FlowRunContext.get() is not None)


def check_writable(root: StorePath) -> None:
    """A one-line CliError unless a file can be created in the store (or, for a store not made yet, in the
    directory that will hold it): a read-only mount or a directory without write permission fails here, in
    well under a second, instead of after the ingest or once the model has loaded. Nothing is left behind.
    On an object store: one small object written and deleted (bad credentials, no bucket, no endpoint)."""
    if isinstance(root, ObjectPath):
        check_object_store(root)
        return
    target = root
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise CliError(f"--store {root}: {target} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=target, prefix=".proteoflow-write-check-"):
            pass
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise CliError(f"--store {root}: cannot write in {target} ({reason})") from None


def known_identity(store: Store, job, info: CheckpointInfo) -> EngineIdentity | None:
    """The weights checksum of a checkpoint whose exact files an earlier run of this store loaded."""
    for record in list_runs(store):
        ident = record.params.get("identity")
        if record.kind == job.kind and ident and record.params.get("fingerprint") == info.fingerprint:
            known = EngineIdentity.from_dict(ident)
            if isinstance(job.options, EmbedOptions):  # this job's layers and poolings, on those weights
                layers = resolve_layers(job.options.layers, known.num_layers)
                return replace(known, layers=layers, poolings=job.options.poolings)
            return EngineIdentity(known.model)
    return None


def nothing_left(store: Store, job, identity: EngineIdentity) -> RunRecord | None:
    """The run's record, completed, when every sequence of the ingest run already has its rows; else None."""
    from flows.pipeline import open_run, run_id_for

    wanted = wanted_rows(job.kind, job.options, identity)
    todo = plans.pending_sequences(  # the hashes alone: the residues stay on disk
        store, [job.ingest_run], results.done_hashes(store, identity.model, wanted), columns=("seq_hash",)
    )
    if todo.num_rows:
        return None
    run_id = job.run_id or run_id_for(job, job.ingest_run, identity)
    write_catalog(store.root)  # an earlier attempt may have stopped after its last shard, before the catalog
    previous = load_run(store, run_id)
    if previous is not None and previous.status == "completed":
        return previous
    record = open_run(store, job, run_id, job.ingest_run, identity)
    assert isinstance(record.counts, ComputeCounts)
    record.counts.outputs = str(results.model_dir(store, wanted[0].table, identity.model))
    record.finish(store, "completed", "nothing to compute: every sequence already has its results")
    return record


def launch(
    job, log: RunLog, report: Callable[[Launched], None], verbose: bool = False, err: TextIO | None = None
) -> Launched:
    """Run ``job`` (a flows.pipeline.Job) as quickly as the store allows; see the module docstring."""
    err = err or sys.stderr  # resolved per call: a default bound at import outlives a redirected stream
    interrupts = Interrupts(job.kind, hint="; rerun the same command to resume")
    interrupts.install()
    try:
        return _launch(job, log, report, verbose, err, interrupts)
    finally:
        interrupts.restore()


def _launch(job, log: RunLog, report, verbose: bool, err: TextIO, interrupts: Interrupts) -> Launched:
    store = Store(job.store)
    info = preflight(job.kind, job.model, job.options)
    check_writable(store.root)
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
    return Launched(_run_flow(job, verbose, log, lambda record: report(Launched(record)), interrupts))


def _run_flow(
    job, verbose: bool, log: RunLog, report: Callable[[RunRecord], None], interrupts: Interrupts
) -> RunRecord:
    """Start Prefect's API (own child process), Ray and the actors together, then run the flow; the summary
    is reported before Ray and the API are shut down (that takes seconds)."""
    import ray

    from flows.cluster import local_description, ray_session, start_reaper
    from flows.prefect_api import TemporaryApi, check_reachable, configured_url
    from flows.resources import check_fits, resolve_pool

    local = None if job.ray_address or ray.is_initialized() else local_description()
    if local is not None:  # an impossible pool is refused before Ray starts; checked again once it has
        check_fits(resolve_pool(job.pool, local), local)
    url = configured_url()
    if url:
        check_reachable(url)
    reaper = start_reaper()  # whatever ends this process, what it starts from here on ends with it
    api = None if url else TemporaryApi()
    if api is not None:
        api.start()
    record = None
    opened = time.time()
    try:
        with (
            interrupts.keep_sigterm(),
            ray_session(job.ray_address, ship_code=job.ship_code, quiet=not verbose) as cluster,
        ):
            interrupts.install()  # over the crash handler Ray's C++ core installs for SIGTERM (stack dump)
            job.pool = resolve_pool(job.pool, cluster)
            check_fits(job.pool, cluster)
            from flows.pipeline import FLOWS, RunFailed, prestart_workers

            log.attach()  # again: importing Prefect configured logging and dropped handlers added before it

            prestart_workers(job)
            if api is not None:
                api.wait_ready()
            try:
                with api.settings() if api else contextlib.nullcontext():
                    record = FLOWS[job.kind](job)
            except RunFailed as exc:
                record = exc.record
                raise
            except KeyboardInterrupt:
                record = _record_interrupted(job, since=opened)
                raise
            report(record)
            if api is not None:
                api.stop(wait=False)  # ends while Ray shuts down
            return record
    finally:
        if record is not None:
            log.save(Store(job.store).log_path(record.run_id))
        if api is not None:
            api.stop(wait=interrupts.received is None)
        reaper.stop(kill=interrupts.received is not None)


def _record_interrupted(job, since: float) -> RunRecord | None:
    """The record of the run this process was computing, marked ``interrupted`` if the flow left it
    ``running`` (an interruption outside the compute task: planning, catalog, finish)."""
    store = Store(job.store)
    found = None
    for record in list_runs(store, job.kind):
        path = run_path(store, record.run_id)
        ours = record.run_id == job.run_id or record.params.get("ingest_run") == job.ingest_run
        if ours and path.exists() and path.stat().st_mtime >= since - 1:
            found = record
            if record.status == "running":
                record.finish(store, "interrupted", "interrupted; rerun the same command to resume")
            break
    return found
