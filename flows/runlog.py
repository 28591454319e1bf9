"""A quiet terminal and a full log: by default a compute run shows only its start line, one progress bar and
its summary; Prefect's, Ray's and the workers' messages go to ``logs/<run_id>.log`` in the store instead.

Prefect reads its logging settings from the environment when it is first imported, so :func:`configure`
must run before anything imports Prefect.
"""

from __future__ import annotations

import logging
import os

from storage.objects import ObjectPath, StorePath

QUIET_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",  # Prefect's INFO lines and its own tracebacks
    "PREFECT_SERVER_LOGGING_LEVEL": "ERROR",
}
ALWAYS_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # telemetry: fails without network and says so in red
    # Prefect's temporary API can take well over its default 20 s to start on a small, busy machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_UI_ENABLED": "false",  # the temporary API serves no one a UI
}
LOGGERS = ("prefect", "flows", "storage", "esm_core", "ray")


class RunLog(logging.Handler):
    """Keeps every record at INFO and above in memory until the run id is known, then appends to a file."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s - %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a log line must never break the run
            self.handleError(record)

    def attach(self) -> None:
        """Add this handler to proteoflow's, Prefect's and Ray's loggers (again after Prefect configured
        logging, which replaces the handlers of the loggers it names)."""
        _attach(self)

    def save(self, path: StorePath) -> None:
        """Append what was logged to ``path`` (one file per run, every attempt appended; on an object store,
        which cannot append, the object is rewritten whole with the new lines at its end)."""
        text = "\n".join(self.lines) + "\n"
        if isinstance(path, ObjectPath):
            path.write_text((path.read_text(errors="replace") if path.exists() else "") + text)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text)
        self.lines.clear()


def _attach(handler: RunLog) -> None:
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if handler not in logger.handlers:
            logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)


def configure(verbose: bool) -> RunLog:
    """Set the environment Prefect and Ray read at start-up, and attach the run-log handler."""
    for name, value in ALWAYS_ENV.items():
        os.environ.setdefault(name, value)
    if not verbose:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
    handler = RunLog()
    handler.attach()
    return handler
