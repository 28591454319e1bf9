"""Entry point for scheduled runs (see infra/prefect.yaml): fold or embed whatever FASTA is in a folder.

Only sequences never computed for the model are computed, so a nightly run over a growing folder costs
what is new since the last night.
"""

from __future__ import annotations

from prefect import flow

from flows.pipeline import Job, fold_flow
from flows.pool import PoolOptions
from storage.runs import RunRecord


@flow(name="proteoflow-scheduled-fold")
def scheduled_fold(
    incoming: str,
    store: str,
    model: str = "facebook/esmfold_v1",
    max_length: int | None = 1000,
    ray_address: str | None = None,
    workers: int | None = None,
) -> RunRecord:
    """Fold every new sequence of the FASTA files under ``incoming``."""
    job = Job(
        kind="fold",
        store=store,
        inputs=[incoming],
        model=model,
        max_length=max_length,
        ray_address=ray_address,
        pool=PoolOptions(workers=workers),
        progress=False,
        engine_options={"chunk_size": "auto"},
    )
    return fold_flow(job)
