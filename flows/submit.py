"""Submitting a compute run to a Ray cluster as a Ray job (Ray's Jobs API, the dashboard's HTTP port).

The job runs the same command line a user would type on the cluster, ``python -m flows.cli embed ...
--ray-address auto``: its driver runs on the head node, joins the cluster it runs on and starts the actors
there. Nothing but the command line and the code travels: the inputs, the model (when it is a path) and the
store are read and written by the job on the cluster's nodes, so they must be on object storage (s3://, gs://)
or on a file system every node mounts at the same path. Everything that can be checked here is checked
before anything is sent, the same way ``proteoflow embed`` checks it, so a typo costs a second, not a job.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterable
from typing import TextIO
from urllib.parse import urlsplit

from flows import cli_compute
from flows.errors import CliError
from storage.objects import ObjectStoreError, as_path, is_uri

KINDS = ("embed", "fold")
OBJECT_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Options of embed/fold that a submitted job sets itself: it joins the cluster it runs on, and its code
# travels in the job's runtime environment.
JOB_SETS = {"ray_address": "auto", "ship_code": False}
PYTHON = "python"  # the cluster's interpreter (or the runtime environment's, with --pip): not this one
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXCLUDES = ["__pycache__", "*.pyc"]


def compute_parsers() -> dict[str, argparse.ArgumentParser]:
    """``embed``'s and ``fold``'s own parsers (flows.cli_compute), built afresh: ``submit`` copies their options,
    and the job's command line is rebuilt from their actions."""
    scratch = argparse.ArgumentParser(add_help=False)
    sub = scratch.add_subparsers()
    cli_compute.add_parsers(sub)
    return {kind: sub.choices[kind] for kind in KINDS}


# ---------------------------------------------------------------------------------------------- paths


def _shared_path(what: str, path: str) -> str:
    """``path`` unchanged, or a one-line CliError: standard input and relative paths cannot reach a job that
    runs on other machines, in another directory. Object-store URIs (s3://, gs://) reach every node."""
    if path == "-":
        raise CliError(f"{what} '-' (standard input) cannot be sent to a cluster job; write it to a file on "
                       "a file system shared with the cluster, or upload it to object storage")  # fmt: skip
    if is_uri(path):
        try:
            as_path(path)
        except ObjectStoreError as exc:
            raise CliError(f"{what} {exc}") from None
        return path
    if not os.path.isabs(path):
        raise CliError(f"{what} {path} is a relative path: the job runs on the cluster, not in this directory; "
                       f"give it as {os.path.abspath(path)}")  # fmt: skip
    return path


def _model_is_path(model: str) -> bool:
    """Whether ``--model`` names a file or directory (else a known name or hub id, which the cluster resolves
    from its own Hugging Face cache or the hub)."""
    return (
        os.path.exists(model)
        or model.startswith(("/", "./", "../", "~"))
        or OBJECT_URL.match(model) is not None
    )


def check_shared_paths(args: argparse.Namespace) -> list[str]:
    """Refuse what a job on the cluster could not read or write (one line each), and return the paths it
    will use: every input exists here, the store exists or its directory does, a model path exists."""
    for path in args.inputs:
        _shared_path("INPUT", path)
        if is_uri(path):
            _check_object_input(path)
            continue
        if not os.path.exists(path):
            raise CliError(f"INPUT {path} does not exist here; submit from a machine that mounts the "
                           "cluster's shared file system at the same path")  # fmt: skip
    store = _shared_path("--store", args.store)
    parent = os.path.dirname(store.rstrip("/")) or "/"
    if not is_uri(store) and not os.path.isdir(store) and not os.path.isdir(parent):
        raise CliError(f"--store {store}: {parent} does not exist here; the store must be on a file system "
                       "shared with the cluster, mounted at the same path")  # fmt: skip
    paths = [*args.inputs, store]
    if _model_is_path(args.model):
        if is_uri(args.model):
            raise CliError(f"--model {args.model}: a checkpoint on object storage is not read directly; put it "
                           "on a file system every node mounts, or bake it into the image's Hugging Face cache")  # fmt: skip
        _shared_path("--model", args.model)
        if not os.path.exists(args.model):
            raise CliError(f"--model {args.model} does not exist here; a model path must be on the shared "
                           "file system (or give a known name or hub id)")  # fmt: skip
        paths.append(args.model)
    return paths


def _check_object_input(path: str) -> None:
    """An object-store input that is certainly missing is refused here; one this machine cannot reach
    (credentials only the cluster has) is left for the job to read."""
    try:
        found = as_path(path).exists()
    except (OSError, ObjectStoreError):
        return
    if not found:
        raise CliError(f"INPUT {path}: no such object or prefix")


def shared_note(args: argparse.Namespace) -> str:
    """The one line that says where the job's data must be: paths on a file system every node mounts, and
    object storage reached with the cluster's own credentials."""
    inputs = [p for p in args.inputs if not is_uri(p)]
    mounted = [inputs[0] if len(inputs) == 1 else f"{len(inputs)} inputs"] if inputs else []
    mounted += [f"--model {args.model}"] if _model_is_path(args.model) else []
    mounted += [] if is_uri(args.store) else [f"--store {args.store}"]
    notes = []
    if mounted:
        notes.append(f"the job uses {', '.join(mounted)} on the cluster's nodes: they must be on a file system "
                     "every Ray node mounts at these same paths")  # fmt: skip
    if any(is_uri(p) for p in [*args.inputs, args.store]):
        notes.append("it reads and writes object storage with the cluster's own credentials (the nodes' "
                     "environment or --env AWS_...=...)")  # fmt: skip
    return "note: " + "; ".join(notes)


def check_options(args: argparse.Namespace) -> None:
    """embed/fold's own checks (flows.cli_compute.build_job), plus the checkpoint's when ``--model`` is a path
    on the shared file system (missing model, layers it does not have), exactly as ``proteoflow embed`` does."""
    if args.ray_address:
        raise CliError("--ray-address is set by submit: the job joins the cluster it runs on (auto); "
                       "name the cluster with --address http://HEAD:8265")  # fmt: skip
    if args.ship_code:
        raise CliError("--ship-code is not needed: the job carries this checkout's code unless --pip or "
                       "--installed says otherwise")  # fmt: skip
    job = cli_compute.build_job(args)
    if _model_is_path(args.model):
        from flows.launch import preflight

        preflight(job.kind, job.model, job.options)


# ---------------------------------------------------------------------------------------------- the job


def _text(value: object) -> str:
    """An option's parsed value as its command-line text (lists are comma-separated, as they are typed)."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def job_argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The job's command line: every option of ``parser`` (embed's or fold's own) with its parsed value,
    defaults included (the cluster's proteoflow may have other defaults), ``--ray-address auto``, no
    ``--ship-code``. Checked by :func:`check_round_trip` before it is sent."""
    argv = [PYTHON, "-m", "flows.cli", args.kind]
    options: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        value = JOB_SETS.get(action.dest, getattr(args, action.dest))
        if not action.option_strings:
            argv += [str(v) for v in value]
        elif action.nargs == 0:
            options += [action.option_strings[-1]] if value else []
        elif value is not None:
            options.append(f"{action.option_strings[-1]}={_text(value)}")  # '=': values may start with '-'
    return argv + options


def check_round_trip(argv: list[str], args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The job's command line, parsed by the subcommand parser the job's CLI uses, gives back every value
    checked here."""
    kind, rest = argv[3], argv[4:]  # python -m flows.cli KIND ...
    parsed = compute_parsers()[kind].parse_args(rest)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        want = JOB_SETS.get(action.dest, getattr(args, action.dest))
        if getattr(parsed, action.dest) != want:
            raise RuntimeError(f"the job's command line changes {action.dest}: {want!r} became "
                               f"{getattr(parsed, action.dest)!r} ({shlex.join(argv)})")  # fmt: skip


def code_runtime_env() -> dict:
    """This checkout's packages (esm_core, storage, flows) as the job's py_modules: the cluster needs only the
    dependencies (the image of infra/Dockerfile, or ``pip install proteoflow``)."""
    from flows.cluster import runtime_env_for_remote

    modules = runtime_env_for_remote()["py_modules"]
    return {"py_modules": [str(m) for m in modules], "excludes": list(EXCLUDES)}


def env_vars(pairs: Iterable[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``--env KEY=VALUE`` pairs, plus PREFECT_API_URL when it is set here (the job's runs then appear in that
    Prefect server, as local runs do)."""
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    if environ.get("PREFECT_API_URL"):
        found["PREFECT_API_URL"] = environ["PREFECT_API_URL"]
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise CliError(f"--env {pair}: expected KEY=VALUE")
        found[key] = value
    return found


def runtime_env(pip: list[str] | None, installed: bool, variables: dict[str, str]) -> dict:
    """The job's runtime environment: this checkout's code (default), pinned pip requirements (``--pip``), or
    nothing (``--installed``: the cluster's image has proteoflow), plus environment variables."""
    env: dict = {"pip": list(pip)} if pip else {} if installed else code_runtime_env()
    if variables:
        env["env_vars"] = dict(variables)
    return env


# ---------------------------------------------------------------------------------------------- Jobs API


def dashboard_address(text: str | None) -> str:
    """``http://HEAD:8265`` (the Jobs API): a bare ``HEAD:8265`` gets http://; ray:// and a dead port are
    refused in one line, in seconds (Ray's client would print a page after retrying)."""
    if not text:
        raise CliError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard) or set "
                       "RAY_API_SERVER_ADDRESS")  # fmt: skip
    if text.startswith("ray://"):
        raise CliError(
            f"--address {text}: give the Ray dashboard's URL (http://HEAD:8265), not the Ray client's"
        )
    url = text if re.match(r"^https?://", text) else f"http://{text}"
    parts = urlsplit(url)
    if not parts.hostname:
        raise CliError(f"--address {text}: expected http://HOST:PORT")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CliError(f"--address {text}: expected http://HOST:PORT") from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=5):
            pass
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower()
        raise CliError(f"--address {text}: no Ray dashboard answers there ({reason})") from None
    return url.rstrip("/")


def client(address: str):
    """A JobSubmissionClient for ``address``; a one-line CliError when the dashboard does not serve jobs."""
    logging.getLogger("ray").setLevel(logging.WARNING)  # not one INFO line per uploaded package
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CliError(f"--address {address}: {first.strip()[:300]}") from None


def submit(jobs, argv: list[str], env: dict, metadata: dict[str, str]) -> str:
    """Submit the job; its submission id."""
    try:
        return jobs.submit_job(entrypoint=shlex.join(argv), runtime_env=env, metadata=metadata)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CliError(f"the cluster refused the job: {first.strip()[:300]}") from None


def how_to_follow(job_id: str, address: str) -> str:
    """The commands that follow, inspect and stop a submitted job."""
    where = f"--address {address}"
    return (f"follow   ray job logs -f {job_id} {where}\n"
            f"status   ray job status {job_id} {where}\n"
            f"stop     ray job stop {job_id} {where}\n")  # fmt: skip


async def _tail(jobs, job_id: str, out: TextIO) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def follow(jobs, job_id: str, out: TextIO | None = None, poll_s: float = 1.0) -> tuple[str, int]:
    """Print the job's logs as they come until it ends; its final status and the exit status to use (the
    driver's own exit status where Ray knows it, else 0 for SUCCEEDED and 1 otherwise)."""
    out = out or sys.stdout  # resolved per call: a default bound at import outlives a redirected stream
    try:
        asyncio.run(_tail(jobs, job_id, out))
    except (ConnectionError, OSError, RuntimeError) as exc:  # the log stream broke: poll the status instead
        sys.stderr.write(f"proteoflow submit: log stream ended ({type(exc).__name__}); waiting for the job\n")
    while (status := str(jobs.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    code = getattr(jobs.get_job_info(job_id), "driver_exit_code", None)
    return status, (code if code is not None else 0 if status == "SUCCEEDED" else 1)
