"""``proteoflow serve``'s work: register a scheduled run as the Prefect deployment
``proteoflow-scheduled-<kind>/<name>`` on the server of ``PREFECT_API_URL`` and serve it from this process
(Prefect's ``serve``: this process polls the server and starts each due run, on schedule or by hand, as a
child process running flows.scheduled).

The work-pool route (infra/prefect.yaml, ``prefect deploy`` and ``prefect worker start``) runs the same flows
with the same parameters; serving needs no work pool and no worker.
"""

from __future__ import annotations

import sys
from typing import TextIO

from flows.errors import CliError
from flows.job import Job


def require_server() -> str:
    """The configured Prefect API URL, answering; a one-line CliError otherwise."""
    from flows.prefect_api import ApiStartError, check_reachable, configured_url

    url = configured_url()
    if not url:
        raise CliError(
            "serve needs a Prefect server: start one (prefect server start) and set PREFECT_API_URL, "
            "e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        check_reachable(url)
    except ApiStartError:
        raise CliError(
            f"PREFECT_API_URL {url} does not answer: start the server (prefect server start) or point "
            "PREFECT_API_URL at a running one"
        ) from None
    return url


def deployment_name(kind: str, name: str) -> str:
    """The full name a person types: ``proteoflow-scheduled-<kind>/<name>``."""
    from flows.scheduled import FLOW_NAMES

    return f"{FLOW_NAMES[kind]}/{name}"


def build_deployment(
    job: Job,
    incoming: str,
    name: str,
    cron: str | None = None,
    interval: int | None = None,
    timezone: str = "UTC",
    notify: str | None = None,
):
    """The runner deployment of ``job`` over ``incoming``: parameters from flows.scheduled.parameters_for,
    a cron or interval schedule (none: runs start only by hand), entrypoint by module path so the runs
    start from any directory."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from flows.scheduled import SCHEDULED, parameters_for

    schedules = []
    if cron:
        schedules.append(Cron(cron, timezone=timezone))
    elif interval:
        schedules.append(Interval(interval, timezone=timezone))
    return SCHEDULED[job.kind].to_deployment(
        name=name,
        parameters=parameters_for(job, incoming, notify),
        schedules=schedules,
        tags=["proteoflow", job.kind],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def describe_schedule(cron: str | None, interval: int | None, timezone: str) -> str:
    if cron:
        return f'cron "{cron}", {timezone}'
    if interval:
        return f"every {interval} s"
    return "no schedule: runs start by hand"


def serve_scheduled(
    job: Job,
    incoming: str,
    name: str,
    cron: str | None = None,
    interval: int | None = None,
    timezone: str = "UTC",
    notify: str | None = None,
    out: TextIO | None = None,
) -> None:
    """Register the deployment, say how to use it, and serve it until interrupted (Ctrl-C or SIGTERM)."""
    out = out or sys.stdout  # resolved per call: a default bound at import outlives a redirected stream
    from prefect import serve
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_UI_URL

    from flows.overlap import ensure_slot

    url = require_server()
    deployment = build_deployment(job, incoming, name, cron, interval, timezone, notify)
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        slot = ensure_slot(client, job.store)
    full = deployment_name(job.kind, name)
    params = deployment.parameters
    ui = PREFECT_UI_URL.value()
    lines = [
        f"serving {full} on {url} ({describe_schedule(cron, interval, timezone)})",
        f"  incoming  {params['incoming']} (every FASTA file under it; content already ingested is skipped)",
        f"  store     {params['store']}",
        f"  model     {params['model']}",
        f"  overlap   one run per store at a time (Prefect concurrency limit {slot})",
        f"run now:    prefect deployment run '{full}'",
        f"results:    {f'{ui}/deployments/deployment/{deployment_id} (Prefect UI), ' if ui else ''}"
        f"proteoflow runs --store {params['store']}",
        "stop:       Ctrl-C (the schedule is paused until this deployment is served again)",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()
    serve(deployment, print_starting_message=False)
