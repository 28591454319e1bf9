"""Exceptions the CLI turns into one-line messages, and the one line an interrupted command ends with."""

from __future__ import annotations

import signal
import sys
import threading


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: a KeyboardInterrupt (so everything that cleans up on Ctrl-C does so for
    SIGTERM too) that remembers which signal, for the exit status 128 + signal."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_reported = threading.Lock()
_received: list[int] = []


def note_signal(signum: int) -> None:
    """Remember the first interrupting signal: the exception that reaches the CLI may not carry it (Ray's
    blocking calls turn any exception raised by a signal handler into a plain KeyboardInterrupt)."""
    if not _received:
        _received.append(int(signum))


def interrupted_by_signal() -> bool:
    """Whether a handler installed by a compute run (flows.launch.Interrupts) saw SIGINT or SIGTERM."""
    return bool(_received)


def report_interrupt(command: str, signum: int | None = None, hint: str = "") -> int:
    """Write ``proteoflow COMMAND: interrupted`` once per process (the CLI's handler and the exit watchdog
    may both get here) and return the exit status for the signal (130 for SIGINT, 143 for SIGTERM):
    ``signum``, else the one :func:`note_signal` saw, else SIGINT."""
    signum = signum or (_received[0] if _received else signal.SIGINT)
    if _reported.acquire(blocking=False):
        how = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
        sys.stderr.write(f"proteoflow {command}: interrupted{how}{hint}\n")
        sys.stderr.flush()
    return 128 + int(signum)
