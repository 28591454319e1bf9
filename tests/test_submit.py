"""``proteoflow submit``: a run sent through Ray's Jobs API to a Ray cluster of separate processes.

The cluster is real: a head node (GCS, dashboard with the Jobs API) on 127.0.0.2 and a worker node on
127.0.0.3, each started by ``ray start`` in its own process group and temp dir, with free ports. The store is a
local path (the shared file system case). Results must equal a local ``proteoflow embed`` run's; a worker node
killed (its whole process group) while the job computes must leave the job completing on the head node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ECOLI, EXAMPLE, run_cli, write_slice

from storage.catalog import query

RAY = Path(sys.executable).parent / "ray"
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
CLIENT_ENV = {"RAY_AUTH_MODE": "disabled"}
OPTIONS = ["--layers", "-1,1", "--pooling", "mean,bos", "--precision", "fp32",
           "--workers", "2", "--cpus-per-worker", "1", "--gpus-per-worker", "0", "--no-progress"]  # fmt: skip
JOB_TIMEOUT_S = 240


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    """A node's environment: no auth, this venv's python first on PATH (the job's `python`), and a GCS that
    declares a node dead within about two seconds of its last answer (Ray's default is tens of seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PROTEOFLOW_", "PREFECT_"))}
    return {**env, **CLIENT_ENV, "PATH": f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3"}  # fmt: skip


@dataclass
class Node:
    """One ``ray start`` node: its process group (every daemon it started) and its addresses."""

    ip: str
    pgid: int
    gcs: str = ""
    dashboard: str = ""

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_node(tmp: Path, ip: str, num_cpus: int, head: Node | None = None) -> Node:
    """``ray start`` in its own process group, temp dir and working directory, every port free; returns once
    the node has joined (``ray start`` exits then, its daemons stay in the group)."""
    ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]  # fmt: skip
    cmd = [str(RAY), "start", "--node-ip-address", ip, "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"]  # fmt: skip
    for flag in ports:
        cmd += [flag, str(free_port(ip))]
    gcs = f"{ip}:{free_port(ip)}"
    dashboard = f"http://{ip}:{free_port(ip)}"
    if head is None:
        cmd += ["--head", "--port", gcs.split(":")[1], "--include-dashboard", "true", "--dashboard-host", ip,
                "--dashboard-port", dashboard.rsplit(":", 1)[1], "--ray-client-server-port", str(free_port(ip))]  # fmt: skip
    else:
        cmd += ["--address", head.gcs]
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=node_env(), cwd=tmp, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    node = Node(ip, proc.pid, gcs if head is None else head.gcs, dashboard if head is None else "")
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        node.kill()
        raise
    if proc.returncode != 0:
        node.kill()
        raise RuntimeError(f"ray start on {ip} failed:\n{out[-3000:]}")
    return node


class Cluster:
    """The head node (2 CPUs: room for a replacement actor once a worker node is lost; the Jobs API) and worker
    nodes of 1 CPU on WORKER_IP. Head and first worker start in a background thread, while the local reference
    run computes; a worker stays up for the next test unless a test killed it."""

    def __init__(self, tmp_path_factory) -> None:
        self.tmp, self.head, self.workers = tmp_path_factory, None, []
        self._pool = ThreadPoolExecutor(1)
        self._starting = self._pool.submit(self._start)

    def _start(self) -> None:
        self.head = start_node(self.tmp.mktemp("h"), HEAD_IP, num_cpus=2)
        self.worker()

    def ready(self) -> Node:
        """The head, once it and a worker are up."""
        self._starting.result()
        assert self.head is not None
        return self.head

    def worker(self) -> Node:
        """A live worker node, started if the last one was killed."""
        if not (self.workers and self.workers[-1].alive()):
            self.workers.append(start_node(self.tmp.mktemp("w"), WORKER_IP, num_cpus=1, head=self.head))
        return self.workers[-1]

    def kill(self) -> None:
        self._pool.shutdown(wait=True)  # a node still starting would be left behind
        for node in [*self.workers, self.head]:
            if node is not None:
                node.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    found = Cluster(tmp_path_factory)
    yield found
    found.kill()


@pytest.fixture(scope="module")
def proteome(tmp_path_factory) -> Path:
    """24 real E. coli K-12 proteins up to 300 residues (at an absolute path, as submit requires)."""
    return write_slice(ECOLI, tmp_path_factory.mktemp("in") / "ecoli.fasta", start=5, count=24, step=43,
                       max_length=300).resolve()  # fmt: skip


def embedding_rows(store: Path) -> list[tuple]:
    return query(store, "SELECT run_id, seq_hash, layer, pooling, embedding FROM embeddings "
                        "ORDER BY seq_hash, layer, pooling")[1]  # fmt: skip


def compute_counts(store: Path) -> tuple[str, dict]:
    [(status, counts)] = query(store, "SELECT status, counts FROM runs WHERE kind = 'embed'")[1]
    return status, json.loads(counts)


@pytest.fixture(scope="module")
def local_rows(proteome, tiny_esm2, tmp_path_factory) -> list[tuple]:
    """The same run without a cluster: `proteoflow embed` with the same options (a local Ray of its own)."""
    store = tmp_path_factory.mktemp("local") / "store"
    result = run_cli("embed", str(proteome), "--store", str(store), "--model", str(tiny_esm2), *OPTIONS)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    rows = embedding_rows(store)
    assert len(rows) == 24 * 4  # 24 sequences x 2 layers x 2 poolings
    return rows


def submit(*args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_cli("submit", *args, env=CLIENT_ENV, timeout=timeout)


def job_id_of(result: subprocess.CompletedProcess) -> str:
    found = re.search(r"^submitted (raysubmit_\w+)", result.stdout.decode(), re.MULTILINE)
    assert found, result.stdout.decode() + result.stderr.decode()
    return found.group(1)


def submit_here(capsys, *args: str) -> tuple[int, str]:
    """``proteoflow submit ARGS`` in this process (its checks need no cluster): exit status and stderr."""
    from flows.cli import main

    code = main(["submit", *args])
    return code, capsys.readouterr().err


def jobs_client(head: Node):
    os.environ.update(CLIENT_ENV)
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard)


# ---------------------------------------------------------------------------------------------- no cluster


@pytest.mark.parametrize(
    ("inputs", "store", "expected"),
    [
        ("ecoli.fasta", "/tmp/s", "INPUT ecoli.fasta is a relative path: the job runs on the cluster"),
        ("ftp://bucket/ecoli.fasta", "/tmp/s", "INPUT ftp://bucket/ecoli.fasta: not an object-store URI"),
        (str(EXAMPLE), "s3:///store", "--store s3:///store: the URI names no bucket"),
        (str(EXAMPLE), "store", "--store store is a relative path"),
        ("/no/such/input.fasta", "/tmp/s", "INPUT /no/such/input.fasta does not exist here"),
        ("-", "/tmp/s", "'-' (standard input) cannot be sent to a cluster job"),
    ],
)  # fmt: skip
def test_paths_a_cluster_job_cannot_use_are_refused_in_one_line(inputs, store, expected, capsys):
    code, err = submit_here(capsys, "embed", inputs, "--store", store, "--address", "http://127.0.0.2:9")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("proteoflow submit: error: ") and expected in err, err


def test_options_are_checked_as_embed_checks_them_before_any_connection(tiny_esm2, tmp_path, capsys):
    """Same one-line errors as `proteoflow embed`, and the checkpoint's own check for a model path."""
    cases = [(["--pooling", "max"], "--pooling takes mean and/or bos, not max"),
             (["--min-length", "50", "--max-length", "10"], "--min-length 50 is greater than --max-length 10"),
             (["--model", str(tiny_esm2), "--layers", "-1,40"], "--layers"),
             (["--ray-address", "auto"], "--ray-address is set by submit")]  # fmt: skip
    for extra, expected in cases:
        argv = ["embed", str(EXAMPLE), "--store", str(tmp_path / "s"), *extra]
        local = run_cli(*argv) if extra[0] != "--ray-address" else None
        code, err = submit_here(
            capsys, *argv, "--address", "http://127.0.0.2:9"
        )  # never reached: no one there
        assert code == 2 and err.count("\n") == 1 and expected in err, (extra, err)
        if local is not None:  # embed says the same
            assert (
                local.returncode == 2
                and err.split("error: ", 1)[1] == local.stderr.decode().split("error: ", 1)[1]
            )
    assert not (tmp_path / "s").exists()
    code, err = submit_here(
        capsys, "embed", str(EXAMPLE), "--store", str(tmp_path / "s"), "--address", "http://127.0.0.2:9"
    )
    assert code == 2 and "--address http://127.0.0.2:9: no Ray dashboard answers there" in err, err


def test_the_jobs_command_line_is_parsed_back_to_the_same_options(tiny_esm2):
    """The entrypoint is rebuilt from the parsed options; the CLI the job runs parses it to the same values."""
    from flows import submit as sub
    from flows.cli import _join_negative_values, build_parser

    argv = ["submit", "fold", str(EXAMPLE), "--store", "/tmp/s", "--chunk-size", "none", "--pae",
            "--num-recycles", "0", "--workers", "3", "--gpus-per-worker", "0.5", "--max-length", "900"]  # fmt: skip
    args = build_parser().parse_args(argv)
    job = sub.job_argv(args, sub.compute_parsers()["fold"])
    assert job[:4] == ["python", "-m", "flows.cli", "fold"] and "--ray-address=auto" in job
    parsed = build_parser().parse_args(job[3:])
    assert (parsed.chunk_size, parsed.pae, parsed.num_recycles, parsed.workers, parsed.gpus_per_worker) == (
        "none", True, 0, 3, 0.5)  # fmt: skip
    args = build_parser().parse_args(_join_negative_values(
        ["submit", "embed", str(EXAMPLE), "--store", "/tmp/s", "--model", str(tiny_esm2), "--layers", "-1,2"]))  # fmt: skip
    job = sub.job_argv(args, sub.compute_parsers()["embed"])
    sub.check_round_trip(job, args, sub.compute_parsers()["embed"])
    assert build_parser().parse_args(job[3:]).layers == [-1, 2]


def test_the_job_carries_the_code_or_a_pinned_install_and_prefects_address():
    from flows import submit as sub

    variables = sub.env_vars(["HF_HOME=/shared/hf", "A=b=c"], {"PREFECT_API_URL": "http://prefect:4200/api"})
    assert variables == {"PREFECT_API_URL": "http://prefect:4200/api", "HF_HOME": "/shared/hf", "A": "b=c"}
    shipped = sub.runtime_env(None, False, variables)
    assert [Path(m).name for m in shipped["py_modules"]] == ["esm_core", "storage", "flows"]
    assert all((Path(m) / "__init__.py").exists() for m in shipped["py_modules"])
    assert sub.runtime_env(["proteoflow==0.1.0"], False, {}) == {"pip": ["proteoflow==0.1.0"]}
    assert sub.runtime_env(None, True, {}) == {}
    assert sub.env_vars([], {}) == {}


# ---------------------------------------------------------------------------------------------- on a cluster


def test_submitted_embed_equals_a_local_run(cluster, proteome, tiny_esm2, local_rows, tmp_path):
    head = cluster.ready()
    cluster.worker()
    store = tmp_path / "store"
    started = time.monotonic()
    result = submit("embed", str(proteome), "--store", str(store), "--model", str(tiny_esm2), *OPTIONS,
                    "--address", head.dashboard, "--env", "HF_HUB_OFFLINE=1", "--wait")  # fmt: skip
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, out[-4000:] + err[-2000:]
    job_id = job_id_of(result)
    assert f"ray job logs -f {job_id} --address {head.dashboard}" in out
    assert f"ray job status {job_id} --address {head.dashboard}" in out
    assert "must be on a file system every Ray node mounts" in err and f"job {job_id} ended SUCCEEDED" in err
    assert re.search(r"^run +embed-\w+ \(completed\)", out, re.MULTILINE), out  # the job's own summary
    info = jobs_client(head).get_job_info(job_id)
    assert len(info.runtime_env["py_modules"]) == 3  # esm_core, storage, flows travelled with the job
    assert "--ray-address=auto" in info.entrypoint
    status, counts = compute_counts(store)
    assert status == "completed"
    assert len({p["node_id"] for p in counts["placements"]}) == 2  # actors on both nodes
    assert embedding_rows(store) == local_rows
    print(f"submitted run: {time.monotonic() - started:.1f} s")


def test_a_submitted_run_reads_and_writes_object_storage(cluster, s3_server, proteome, tiny_esm2, local_rows):
    """Input and store on a real S3 server (SeaweedFS on loopback): the job reads the FASTA object, its actors on
    both nodes write their outputs there, and SQL over the s3:// store returns the local run's rows."""
    import uuid

    from storage.objects import ObjectPath

    head = cluster.ready()
    cluster.worker()
    prefix = f"s3://proteoflow-tests/submit-{uuid.uuid4().hex[:8]}"
    ObjectPath(f"{prefix}/in/ecoli.fasta").write_bytes(proteome.read_bytes())
    store = f"{prefix}/store"
    env = [arg for key, value in s3_server.env.items() for arg in ("--env", f"{key}={value}")]
    result = submit("embed", f"{prefix}/in/", "--store", store, "--model", str(tiny_esm2), *OPTIONS,
                    "--address", head.dashboard, *env, "--wait")  # fmt: skip
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, out[-4000:] + err[-2000:]
    assert "reads and writes object storage with the cluster's own credentials" in err, err
    assert "on the cluster's nodes: they must be on a file system" in err  # the model path is local
    status, counts = compute_counts(store)
    assert status == "completed" and counts["shards_failed"] == 0
    assert len({p["node_id"] for p in counts["placements"]}) == 2  # actors on both nodes wrote to the store
    assert embedding_rows(store) == local_rows


def test_a_worker_node_killed_mid_run_leaves_the_job_completing_on_the_head(
    cluster, proteome, tiny_esm2, local_rows, tmp_path
):
    head = cluster.ready()
    worker = cluster.worker()
    store = tmp_path / "store"
    result = submit("embed", str(proteome), "--store", str(store), "--model", str(tiny_esm2), *OPTIONS,
                    "--address", head.dashboard, "--env", "PROTEOFLOW_SHARD_DELAY_S=1")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    job_id = job_id_of(result)
    jobs = jobs_client(head)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not list(store.glob("shards/run_id=embed-*/shard-*.parquet")):  # computing: one shard is done
        assert time.monotonic() < deadline and jobs.get_job_status(job_id) in ("PENDING", "RUNNING"), (
            jobs.get_job_logs(job_id)[-4000:])  # fmt: skip
        time.sleep(0.2)
    killed_at = time.monotonic()
    worker.kill()  # raylet, its workers (one actor computing a shard), its agents: the whole node
    while (status := jobs.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, jobs.get_job_logs(job_id)[-4000:]
        time.sleep(0.5)
    logs = jobs.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    run_status, counts = compute_counts(store)
    assert run_status == "completed" and counts["shards_failed"] == 0, logs[-4000:]
    assert len({p["node_id"] for p in counts["placements"]}) == 2  # the lost node held an actor
    assert counts["replaced_workers"] >= 1 and counts["retries"] >= 1, counts  # its shard was retried
    assert embedding_rows(store) == local_rows  # exactly the local run's rows, nothing lost or doubled
    print(f"job ended {time.monotonic() - killed_at:.1f} s after the node was killed")


def test_wait_exits_with_the_jobs_own_status_when_the_job_fails_on_the_cluster(cluster, proteome, tmp_path):
    """A hub model missing from the cluster's (empty, offline) cache: only the job can find out; --wait shows
    the job's one-line error and exits with its driver's status."""
    head = cluster.ready()
    result = submit("embed", str(proteome), "--store", str(tmp_path / "store"), "--model", "esm2_t6_8M_UR50D",
                    "--address", head.dashboard, "--env", f"HF_HOME={tmp_path / 'hf'}", "--env", "HF_HUB_OFFLINE=1",
                    "--wait")  # fmt: skip
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 2, out[-3000:] + err[-2000:]
    assert "proteoflow embed: error: model 'facebook/esm2_t6_8M_UR50D' not found" in out  # the job's own line
    assert f"job {job_id_of(result)} ended FAILED" in err
