"""A compute job as plain data: what the CLI, a schedule or a test asks the pipeline to do. No Prefect here,
so the CLI can set up logging before Prefect is imported."""

from __future__ import annotations

from dataclasses import dataclass, field

from flows.engines import EngineOptions, options_from_dict
from storage.runs import RunRecord


@dataclass
class PoolOptions:
    """How many actors, what each reserves, and how hard to try."""

    workers: int | None = None  # None: decided from the cluster (see flows.resources.resolve_pool)
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    max_attempts: int = 3
    spread: bool = True


@dataclass
class Job:
    """Everything a run needs, as plain data (it is also what the run record stores as parameters)."""

    kind: str  # "embed" | "fold"
    store: str
    inputs: list[str]
    model: str
    engine_options: EngineOptions | dict = field(default_factory=dict)
    pool: PoolOptions = field(default_factory=PoolOptions)
    min_length: int | None = None
    max_length: int | None = None
    run_id: str | None = None
    ray_address: str | None = None
    ship_code: bool = False
    progress: bool = True
    ingest_run: str | None = None  # set when the inputs were ingested before the flow started
    fingerprint: str = ""  # cheap identity of the checkpoint files, recorded so a no-op rerun needs no model

    def __post_init__(self) -> None:
        if isinstance(self.engine_options, dict):
            self.engine_options = options_from_dict(self.kind, self.engine_options)

    @property
    def options(self) -> EngineOptions:
        """The engine options, typed (plain dicts given by callers are converted on first use)."""
        if isinstance(self.engine_options, dict):
            self.engine_options = options_from_dict(self.kind, self.engine_options)
        return self.engine_options


class RunFailed(Exception):
    """The run ended partial or failed; the message says which shards and why."""

    def __init__(self, message: str, record: RunRecord | None = None) -> None:
        super().__init__(message)
        self.record = record
