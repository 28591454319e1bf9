"""Streaming FASTA reader: plain or gzip files, directories of them, or stdin, in large blocks.

Records are split on ``\\n>`` inside multi-megabyte blocks so the per-record cost stays a few C calls;
memory holds one block and one record at a time. Inputs that cannot be FASTA (binary data, FASTQ, text
before the first ``>``, a truncated gzip) raise :class:`InputError` with a one-line message.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from storage.objects import ObjectStoreError, as_path, is_uri

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
        if is_uri(item):
            found_remote, skipped_remote = _object_sources(item)
            sources += found_remote
            skipped += skipped_remote
            continue
        path = Path(item)
        if path.is_dir():
            found = []
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    (found if is_fasta_name(child) else skipped).append(str(child))
            if not found:
                raise InputError(
                    f"{item}: directory holds no FASTA files (looked for {', '.join(FASTA_SUFFIXES)}, optionally .gz)"
                )
            sources.extend(Source(f) for f in found)
            continue
        if not path.exists():
            raise InputError(f"{item}: no such file or directory")
        if not os.access(path, os.R_OK):
            raise InputError(f"{item}: permission denied")
        sources.append(Source(str(path)))
    return sources, skipped


def _object_sources(item: str) -> tuple[list[Source], list[str]]:
    """An object-store input: one object, or every FASTA object under a prefix (sorted); read by streaming."""
    try:
        path = as_path(item)
        if path.is_file():
            return [Source(str(path))], []
        found, skipped = [], []
        for child in sorted(path.rglob("*")):
            if child.is_file():
                (found if is_fasta_name(child) else skipped).append(str(child))  # type: ignore[arg-type]
    except (OSError, ObjectStoreError, pa.ArrowException) as exc:
        raise InputError(f"{item}: cannot read ({' '.join(str(exc).split())[:200]})") from None
    if not found:
        raise InputError(f"{item}: no such object, and no FASTA objects under it")
    return [Source(f) for f in found], skipped


def _open_binary(source: Source) -> tuple[BinaryIO, BinaryIO]:
    """Open a source as ``(stream, raw)``, decompressing gzip (detected by magic, not suffix)."""
    if source.is_stdin:
        raw: BinaryIO = sys.stdin.buffer
    elif is_uri(source.name):
        try:
            path = as_path(source.name)
            raw = io.BufferedReader(path.fs.open_input_stream(path.location))  # type: ignore[union-attr,arg-type]
        except (OSError, ObjectStoreError) as exc:
            raise InputError(f"{source.name}: cannot open: {' '.join(str(exc).split())[:200]}") from None
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
            raise InputError(
                f"{name}: truncated gzip: the compressed stream ends before its end marker"
            ) from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"{name}: corrupt gzip data ({exc})") from None
        except OSError as exc:
            raise InputError(f"{name}: read failed: {exc}") from None
        if not block:
            return
        if b"\x00" in block:
            raise InputError(f"{name}: binary data (NUL bytes), not FASTA text")
        yield unix_newlines(block)


def unix_newlines(data: bytes) -> bytes:
    """CRLF (Windows) and lone CR (classic Mac) line ends as LF. A CRLF split across two blocks becomes an
    extra blank line, which FASTA ignores."""
    if b"\r" not in data:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _check_start(data: bytes, name: str) -> bytes:
    """Strip leading blank lines and refuse inputs whose first non-blank character is not '>'."""
    stripped = data.removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte-order mark is not content
    if not stripped or stripped.startswith(b">"):
        return stripped
    first_line = stripped.split(b"\n", 1)[0][:60].decode("utf-8", "replace").rstrip()
    if stripped.startswith(b"@"):
        raise InputError(
            f"{name}: looks like FASTQ (first record starts with '@'); proteoflow reads protein FASTA"
        )
    raise InputError(f"{name}: not FASTA: text before the first '>' (line starts {first_line!r})")


CHUNK_TARGET = BLOCK_SIZE  # a chunk ends at the first record boundary at least this far from its start


def iter_record_chunks(source: Source, on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Yield chunks of whole records: ``rec1\\n>rec2...`` without the first '>'.

    A chunk ends at the first record boundary (``\\n>``) at least CHUNK_TARGET bytes from its start, so the
    same content always gives the same chunks however it arrives (plain, gzip, stdin; see
    :func:`plan_file_chunks`). ``on_bytes(n)`` reports progress in decompressed bytes.
    """
    name = "<stdin>" if source.is_stdin else source.name
    stream, raw = _open_binary(source)
    try:
        buf = b""
        started = False
        for block in _read_blocks(stream, name):
            if on_bytes is not None:
                on_bytes(len(block))
            buf = buf + block if buf else block
            if not started:
                buf = _check_start(buf, name)
                if not buf:
                    continue
                buf, started = buf[1:], True
            while len(buf) > CHUNK_TARGET:
                cut = buf.find(b"\n>", CHUNK_TARGET)
                if cut < 0:
                    break
                yield buf[:cut]
                buf = buf[cut + 2 :]
        if started:
            yield buf
    finally:
        if stream is not raw:
            stream.close()
        if not source.is_stdin:
            raw.close()


def is_plain_file(source: Source) -> bool:
    """A regular, uncompressed file with LF line ends: its chunks can be read by offset, in parallel."""
    if source.is_stdin or is_uri(source.name) or not os.path.isfile(source.name):
        return False
    with open(source.name, "rb") as fh:
        head = fh.read(1 << 16)
    # Files with CR line ends are streamed (and their line ends rewritten) like gzip input, so their chunks
    # and run id are the same whichever way they arrive.
    return head[:2] != GZIP_MAGIC and b"\r" not in head


def plan_file_chunks(
    source: Source, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of the chunks :func:`iter_record_chunks` would yield for a plain file, found by
    seeking to each chunk's target end and reading only until the next record boundary."""
    size = os.path.getsize(source.name)
    with open(source.name, "rb") as fh:
        head = b""
        while True:  # the first non-blank byte must open a record
            more = fh.read(1 << 16)
            head += more
            if b"\x00" in head:
                raise InputError(f"{source.name}: binary data (NUL bytes), not FASTA text")
            stripped = _check_start(head, source.name)
            if stripped or not more:
                break
        if not stripped:
            return
        start = len(head) - len(stripped) + 1
        while True:
            cut = _find_boundary(fh, start + CHUNK_TARGET, size)
            end = size if cut < 0 else cut
            if on_bytes is not None:
                on_bytes(end - start + 2)
            yield start, end - start
            if cut < 0:
                return
            start = cut + 2


def _find_boundary(fh: BinaryIO, at: int, size: int, window: int = 1 << 16) -> int:
    """Absolute position of the first ``\\n>`` at or after ``at``, or -1."""
    position = at
    while position < size:
        fh.seek(position)
        data = fh.read(window + 1)  # one byte of overlap: a boundary may straddle two windows
        found = data.find(b"\n>")
        if found >= 0:
            return position + found
        position += window
    return -1


def read_chunk(path: str, offset: int, length: int) -> bytes:
    """Read one planned chunk of a plain file (in a parse worker), refusing binary data."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read(length)
    if b"\x00" in chunk:
        raise InputError(f"{path}: binary data (NUL bytes), not FASTA text")
    return chunk


def parse_headers(headers: list[bytes]) -> tuple[pa.Array, pa.Array]:
    """Ids (first word) and descriptions (the rest) of a block of header lines, as Arrow strings.

    Split as bytes and validated as UTF-8 by Arrow in one call; a block with invalid UTF-8 is decoded
    record by record with replacement characters instead.
    """
    words = [h.split(None, 1) for h in headers]
    ids = [w[0] if w else b"" for w in words]
    descriptions = [w[1] if len(w) == 2 else b"" for w in words]
    try:
        return pa.array(ids, pa.binary()).cast(pa.string()), pa.array(descriptions, pa.binary()).cast(
            pa.string()
        )
    except pa.ArrowInvalid:
        return (
            pa.array([x.decode("utf-8", "replace") for x in ids], pa.string()),
            pa.array([x.decode("utf-8", "replace") for x in descriptions], pa.string()),
        )
