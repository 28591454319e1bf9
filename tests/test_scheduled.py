"""Scheduled runs against a real Prefect server (``prefect server start`` on a free loopback port with its own
home and SQLite database, one per module): ``proteoflow serve`` as a real serving process, and the work-pool
route (infra/prefect.yaml deployed with ``prefect deploy``, run by a real ``prefect worker``).

Runs join the session's Ray cluster (``--ray-address``, the ``ray_address`` parameter) instead of starting a
local Ray each. The tiny random ESM-2 keeps every run small; ``embed`` is the cheap kind.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from conftest import ECOLI, MAG, ROOT, write_slice

from flows.overlap import SLOT_LEASE_S, slot_name
from storage.catalog import query
from storage.layout import Store
from storage.normalize import normalize_text
from storage.runs import list_runs, load_run
from storage.shards import load_shard_records

NAME = "tests"
DEPLOYMENT = f"proteoflow-scheduled-embed/{NAME}"
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """End a process started in its own session, with everything it started (its process group)."""
    if process.poll() is not None:
        return
    with _no_such_process():
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with _no_such_process():
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class _no_such_process:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is ProcessLookupError


@dataclass
class PrefectServer:
    env: dict[str, str]  # what its clients (serve, the prefect CLI, the worker) run with
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return self.env["PREFECT_API_URL"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A real Prefect server for this module, booting while other fixtures start (``client`` waits for it)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # served runs start within a second of being due
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }
    env.pop("PROTEOFLOW_STORE", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    yield PrefectServer(env, process, home / "server.log")
    _stop(process)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    """A client of the module's server, once it answers."""
    from prefect.client.orchestration import SyncPrefectClient

    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2):
                break
        except OSError:
            assert server.process.poll() is None, server.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "Prefect server did not start in 180 s"
            time.sleep(0.5)
    with SyncPrefectClient(server.url) as c:
        yield c


def _wait_final(client, flow_run_id: UUID, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"flow run {run.name} still {run.state} after {timeout} s"
        time.sleep(0.5)


def _wait_for(condition, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.3)
    return found


def _logs(client, flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [entry.message for entry in logs]


def _artifact_types(client, flow_run_id: UUID) -> set[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {a.type for a in found}


def _hashes(path: Path) -> set[str]:
    """seq_hash of every record of a FASTA file, computed apart from proteoflow's ingest."""
    chunks = path.read_text().split(">")[1:]
    return {hashlib.md5(normalize_text("".join(c.splitlines()[1:])).encode()).hexdigest() for c in chunks}


def _embedded(store: Path, run_id: str | None = None) -> list[tuple[str, str]]:
    where = f"WHERE run_id = '{run_id}'" if run_id else ""
    return query(store, f"SELECT seq_hash, run_id FROM embeddings {where}")[1]


def _duplicates(store: Path) -> list[tuple]:
    return query(
        store, "SELECT seq_hash, layer, pooling, count(*) FROM embeddings GROUP BY ALL HAVING count(*) > 1"
    )[1]


def _store_run(client, flow_run_id: UUID, store: Path):
    """The store's compute run a flow run worked on, read from its summary artifact's run id."""
    message = client.read_flow_run(flow_run_id).state.message or ""
    found = re.search(r"\b(embed-[0-9a-f]{16})\b", message)
    return load_run(Store(store), found.group(1)) if found else None


class Served:
    """``proteoflow serve`` as a real process in its own session (so that a test can kill all of it)."""

    def __init__(self, env: dict[str, str], args: list[str], log: Path) -> None:
        self.env, self.args, self.log = env, args, log
        self.process: subprocess.Popen | None = None

    def start(self, client) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child holds it
        self.process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *self.args], cwd=ROOT,
                                        env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        out.close()
        _wait_for(lambda: b"serving proteoflow-scheduled-embed" in self.log.read_bytes() or self.process.poll(),
                  "serving message")  # fmt: skip
        assert self.process.poll() is None, self.log.read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL the serving process and the runs it started (its process group), as a crash would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@pytest.fixture(scope="module")
def incoming(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("incoming")
    write_slice(ECOLI, folder / "ecoli.fasta", start=9, count=10, step=43, max_length=300)
    return folder


@pytest.fixture(scope="module")
def served(
    server, ray_cluster, tiny_esm2, incoming, client, tmp_path_factory
) -> Iterator[tuple[Served, Path]]:
    store = tmp_path_factory.mktemp("served") / "store"
    env = dict(server.env)
    args = ["--store", str(store), "--incoming", str(incoming), "--kind", "embed", "--name", NAME,
            "--model", str(tiny_esm2), "--cron", "0 2 * * *", "--workers", "1", "--cpus-per-worker", "1",
            "--gpus-per-worker", "0", "--ray-address", ray_cluster.address, "--precision", "fp32"]  # fmt: skip
    serving = Served(env, args, store.parent / "serve.log")
    serving.start(client)
    yield serving, store
    serving.stop()


def _trigger_by_cli(env: dict[str, str]) -> UUID:
    """Start a run by hand the way a person does: ``prefect deployment run``."""
    result = subprocess.run([*PREFECT, "deployment", "run", DEPLOYMENT], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return UUID(re.search(r"flow-run/([0-9a-f-]{36})", result.stdout).group(1))


def test_serve_registers_the_deployment_with_its_schedule_and_parameters(served, client, incoming) -> None:
    from flows.scheduled import parameter_names

    serving, store = served
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert set(deployment.parameters) == set(parameter_names())
    assert deployment.parameters["incoming"] == str(incoming) and deployment.parameters["store"] == str(store)
    assert deployment.parameters["engine_options"]["precision"] == "fp32"
    assert client.read_global_concurrency_limit_by_name(slot_name(store)).limit == 1


def test_runs_over_a_growing_folder_compute_only_what_is_new_and_overlapping_runs_wait(
    served, client, server, incoming
) -> None:
    serving, store = served
    first_file = incoming / "ecoli.fasta"
    # a run started by hand computes every sequence of the folder
    triggered = time.time()
    first = _wait_final(client, _trigger_by_cli(server.env))
    assert first.state.is_completed() and first.state.name == "Completed", first.state.message
    record1 = _store_run(client, first.id, store)
    assert record1 is not None and record1.status == "completed"
    assert {h for h, _ in _embedded(store, record1.run_id)} == _hashes(first_file)
    shards = load_shard_records(Store(store), record1.run_id).values()
    first_shard = min(s.finished_at.timestamp() - s.seconds for s in shards)
    print(f"\nmanual trigger to first shard start: {first_shard - triggered:.1f} s")
    assert _artifact_types(client, first.id) == {"markdown", "table"}
    assert (store / "logs" / f"{record1.run_id}.report.html").exists()

    # a file lands; two runs start at once: one computes the new file, the other waits for the store
    second_file = write_slice(MAG, incoming / "mag.faa", start=4, count=8, step=37, max_length=300)
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    both = [client.create_flow_run_from_deployment(deployment.id) for _ in range(2)]
    both = [_wait_final(client, run.id) for run in both]
    assert sorted(run.state.name for run in both) == ["Completed", "Nothing new"], [r.state for r in both]
    second = next(run for run in both if run.state.name == "Completed")
    third = next(run for run in both if run.state.name == "Nothing new")
    assert any("busy" in line and second.name in line for line in _logs(client, third.id)), _logs(
        client, third.id
    )
    record2 = _store_run(client, second.id, store)
    new = _hashes(second_file) - _hashes(first_file)
    assert record2.counts.sequences == len(new)  # only the new file's sequences were planned
    assert {h for h, _ in _embedded(store, record2.run_id)} == new
    assert not _duplicates(store)
    assert {h for h, _ in _embedded(store)} == _hashes(first_file) | _hashes(second_file)
    assert _artifact_types(client, second.id) == {"markdown", "table"}
    assert _artifact_types(client, third.id) == {"markdown", "table"}

    # the embed report of a real run: one HTML file with the plots embedded
    out = store.parent / "embed-report.html"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "report", record2.run_id, "--store", str(store),
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', out.read_text())
    assert images == ["lengths", "throughput", "shard timeline"]


def test_a_run_whose_process_died_is_marked_crashed_by_the_next(served, client) -> None:
    serving, store = served
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    # hold the store's slot from here, so that the run started next waits for it in its own process
    held = client.increment_concurrency_slots_with_lease([slot_name(store)], 1, "concurrency", SLOT_LEASE_S)
    lease = UUID(held.json()["lease_id"])
    doomed = client.create_flow_run_from_deployment(deployment.id)
    _wait_for(lambda: "busy" in " ".join(_logs(client, doomed.id)), "waiting run")
    labels = client.read_flow_run(doomed.id).labels
    serving.kill()  # the serving process and its runs die at once: nobody is left to report the end
    pid = int(labels["proteoflow.process"].split(":")[0])
    with _no_such_process():
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert client.read_flow_run(doomed.id).state.is_running()  # the server still believes it runs
    client.release_concurrency_slots_with_lease(lease)

    serving.start(client)
    nothing_new = _wait_final(client, client.create_flow_run_from_deployment(deployment.id).id)
    crashed = client.read_flow_run(doomed.id)
    assert crashed.state.type.value == "CRASHED", crashed.state
    assert "is gone" in crashed.state.message and str(nothing_new.id) in crashed.state.message
    assert nothing_new.state.name == "Nothing new", nothing_new.state.message
    took = (nothing_new.end_time - nothing_new.start_time).total_seconds()
    print(f"\nnothing-new run: {took:.1f} s from its start to its end (no Ray, no model)")
    assert not _duplicates(store)


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def hooks() -> Iterator[str]:
    """A tiny local HTTP server that keeps the JSON bodies POSTed to it."""
    _Hooks.received = []
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Hooks)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/proteoflow"
    httpd.shutdown()


def test_prefect_yaml_names_only_the_scheduled_flows_parameters() -> None:
    from flows.scheduled import parameter_names

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        assert set(deployment["parameters"]) <= set(parameter_names()), deployment["name"]
        assert deployment["entrypoint"] in (
            "flows/scheduled.py:scheduled_fold",
            "flows/scheduled.py:scheduled_embed",
        )


def test_work_pool_route_with_a_real_worker_ends_partial_then_resumes(
    server, client, tiny_esm2, hooks, ray_cluster, tmp_path
) -> None:
    def prefect(*args: str) -> None:
        result = subprocess.run([*PREFECT, "--no-prompt", *args], env=server.env, cwd=ROOT, capture_output=True,
                                text=True, timeout=180)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    prefect("work-pool", "create", "proteoflow", "--type", "process")
    prefect("deploy", "--prefect-file", "infra/prefect.yaml", "--name", "nightly-metagenome-embed")
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "proteoflow", "--type", "process"],
                              env=server.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        incoming, store = tmp_path / "incoming", tmp_path / "store"
        incoming.mkdir()
        write_slice(ECOLI, incoming / "ecoli.fasta", start=21, count=10, step=47, max_length=300)
        deployment = client.read_deployment_by_name("proteoflow-scheduled-embed/nightly-metagenome-embed")
        params = {"incoming": str(incoming), "store": str(store), "model": str(tiny_esm2), "ray_address": ray_cluster.address,
                  "workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_attempts": 1, "notify": hooks,
                  "engine_options": {"precision": "fp32"}}  # fmt: skip
        # every sequence fails in this run's processes (an engine fault): shards of several sequences fail
        # (one attempt each), a shard of one sequence isolates it as rejected; the run ends partial
        faults = {"env": {"PROTEOFLOW_POISON": ",".join("0123456789abcdef")}}
        partial = client.create_flow_run_from_deployment(
            deployment.id, parameters=params, job_variables=faults
        )
        partial = _wait_final(client, partial.id)
        assert partial.state.type.value == "FAILED" and partial.state.name == "Partial", partial.state.message
        assert "next run" in partial.state.message
        [sent] = _Hooks.received
        assert sent["status"] == "partial" and sent["counts"]["shards_failed"] >= 1
        assert sent["flow_run"] == str(partial.id) and Path(sent["report"]).exists()
        run_id = sent["run_id"]
        before = load_run(Store(store), run_id)
        rejected = {h for (h,) in query(store, f"""
            SELECT m.seq_hash FROM rejected r JOIN members m ON m.record_index = r.record_index
            WHERE r.run_id = '{run_id}' AND m.run_id = '{before.params["ingest_run"]}'""")[1]}  # fmt: skip

        # the next run, without the fault, resumes the same run and computes what its failed shards held
        resumed = _wait_final(
            client, client.create_flow_run_from_deployment(deployment.id, parameters=params).id
        )
        assert resumed.state.name == "Completed", resumed.state.message
        record = load_run(Store(store), run_id)
        assert record.status == "completed" and record.counts.attempts > before.counts.attempts
        embedded = {h for h, _ in _embedded(store)}
        assert embedded and embedded.isdisjoint(rejected)
        assert embedded | rejected == _hashes(incoming / "ecoli.fasta")
        assert not _duplicates(store) and len(_Hooks.received) == 1  # a completed run notifies no one
        assert [r.run_id for r in list_runs(Store(store), "embed")] == [run_id]
    finally:
        _stop(worker)
        log.close()


def test_serve_refuses_in_one_line_before_starting_anything(tmp_path, tiny_esm2) -> None:
    from conftest import run_cli

    incoming = tmp_path / "incoming"
    incoming.mkdir()

    def serve(incoming: Path = incoming, kind: str = "embed", *more: str) -> list[str]:
        return ["serve", "--store", str(tmp_path / "store"), "--incoming", str(incoming), "--kind", kind,
                "--name", "x", "--model", str(tiny_esm2), *more]  # fmt: skip

    no_server = {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": ""}
    refused = {
        "PREFECT_API_URL": (no_server, serve()),
        "does not answer": (
            {**no_server, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"},
            serve(),
        ),
        "--layers is an option of --kind embed": (no_server, serve(incoming, "fold", "--layers", "1")),
        "not a directory": (no_server, serve(tmp_path / "missing")),
    }
    for expected, (env, args) in refused.items():
        result = run_cli(*args, env=env, timeout=120)
        err = result.stderr.decode()
        assert result.returncode == 2 and err.count("\n") == 1 and expected in err, (expected, err)
