"""How a compute run ends when it is told to: Ctrl-C (SIGINT to the whole foreground process group, as a
terminal sends it), SIGTERM (to the group, as systemd, Slurm or a container runtime send it), and ``kill -9``
of the driver alone. Real CLI processes on a real slice of E. coli, each in its own session, no mocks.

Interrupted runs must end within 10 s with exactly one line on stderr (no traceback), exit 128 + signal,
record the run ``interrupted``, and resume on rerun; no process the driver started may outlive it by more
than a few seconds, whichever way it ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ECOLI, ROOT, write_slice

from esm_core.weights import RANDOM_WEIGHTS_NOTICE
from storage.catalog import query

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
NOTICE = RANDOM_WEIGHTS_NOTICE.format(name="tiny_esm2")
START_TIMEOUT_S = 300  # model-free startup is ~20 s here; a busy shared machine can take several times that


@pytest.fixture(scope="module")
def fasta(tmp_path_factory) -> Path:
    """500 real E. coli proteins: 4 shards of a few seconds each for the tiny model at --max-tokens 256."""
    return write_slice(ECOLI, tmp_path_factory.mktemp("signals") / "ecoli500.fasta", count=500)


def command(fasta: Path, store: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "embed", str(fasta), "--store", str(store), "--model", str(model),
            "--no-progress", "--max-tokens", "256", "--precision", "fp32", "--workers", "1"]  # fmt: skip


def start(args: list[str]) -> subprocess.Popen:
    """The CLI as a shell would run a foreground job: its own process group (here: its own session)."""
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_shard(proc: subprocess.Popen, store: Path) -> None:
    """Block until the run has committed its first shard (so it is computing, with shards still to do)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not list(store.glob("shards/run_id=*/shard-*.parquet")):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first shard: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no shard was committed before the deadline")
        time.sleep(0.1)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def survivors(procs: list[psutil.Process], within: float) -> list[str]:
    """The processes of ``procs`` still running after ``within`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_status(store: Path) -> tuple[str, str]:
    [(status, message)] = query(store, "SELECT status, message FROM runs WHERE kind = 'embed'")[1]
    return status, message


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[float, str, list[psutil.Process]]:
    """Send ``signum`` to the whole process group; the seconds until the driver exited, its stderr, and the
    processes it had started."""
    children = descendants(proc.pid)
    sent = time.monotonic()
    os.killpg(proc.pid, signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        kill_all(children)
        pytest.fail(f"the run did not end within 60 s of {signal.Signals(signum).name}")
    return time.monotonic() - sent, err, children


def assert_one_line(err: str, expected: str) -> None:
    """Apart from the notice printed at start for random weights, stderr is the one expected line."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and line != NOTICE]
    assert lines == [expected], err[-3000:]


def test_ctrl_c_to_the_process_group_ends_the_run_in_seconds_and_rerun_resumes(tiny_esm2, fasta, tmp_path):
    store = tmp_path / "store"
    args = command(fasta, store, tiny_esm2)
    proc = start(args)
    wait_for_shard(proc, store)
    elapsed, err, children = interrupt(proc, signal.SIGINT)
    print(f"Ctrl-C: exit {proc.returncode} after {elapsed:.1f} s")
    left = survivors(children, within=5)
    kill_all(children)
    assert proc.returncode == 130, err[-3000:]
    assert elapsed < 10, elapsed
    assert_one_line(err, "proteoflow embed: interrupted; rerun the same command to resume")
    assert not left, left
    assert run_status(store) == ("interrupted", "interrupted; rerun the same command to resume")
    done_before = {p.name for p in store.glob("shards/run_id=*/shard-*.parquet")}

    rerun = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert run_status(store)[0] == "completed"
    shards = query(store, "SELECT shard_id, attempt, status FROM shards ORDER BY 1")[1]
    assert all(status == "done" for _, _, status in shards) and len(shards) > len(done_before)
    assert sum(1 for _, attempt, _ in shards if attempt == 1) == len(done_before)  # not computed again


def test_sigterm_to_the_process_group_ends_the_run_like_ctrl_c(tiny_esm2, fasta, tmp_path):
    """A SIGTERM reaches Ray's GCS and raylet too, which then start a slow graceful shutdown of their own."""
    store = tmp_path / "store"
    proc = start(command(fasta, store, tiny_esm2))
    wait_for_shard(proc, store)
    elapsed, err, children = interrupt(proc, signal.SIGTERM)
    print(f"SIGTERM: exit {proc.returncode} after {elapsed:.1f} s")
    left = survivors(children, within=5)
    kill_all(children)
    assert proc.returncode == 143, err[-3000:]
    assert elapsed < 10, elapsed
    assert_one_line(err, "proteoflow embed: interrupted (SIGTERM); rerun the same command to resume")
    assert not left, left
    assert run_status(store) == ("interrupted", "interrupted; rerun the same command to resume")


def test_kill_9_of_the_driver_alone_leaves_no_process_behind(tiny_esm2, fasta, tmp_path):
    """SIGKILL to the driver only (not its group): Ray's processes, its workers and agents, Prefect's API and
    anything else the driver started must end on their own within seconds."""
    store = tmp_path / "store"
    proc = start(command(fasta, store, tiny_esm2))
    wait_for_shard(proc, store)
    children = descendants(proc.pid)
    names = {p.name() for p in children}
    assert {"raylet", "gcs_server"} <= names and any("ShardWorker" in n for n in names), names
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    left = survivors(children, within=10)
    print(f"kill -9: {len(children)} processes started by the driver; all gone after "
          f"{time.monotonic() - killed:.1f} s" if not left else f"kill -9: still running: {left}")  # fmt: skip
    kill_all(children)
    assert not left, left
    assert run_status(store)[0] == "running"  # nothing could record the end; a rerun resumes it


@pytest.mark.slow
def test_sigterm_while_the_model_loads_ends_the_command_the_same_way(tiny_esm2, fasta, tmp_path):
    """Before any run record exists: ``ray.init`` installs its own SIGTERM handler (exit status 15 or 1, Ray's
    processes left to their slow graceful shutdown) unless the command keeps its own."""
    store = tmp_path / "store"
    proc = start(command(fasta, store, tiny_esm2))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not any("ShardWorker" in p.name() for p in descendants(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "no worker started"
        time.sleep(0.05)
    children = descendants(proc.pid)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    print(f"SIGTERM while the model loads: exit {proc.returncode} after {elapsed:.1f} s")
    left = survivors(children, within=5)
    kill_all(children)
    assert proc.returncode == 143, err[-3000:]
    assert elapsed < 10, elapsed
    assert_one_line(err, "proteoflow embed: interrupted (SIGTERM); rerun the same command to resume")
    assert not left, left
    assert not list(store.glob("runs/embed-*.parquet"))  # interrupted before the run was opened
