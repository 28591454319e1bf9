"""Scheduled runs that overlap on one store: one at a time, and none left ``Running`` after its process died.

- The store's slot: a Prefect global concurrency limit of 1 named after the store's path
  (``proteoflow-store-<digest>``, visible under Concurrency in the UI), taken with a lease this run renews
  while it works. A run due while another holds the slot waits (its log names the holder), then computes
  only what is still missing, which is nothing unless files landed meanwhile. It holds across processes,
  hosts and deployments of one Prefect server; the store's own leases (storage.locks) still keep runs of other
  servers, or of the CLI, from computing a sequence twice.
- Crashed runs: each run labels its flow run with its store, host and process and, once it holds the slot,
  the slot's lease. A starting run marks ``Crashed`` every other ``Running`` run of its store whose process
  is gone (same host: that process no longer exists), and once it holds the slot, every other run that
  held it (any host: its lease lapsed, so it stopped renewing it). A dead run's slot is released at once, so
  no one waits for its lease to lapse.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import psutil
from httpx import HTTPStatusError
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, FlowRun, StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Crashed

from storage.objects import as_path

SLOT_LEASE_S = 60.0  # the server's least; a dead holder's slot frees itself this long after its last renewal
RENEW_EVERY_S = SLOT_LEASE_S / 3
POLL_S = 2.0
LABEL_STORE, LABEL_HOST, LABEL_PROCESS, LABEL_SLOT = (
    "proteoflow.store",
    "proteoflow.host",
    "proteoflow.process",
    "proteoflow.slot",
)
Logger = logging.Logger | logging.LoggerAdapter


def slot_name(store: str | Path) -> str:
    """The name of a store's concurrency limit: the same for every path that resolves to the store."""
    digest = hashlib.sha1(str(as_path(store).resolve()).encode(), usedforsecurity=False).hexdigest()[:12]
    return f"proteoflow-store-{digest}"


def ensure_slot(client: SyncPrefectClient, store: str | Path) -> str:
    """Create the store's concurrency limit (one slot) unless it exists; returns its name."""
    name = slot_name(store)
    try:
        client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


def process_label(pid: int | None = None) -> str:
    """``pid:start-time`` of a process: a pid the system reuses later is not mistaken for it."""
    process = psutil.Process(pid)
    return f"{process.pid}:{process.create_time():.2f}"


def process_alive(label: str) -> bool:
    """Whether the process a :func:`process_label` names still runs (on this host)."""
    pid, _, started = label.partition(":")
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.5
    except (psutil.NoSuchProcess, ValueError):
        return False


class StoreGuard:
    """This flow run's side of the overlap rules (see the module docstring)."""

    def __init__(
        self, store: str | Path, logger: Logger, flow_names: list[str], flow_run_id: UUID | None = None
    ) -> None:
        self.store = str(as_path(store).resolve())
        self.flow_names = flow_names  # the flows whose runs share stores (the scheduled flows)
        self.name = slot_name(self.store)
        self.logger = logger
        self.flow_run_id = flow_run_id or UUID(str(current_flow_run.id))
        self.lease_id: UUID | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def announce(self) -> None:
        """Label this flow run with its store, host and process, and sweep the dead runs of this host."""
        with get_client(sync_client=True) as client:
            labels = {
                LABEL_STORE: self.store,
                LABEL_HOST: socket.gethostname(),
                LABEL_PROCESS: process_label(),
            }
            client.update_flow_run_labels(self.flow_run_id, labels)
            self.sweep(client, holding=False)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the store's slot for the body (waiting for it first), renewing its lease meanwhile."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        holder = ConcurrencyLeaseHolder(type="flow_run", id=self.flow_run_id)
        waited_since, last_sweep, announced = None, 0.0, False
        with get_client(sync_client=True) as client:
            ensure_slot(client, self.store)
            while self.lease_id is None:
                try:
                    response = client.increment_concurrency_slots_with_lease(
                        [self.name], 1, "concurrency", SLOT_LEASE_S, holder=holder
                    )
                    self.lease_id = UUID(response.json()["lease_id"])
                except HTTPStatusError as exc:
                    if exc.response.status_code != 423:  # 423 Locked: another run holds the slot
                        raise
                    if waited_since is None:
                        waited_since = time.monotonic()
                    # a new holder labels itself just after taking the slot: name it once seen
                    if not announced:
                        holders = self.describe_holders(client)
                        if holders is not None or time.monotonic() - waited_since >= POLL_S:
                            self.logger.info("store %s is busy (%s); this run waits for it", self.store, holders
                                             or "its holder is not a scheduled run of this server, or is just "
                                             "taking or letting go")  # fmt: skip
                            announced = True
                    if time.monotonic() - last_sweep > 5 * POLL_S:
                        self.sweep(client, holding=False)
                        last_sweep = time.monotonic()
                    retry = float(exc.response.headers.get("Retry-After") or POLL_S)
                    time.sleep(min(max(retry, 0.5), POLL_S))
            if waited_since is not None:
                self.logger.info("store %s is free after %.1f s of waiting", self.store,
                                 time.monotonic() - waited_since)  # fmt: skip
            client.update_flow_run_labels(self.flow_run_id, {LABEL_SLOT: str(self.lease_id)})
            self.sweep(client, holding=True)
        self._renewer = threading.Thread(target=self._renew, name="store-slot-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        with get_client(sync_client=True) as client:
            while not self._stop.wait(RENEW_EVERY_S):
                try:
                    client.renew_concurrency_lease(self.lease_id, SLOT_LEASE_S)
                except Exception as exc:  # noqa: BLE001 - a missed renewal must not stop the run
                    self.logger.warning("could not renew the store's slot lease: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if self.lease_id is not None:
            with get_client(sync_client=True) as client, contextlib.suppress(HTTPStatusError):
                client.release_concurrency_slots_with_lease(self.lease_id)
                client.update_flow_run_labels(self.flow_run_id, {LABEL_SLOT: ""})
            self.lease_id = None

    def others(self, client: SyncPrefectClient) -> list[FlowRun]:
        """Other ``Running`` scheduled runs of this store."""
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=self.flow_names)),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
        )
        return [
            r for r in running if r.id != self.flow_run_id and (r.labels or {}).get(LABEL_STORE) == self.store
        ]

    def describe_holders(self, client: SyncPrefectClient) -> str | None:
        """Which scheduled runs of this server hold the store's slot, or None when none is labelled so."""
        holders = [r for r in self.others(client) if (r.labels or {}).get(LABEL_SLOT)]
        if not holders:
            return None
        return ", ".join(f"flow run '{r.name}' ({r.id}) holds it" for r in holders)

    def sweep(self, client: SyncPrefectClient, holding: bool) -> list[FlowRun]:
        """Mark ``Crashed`` the other Running runs of this store that are dead: their process is gone (this
        host), or they held the slot this run now holds (their lease lapsed). Returns them."""
        dead = []
        here = socket.gethostname()
        for run in self.others(client):
            labels = run.labels or {}
            process, slot = labels.get(LABEL_PROCESS, ""), labels.get(LABEL_SLOT, "")
            if labels.get(LABEL_HOST) == here and process and not process_alive(process):
                why = f"its process ({process.split(':')[0]} on {here}) is gone"
            elif holding and slot and slot != str(self.lease_id):
                why = "it stopped renewing its hold on the store (its lease lapsed)"
            else:
                continue
            message = f"marked crashed by flow run {self.flow_run_id}: {why}"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            if slot and slot != str(self.lease_id):
                with contextlib.suppress(HTTPStatusError):
                    client.release_concurrency_slots_with_lease(UUID(slot))
            self.logger.warning("flow run '%s' (%s) %s", run.name, run.id, message)
            dead.append(run)
        return dead
