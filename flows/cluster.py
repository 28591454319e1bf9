"""Ray connection: join a cluster at ``--ray-address``, or start a local one for this run and stop it after.

When the driver already holds a Ray connection (tests, notebooks) it is reused and left open.

A local Ray started here ends with the driver, however the driver ends. Ray starts its GCS and raylet with
SIGINT blocked (a terminal's Ctrl-C reaches only the driver, which then shuts them down) and with
``PR_SET_PDEATHSIG`` (they die with the driver, ``kill -9`` included); the raylet's workers die with the raylet,
but its dashboard and runtime-env agents linger for a minute or more trying to report the raylet's death to the
dead GCS. :func:`start_reaper` ends those: a tiny process outside the driver's session that waits for the
driver's death and then kills whatever the driver had started (tests/test_signals.py measures it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import ray

from flows.errors import CliError, interrupted_by_signal

ROOT = Path(__file__).resolve().parents[1]


def runtime_env_for_remote() -> dict:
    """Ship this project's packages to a remote cluster's workers (the cluster image needs its deps)."""
    import esm_core
    import flows
    import storage

    return {"py_modules": [Path(m.__file__).parent for m in (esm_core, storage, flows)]}


TOKEN_ENV = "PROTEOFLOW_RUN_TOKEN"
_REAPER = r"""
import os, select, signal, sys, time

driver, me, mark = os.getppid(), os.getpid(), ("%s=%s" % (sys.argv[1], sys.argv[2])).encode()


def table():
    # pid -> (parent pid, start time in clock ticks since boot), from /proc/PID/stat
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as fh:
                    stat = fh.read()
                fields = stat[stat.rindex(b")") + 2:].split()
                found[int(name)] = (int(fields[1]), int(fields[19]))
            except (OSError, ValueError, IndexError):
                pass
    return found


def marked(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as fh:
            return mark in fh.read().split(b"\0")
    except OSError:
        return False


born = table()[me][1]
known = {}  # pid -> start time: the driver's descendants started since this reaper, as last seen
while True:
    ready = select.select([0], [], [], 1.0)[0]
    data = os.read(0, 64) if ready else b""
    if ready and data.startswith(b"q"):
        sys.exit(0)  # the driver ended its run in order: nothing to do
    if ready and not data:
        break  # end of file without "q": the driver has died, however it died
    procs = table()
    children = {}
    for pid, (ppid, start) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = [driver], {}
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen and child != me and procs[child][1] >= born:
                seen[child] = procs[child][1]
                todo.append(child)
    known = {pid: start for pid, start in known.items() if procs.get(pid, (0, None))[1] == start}
    known.update(seen)
for sweep in range(10):  # over 2 s: a process that was starting or exiting during one sweep is caught by the next
    procs = table()
    for pid, (ppid, start) in procs.items():
        if pid != me and (known.get(pid) == start or (start >= born and marked(pid))):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    time.sleep(0.2)
"""


class Reaper:
    """When this process dies (``kill -9`` included), kills the processes it started since :meth:`start`
    (Ray's local processes, its workers and agents, Prefect's temporary API, anything they started), found
    as this process's descendants, polled every second while it lives, and by a token in their environment.

    A process outside this one's session waiting on a pipe that only this process writes to: end of file is
    this process's death. :meth:`stop` ends the reaper without killing anything (the run ended in order).
    Linux only (``/proc``); elsewhere nothing is started."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None

    def start(self) -> Reaper:
        if not sys.platform.startswith("linux"):
            return self
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-c", _REAPER, TOKEN_ENV, self.token],
            stdin=subprocess.PIPE,  # the only writer is this process (close-on-exec): its end is our end
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # neither a terminal's Ctrl-C nor a kill of our process group reaches it
        )
        os.environ[TOKEN_ENV] = self.token  # inherited by every process started from now on
        return self

    def stop(self, kill: bool = False) -> None:
        """End the reaper: at once (``kill=False``, the run ended in order), or after it killed what this
        process started, as if this process had died (``kill=True``: it is about to)."""
        if os.environ.get(TOKEN_ENV) == self.token:
            del os.environ[TOKEN_ENV]
        if self.process is not None and self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                if not kill:
                    self.process.stdin.write(b"q")
                self.process.stdin.close()


def start_reaper() -> Reaper:
    """Start a :class:`Reaper` for the processes this run is about to start."""
    return Reaper().start()


def check_address(address: str, timeout: float = 5.0) -> None:
    """A one-line CliError unless something accepts a TCP connection at ``address`` (``host:port`` or
    ``ray://host:port``) within ``timeout`` seconds: ``ray.init`` itself retries a dead address for
    about a minute and then fails with a page of log lines."""
    target = address.removeprefix("ray://")
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        number = int(port.split("/")[0])
    except ValueError:
        raise CliError(f"--ray-address {address}: expected HOST:PORT or ray://HOST:PORT") from None
    try:
        with socket.create_connection((host.strip("[]"), number), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CliError(f"--ray-address {address}: no Ray cluster answers there ({reason.lower()})") from None


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    ship_code: bool = False,
    quiet: bool = False,
) -> Iterator[dict]:
    """Yield a description of the Ray cluster in use; shut down only what this call started."""
    if ray.is_initialized():
        yield _describe(started=False)
        return
    kwargs: dict = {
        "logging_level": logging.ERROR if quiet else logging.WARNING,
        "include_dashboard": False,
        "log_to_driver": not quiet,  # quiet: workers' output stays in Ray's session logs
    }
    if address:
        check_address(address)
        kwargs["address"] = address
        if ship_code:
            kwargs["runtime_env"] = runtime_env_for_remote()
    else:
        # A fresh local instance for this run; never attach to some other cluster by accident.
        kwargs.update(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        where = f"--ray-address {address}" if address else "a local Ray"
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CliError(f"could not connect to {where}: {first.strip()[:300]}") from None
    ending = False
    try:
        yield _describe(started=not address)
    except BaseException:
        ending = not address and interrupted_by_signal()
        raise
    finally:
        if ending:
            _kill_local_ray()
        else:
            ray.shutdown()


def _kill_local_ray() -> None:
    """End the local Ray at once (SIGKILL) as the interrupted process is about to exit. ``ray.shutdown`` would
    first wait 8 s on a GCS and raylet that a SIGTERM to the whole process group put in their slow graceful
    shutdown, then give each process a second; the run has recorded itself, nothing there is worth keeping."""
    try:
        from ray._private import worker

        worker._global_node.kill_all_processes(check_alive=False, allow_graceful=False)
    except Exception:  # noqa: BLE001 - private API: the kernel (PR_SET_PDEATHSIG) and the reaper still end them
        pass


def local_description(num_cpus: int | None = None) -> dict | None:
    """What a local Ray started by :func:`ray_session` will offer (same shape as its description), found
    without starting it (Ray's own GPU detection), so an impossible pool is refused in a second instead of
    after Ray's start-up; None where Ray's detection cannot be asked."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        gpus = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            gpus = min(gpus, len(visible))
    except Exception:  # noqa: BLE001 - private API: the check after ray.init still runs
        return None
    cpus = float(num_cpus or os.cpu_count() or 1)
    return {"started_local": True, "nodes": 1, "cpus": cpus, "gpus": float(gpus),
            "node_resources": [{"cpus": cpus, "gpus": float(gpus)}]}  # fmt: skip


def _describe(started: bool) -> dict:
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "started_local": started,
        "nodes": len(nodes),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
        # what each node offers, for the check that a pool can be placed at all (flows.resources.check_fits)
        "node_resources": [
            {"cpus": n.get("Resources", {}).get("CPU", 0.0), "gpus": n.get("Resources", {}).get("GPU", 0.0)}
            for n in nodes
        ],
    }
