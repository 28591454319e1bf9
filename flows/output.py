"""Terminal output for the CLI: result tables in table/csv/json form, summaries and progress lines."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from typing import TextIO

MAX_CELL = 60
# C0 and C1 control characters and DEL: a FASTA header can carry terminal escapes (\x1b[31m), \r, \x00.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """Control characters made visible (``\\x1b``, ``\\n``), so a value cannot move the cursor,
    recolour the terminal or break a line of the output."""
    return CONTROL.sub(lambda m: NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_cell(v) for v in value[:4])
        return f"[{inner}{', …' if len(value) > 4 else ''}] ({len(value)})"
    text = escape_controls(str(value))
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _csv_cell(value: object) -> object:
    """A CSV field: nested values as JSON, text with its control characters escaped."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_jsonable(value))
    return escape_controls(value) if isinstance(value, str) else value


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def write_result(
    columns: Sequence[str], rows: Sequence[tuple], fmt: str = "table", out: TextIO | None = None
) -> None:
    """Print a query result: aligned table (long cells shortened), full CSV, or a JSON array of objects."""
    out = out or sys.stdout  # resolved per call: a default bound at import outlives a redirected stream
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([escape_controls(c) for c in columns])
        for row in rows:
            writer.writerow([_csv_cell(v) for v in row])
        return
    if fmt == "json":
        json.dump(
            [dict(zip(columns, (_jsonable(v) for v in row), strict=True)) for row in rows],
            out,
            indent=1,
            allow_nan=False,
        )
        out.write("\n")
        return
    columns = [escape_controls(c) for c in columns]
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
