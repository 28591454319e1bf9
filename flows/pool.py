"""A pool of :class:`ShardWorker` actors with dynamic dispatch: a free actor takes the next shard.

Each dispatch sends a :class:`~flows.engines.ShardTask`; the actor writes the shard's outputs to the store and
returns a :class:`~flows.engines.ShardResult`, a manifest of a few hundred bytes: no result rows reach the
driver.

A dead actor (killed process, out of memory) is replaced and its shard retried up to ``max_attempts``;
a shard that still fails is reported failed with its error and the run goes on with the others. A store that
refuses an actor's outputs (a full disk, say) stops the run with the file system's error instead.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from flows.actors import ShardWorker, StoreWriteError
from flows.engines import EngineIdentity, EngineOptions, ShardResult, ShardTask
from flows.job import PoolOptions

FAULT_ENV = ("PROTEOFLOW_KILL_SHARD", "PROTEOFLOW_FAULT_DIR", "PROTEOFLOW_POISON", "PROTEOFLOW_SHARD_DELAY_S")


class WorkerStartError(Exception):
    """The actors could not start or load the model; the message is one line, meant for the user."""


@dataclass
class DispatchReport:
    """What the pool did: shards computed, failed (with errors), retries and actor replacements."""

    computed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    retries: int = 0
    replaced_actors: int = 0


@dataclass
class Dispatched:
    """A shard's result as the pool hands it over: which try it was, how long it took, on which slot."""

    tries: int
    seconds: float
    slot: int


PROGRESS_POLL_S = 1.0
PLACEMENT_POLL_S = 1.0
# Actors that stay unplaced this long while the cluster lacks free resources for them end the start-up; the
# cluster has room for them in total (flows.resources.check_fits), so other jobs hold what they need.
PLACEMENT_TIMEOUT_S = float(os.environ.get("PROTEOFLOW_PLACEMENT_TIMEOUT_S", "60"))


class ActorPool:
    """Start ``workers`` model-holding actors; :meth:`run` feeds them shards until none are left."""

    def __init__(self, kind: str, model: str, engine_options: EngineOptions, options: PoolOptions) -> None:
        self.options = options
        threads = max(1, int(options.cpus_per_worker or 1))
        env = {k: os.environ[k] for k in FAULT_ENV if k in os.environ}
        actor_options: dict = {
            "num_cpus": options.cpus_per_worker,
            "num_gpus": options.gpus_per_worker,
            "max_restarts": 0,
            "max_concurrency": 2,  # run_shard, and progress() answered while it runs
        }
        if env:
            actor_options["runtime_env"] = {"env_vars": env}
        if options.spread:
            actor_options["scheduling_strategy"] = "SPREAD"
        self._cls = ray.remote(ShardWorker).options(**actor_options)
        self._args = (kind, model, engine_options, threads)
        self.actors = [self._cls.remote(*self._args) for _ in range(options.workers or 1)]

    def identity(
        self, timeout: float = 1800, placement_timeout: float = PLACEMENT_TIMEOUT_S
    ) -> EngineIdentity:
        """Wait for every actor's model to load; all must report the same weights.

        The wait is bounded twice: ``timeout`` for the whole load, and ``placement_timeout`` for actors that
        Ray has not placed on any node (no worker process) while the cluster has too little free for them;
        each ends in a one-line WorkerStartError that says what is missing, not in a silent wait."""
        refs = [a.identity.remote() for a in self.actors]
        deadline = time.monotonic() + timeout
        starved_since: float | None = None
        try:
            while True:
                ready, pending = ray.wait(refs, num_returns=len(refs), timeout=PLACEMENT_POLL_S)
                if ready:
                    ray.get(ready)  # a worker that failed to load the model says so now, not after the others
                if not pending:
                    break
                now = time.monotonic()
                if now > deadline:
                    raise WorkerStartError(
                        f"workers did not load the model within {timeout:.0f} s: are the requested "
                        "CPUs/GPUs available in the Ray cluster?"
                    )
                unplaced = self._unplaced()
                starved = unplaced and not self._room_for_one()
                starved_since = (starved_since or now) if starved else None
                if starved_since is not None and now - starved_since >= placement_timeout:
                    raise WorkerStartError(self._starved_message(len(unplaced), placement_timeout))
            identities = ray.get(refs)
        except RayTaskError as exc:
            raise WorkerStartError(f"a worker failed to load the model: {first_line(exc.cause)}") from None
        except RayActorError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise WorkerStartError(f"a worker failed to load the model: {first_line(cause)}") from None
        shas = {i.model.sha for i in identities}
        if len(shas) != 1:
            raise WorkerStartError(f"workers loaded different weights: {sorted(shas)}")
        return identities[0]

    def _unplaced(self) -> list:
        """Actors Ray has not given a worker process yet (pending, no pid); [] where the GCS cannot say."""
        try:
            from ray._private import state

            found = []
            for actor in self.actors:
                info = state.actors(actor_id=actor._actor_id.hex())
                if info.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY") and not info.get("Pid"):
                    found.append(actor)
            return found
        except Exception:  # noqa: BLE001 - Ray client connections and future Ray versions: no placement check
            return []

    def _room_for_one(self) -> bool:
        """Whether the cluster has free resources for one more actor right now (then it is only slow)."""
        free = ray.available_resources()
        return free.get("CPU", 0.0) >= (self.options.cpus_per_worker or 0) and free.get("GPU", 0.0) >= (
            self.options.gpus_per_worker or 0
        )

    def _starved_message(self, unplaced: int, waited: float) -> str:
        free, total = ray.available_resources(), ray.cluster_resources()
        need = f"{self.options.cpus_per_worker or 0:g} CPUs" + (
            f" + {self.options.gpus_per_worker:g} GPUs" if self.options.gpus_per_worker else ""
        )
        return (
            f"{unplaced} of {len(self.actors)} workers could not be placed for {waited:.0f} s: each needs {need}, "
            f"and the Ray cluster has {free.get('CPU', 0.0):g} of {total.get('CPU', 0.0):g} CPUs and "
            f"{free.get('GPU', 0.0):g} of {total.get('GPU', 0.0):g} GPUs free (other jobs hold the rest)"
        )

    def placements(self) -> list[dict]:
        return ray.get([a.where.remote() for a in self.actors])

    def run(
        self,
        shard_ids: list[int],
        task: Callable[[int], ShardTask],
        on_done: Callable[[int, ShardResult, Dispatched], None],
        on_tick: Callable[[int], None] | None = None,
    ) -> DispatchReport:
        """Dispatch shards (in the given order) to free actors, each as ``task(shard)`` (built at each
        dispatch, retries included); ``on_done(shard, result, dispatched)`` per shard whose outputs the actor
        committed. ``on_tick(partial)`` is called about twice a second with the residues finished so far
        inside the shards still running (polled from the actors at most once a second)."""
        report = DispatchReport()
        queue = deque(shard_ids)
        attempts: dict[int, int] = {}
        idle = deque(range(len(self.actors)))
        inflight: dict[ray.ObjectRef, tuple[int, int, float]] = {}
        partial: dict[int, int] = {}  # slot -> residues finished in its running shard
        polled = 0.0
        while queue or inflight:
            while idle and queue:
                slot, shard = idle.popleft(), queue.popleft()
                attempts[shard] = attempts.get(shard, 0) + 1
                ref = self.actors[slot].run_shard.remote(task(shard))
                inflight[ref] = (slot, shard, time.monotonic())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            if on_tick is not None and time.monotonic() - polled >= PROGRESS_POLL_S:
                partial = self._poll_progress([slot for slot, _, _ in inflight.values()])
                polled = time.monotonic()
            for ref in ready:
                slot, shard, started = inflight.pop(ref)
                partial.pop(slot, None)
                try:
                    result = ray.get(ref)
                except RayError as exc:  # task error, dead actor, killed worker, lost node
                    if isinstance(exc, RayTaskError) and isinstance(exc.cause, StoreWriteError):
                        raise exc.cause.error from None  # the store's error ends the run, as it always did
                    error = _describe(exc)
                    if not isinstance(exc, RayTaskError):
                        self._replace(slot)
                        report.replaced_actors += 1
                    idle.append(slot)
                    if attempts[shard] < self.options.max_attempts:
                        report.retries += 1
                        queue.appendleft(shard)
                    else:
                        report.failed[shard] = error
                    continue
                idle.append(slot)
                on_done(shard, result, Dispatched(attempts[shard], time.monotonic() - started, slot))
                report.computed.append(shard)
            if on_tick is not None:
                on_tick(sum(partial.values()))
        return report

    def _poll_progress(self, slots: list[int]) -> dict[int, int]:
        """Residues finished inside each running shard; an actor that does not answer at once counts 0."""
        refs = {self.actors[slot].progress.remote(): slot for slot in slots}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.2)
        found = {}
        for ref in ready:
            try:
                found[refs[ref]] = int(ray.get(ref))
            except RayError:
                pass
        return found

    def _replace(self, slot: int) -> None:
        """Start a fresh actor in a dead one's slot (it reloads the model)."""
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self.actors[slot] = self._cls.remote(*self._args)

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass


def first_line(exc: BaseException) -> str:
    """The original exception's line from a Ray error whose text ends with the remote traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b.*:", line):
            return line[:500]
    return lines[0][:500] if lines else type(exc).__name__


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) else exc
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:2000]
    return f"worker died: {str(exc).splitlines()[0][:500]}"
