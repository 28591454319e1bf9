"""Prefect's temporary API server as this command's own child process, and a reachability check for a
server the user configured.

Prefect starts the same server itself when no ``PREFECT_API_URL`` is set, but only when a flow begins, after
importing the server's modules into the driver (seconds on a small machine), in the terminal's process group
(Ctrl-C kills it first, and the driver then spends minutes retrying to report the interruption to it), and a
``kill -9`` of the driver leaves it running forever. Started here instead, it boots while Ray starts and the
model loads, the driver never imports the server, a Ctrl-C meant for the run does not reach it (own process
group), and the kernel ends it with its parent (``PR_SET_PDEATHSIG``), whatever kills the driver.

Prefect reads its settings once, when it is imported: the flow must run inside :meth:`TemporaryApi.settings`
for the URL to take effect (setting the environment variable afterwards changes nothing in this process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from flows.errors import CliError

PR_SET_PDEATHSIG = 1
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "ERROR",
}


class ApiStartError(CliError):
    """The temporary API did not answer in time, or the configured one not at all; the message is one line."""


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent dies (Linux; elsewhere a no-op).

    The parent may have died between fork and this call; the kernel would then never send the signal."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(1)


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


def configured_url() -> str:
    """The API URL Prefect will use in this process (environment or active profile), or ''."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL") or "")


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """A one-line ApiStartError unless something answers HTTP at ``url`` within ``timeout`` seconds.

    Any HTTP answer counts (a server that wants credentials still exists); only a refused or silent
    connection fails, before Ray starts and a model loads, instead of Prefect's minutes of retries."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiStartError(
            f"PREFECT_API_URL {url} does not answer ({reason}); unset it to use a temporary local API"
        ) from None


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
            start_new_session=True,  # a terminal's Ctrl-C is for the driver, which then stops this server
        )
        os.environ["PREFECT_API_URL"] = self.url  # for child processes; this one needs settings()

    @contextlib.contextmanager
    def settings(self):
        """Prefect settings pointing this process at the server: its URL, and no log shipping to it (the run's
        log file in the store has every line, and no one watches this server's UI)."""
        from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url, PREFECT_LOGGING_TO_API_ENABLED: False}):
            yield

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
