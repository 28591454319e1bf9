"""Streaming FASTA reader: plain or gzip files, directories of them, or stdin, in large blocks.

Records are split on ``\\n>`` inside multi-megabyte blocks so the per-record cost stays a few C calls;
memory holds one block and one record at a time. Inputs that cannot be FASTA (binary data, FASTQ, text
before the first ``>``, a truncated gzip) raise :class:`InputError` with a one-line message.
"""

from __future__ import annotations

import gzip
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

BLOCK_SIZE = 1 << 22
FASTA_SUFFIXES = (".fa", ".fasta", ".faa", ".fas", ".pep", ".aa", ".fsa")
GZIP_MAGIC = b"\x1f\x8b"


class InputError(Exception):
    """An input that cannot be read as protein FASTA; the message is one line, meant for the user."""


@dataclass(frozen=True)
class Source:
    """One input to read: a path, or ``-`` for standard input."""

    name: str

    @property
    def is_stdin(self) -> bool:
        return self.name == "-"


def is_fasta_name(path: Path) -> bool:
    """True for names a directory scan picks up: FASTA suffixes, optionally followed by ``.gz``."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(FASTA_SUFFIXES)


def resolve_sources(inputs: list[str]) -> tuple[list[Source], list[str]]:
    """Expand directories (recursively, sorted) and check every path is readable before anything is read.

    Returns the sources and the names of files that a directory scan skipped, so none is dropped silently.
    """
    sources: list[Source] = []
    skipped: list[str] = []
    if not inputs:
        raise InputError("no input given: name FASTA files, directories, or '-' for standard input")
    for item in inputs:
        if item == "-":
            sources.append(Source("-"))
            continue
        path = Path(item)
        if path.is_dir():
            found = []
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    (found if is_fasta_name(child) else skipped).append(str(child))
            if not found:
                raise InputError(f"{item}: directory holds no FASTA files (looked for {', '.join(FASTA_SUFFIXES)}, optionally .gz)")
            sources.extend(Source(f) for f in found)
            continue
        if not path.exists():
            raise InputError(f"{item}: no such file or directory")
        if not os.access(path, os.R_OK):
            raise InputError(f"{item}: permission denied")
        sources.append(Source(str(path)))
    return sources, skipped


def _open_binary(source: Source) -> tuple[BinaryIO, BinaryIO]:
    """Open a source as ``(stream, raw)``, decompressing gzip (detected by magic, not suffix)."""
    if source.is_stdin:
        raw: BinaryIO = sys.stdin.buffer
    else:
        try:
            raw = open(source.name, "rb")  # noqa: SIM115 - closed by iter_record_chunks
        except OSError as exc:
            raise InputError(f"{source.name}: cannot open: {exc.strerror}") from None
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
    return raw, raw


def _read_blocks(stream: BinaryIO, name: str) -> Iterator[bytes]:
    """Yield decompressed blocks, turning decompression failures and binary data into InputError."""
    while True:
        try:
            block = stream.read(BLOCK_SIZE)
        except EOFError:
            raise InputError(f"{name}: truncated gzip: the compressed stream ends before its end marker") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"{name}: corrupt gzip data ({exc})") from None
        except OSError as exc:
            raise InputError(f"{name}: read failed: {exc}") from None
        if not block:
            return
        if b"\x00" in block:
            raise InputError(f"{name}: binary data (NUL bytes), not FASTA text")
        yield block


def _check_start(data: bytes, name: str) -> bytes:
    """Strip leading blank lines and refuse inputs whose first non-blank character is not '>'."""
    stripped = data.removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte-order mark is not content
    if not stripped or stripped.startswith(b">"):
        return stripped
    first_line = stripped.split(b"\n", 1)[0][:60].decode("utf-8", "replace").rstrip()
    if stripped.startswith(b"@"):
        raise InputError(f"{name}: looks like FASTQ (first record starts with '@'); proteoflow reads protein FASTA")
    raise InputError(f"{name}: not FASTA: text before the first '>' (line starts {first_line!r})")


def iter_record_chunks(source: Source, on_bytes: Callable[[bytes], None] | None = None) -> Iterator[bytes]:
    """Yield chunks of whole records, one per block: ``rec1\\n>rec2...`` without the first '>'.

    ``on_bytes(block)`` is called with each decompressed block (for progress and content digests).
    Working a block's records at a time keeps the per-record Python cost to a few C calls.
    """
    name = "<stdin>" if source.is_stdin else source.name
    stream, raw = _open_binary(source)
    try:
        pending = b""
        started = False
        for block in _read_blocks(stream, name):
            if on_bytes is not None:
                on_bytes(block)
            data = pending + block if pending else block
            if not started:
                data = _check_start(data, name)
                if not data:
                    continue
                started = True
            cut = data.rfind(b"\n>")
            if cut < 0:
                pending = data
                continue
            chunk, pending = data[:cut], data[cut + 1 :]
            yield chunk[1:]
        if pending:
            yield pending[1:]
    finally:
        if stream is not raw:
            stream.close()
        if not source.is_stdin:
            raw.close()


def parse_headers(headers: list[bytes]) -> tuple[pa.Array, pa.Array]:
    """Ids (first word) and descriptions (the rest) of a block of header lines, as Arrow strings.

    Split as bytes and validated as UTF-8 by Arrow in one call; a block with invalid UTF-8 is decoded
    record by record with replacement characters instead.
    """
    words = [h.split(None, 1) for h in headers]
    ids = [w[0] if w else b"" for w in words]
    descriptions = [w[1] if len(w) == 2 else b"" for w in words]
    try:
        return pa.array(ids, pa.binary()).cast(pa.string()), pa.array(descriptions, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        return (pa.array([x.decode("utf-8", "replace") for x in ids], pa.string()),
                pa.array([x.decode("utf-8", "replace") for x in descriptions], pa.string()))
