"""Prefect's temporary API server as this command's own child process.

Prefect starts the same server itself when no ``PREFECT_API_URL`` is set, but only when a flow begins, after
importing the server's modules into the driver (seconds on a small machine), and a ``kill -9`` of the driver
leaves it running forever. Started here instead, it boots while Ray starts and the model loads, the driver
never imports the server, and the kernel ends it with its parent (``PR_SET_PDEATHSIG``), whatever kills it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PR_SET_PDEATHSIG = 1
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "ERROR",
}


class ApiStartError(Exception):
    """The temporary API did not answer in time; the message is one line."""


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_configured() -> bool:
    """Whether the user points Prefect at a server (environment or active profile)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


class TemporaryApi:
    """Start with :meth:`start` (returns at once), wait with :meth:`wait_ready`, end with :meth:`stop`."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **SERVER_ENV},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        os.environ["PREFECT_API_URL"] = self.url  # this process's flows use it; set before Prefect reads it

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the API answers its health check (a one-line ApiStartError otherwise)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.process.stderr.read() or b"").decode(errors="replace").strip().splitlines()
                raise ApiStartError(
                    f"Prefect's temporary API exited ({tail[-1] if tail else self.process.returncode})"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise ApiStartError(f"Prefect's temporary API did not answer within {timeout:.0f} s")

    def stop(self, wait: bool = True) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s when waiting)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        if wait:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
