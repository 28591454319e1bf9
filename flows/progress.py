"""One live progress bar on stderr: redrawn in place on a terminal; elsewhere (a log file, CI) a plain line at
most every few seconds and always a final line, so a log shows how a run ended."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _count(n: float) -> str:
    return f"{n:,.0f}"


class ProgressBar:
    """Progress of ``total`` units (or an open-ended count when ``total`` is None).

    The rate is measured from the first :meth:`update` (work done before it, e.g. by an earlier attempt of a
    resumed run, is not counted as speed), and the ETA is what is left at that observed rate.
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        unit: str = "residues",
        stream: TextIO | None = None,
        every_s: float = 5.0,
        fmt: Callable[[float], str] = _count,
    ) -> None:
        stream = stream or sys.stderr
        self.label, self.total, self.unit, self.stream, self.every_s, self.fmt = (
            label,
            total,
            unit,
            stream,
            every_s,
            fmt,
        )
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._first: tuple[float, float] | None = None  # (time, done) at the first update
        self._last_print = self.started  # off a terminal: the first periodic line after every_s
        self._shown = False
        self.done = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        """Units per second observed since the first update."""
        if self._first is None:
            return 0.0
        seconds = time.monotonic() - self._first[0]
        return (self.done - self._first[1]) / seconds if seconds > 0.5 else 0.0

    def text(self) -> str:
        rate = self.rate()
        parts = []
        if self.total:
            share = min(1.0, self.done / self.total)
            filled = int(share * BAR_WIDTH)
            parts.append(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:4.0%}")
            parts.append(f"{self.fmt(self.done)}/{self.fmt(self.total)} {self.unit}")
        else:
            parts.append(f"{self.fmt(self.done)} {self.unit}")
        if rate > 0:
            parts.append(f"{self.fmt(rate)} {self.unit}/s")
            if self.total:
                parts.append(f"ETA {_duration(max(0.0, self.total - self.done) / rate)}")
        parts.append(f"elapsed {_duration(self.elapsed)}")
        return f"{self.label}: " + "  ".join(parts)

    def update(self, done: float) -> None:
        """Record progress and redraw (a terminal) or print a line if ``every_s`` has passed (elsewhere)."""
        self.done = done
        if self._first is None:
            self._first = (time.monotonic(), done)
        self._emit(self.text(), final=False)

    def status(self, text: str) -> None:
        """A line about a stage with no count yet (starting workers, loading the model)."""
        self._emit(f"{self.label}: {text}", final=False, force=not self.tty)

    def finish(self, text: str | None = None) -> None:
        """The final line, always printed."""
        self._emit(text or self.text(), final=True)

    def _emit(self, line: str, final: bool, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}" + ("\n" if final else ""))
        elif final or force or now - self._last_print >= self.every_s:
            self.stream.write(line + "\n")
            self._last_print = now
        else:
            return
        self.stream.flush()
