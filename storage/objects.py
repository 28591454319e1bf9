"""Object-store paths: a store at ``s3://bucket/prefix`` (or ``gs://...``) behind the few pathlib methods the
store uses, so one :class:`~storage.layout.Store` works on a local disk, a shared mount or an object store.

Local stores keep real :class:`pathlib.Path` objects (temporary file, fsync, rename). An object store differs
only where it must: a file is written once under its final key (an upload becomes visible whole, when it
completes, so readers never see part of one), there are no directories (``mkdir`` does nothing; a directory
exists while a key lies under it) and a move is a copy then a delete. The file system comes from pyarrow,
with the endpoint and credentials of the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS`` for gs://).

:class:`ObjectPath` deliberately has no ``__fspath__``: code that hands it to ``os`` or ``open`` fails at
once instead of writing a local file named after the URI.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMES = ("s3", "gs", "gcs")
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


class ObjectStoreError(Exception):
    """An object-store location that cannot be used (unknown scheme, no bucket, unreachable endpoint)."""


def is_uri(text: str | object) -> bool:
    """True for ``scheme://...`` text other than ``file://`` (a local path)."""
    match = _URI.match(str(text)) if isinstance(text, str) else None
    return bool(match) and match["scheme"].lower() != "file"


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """One pyarrow file system per scheme (it serves every bucket); ``bucket`` only seeds its region."""
    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise ObjectStoreError(f"{scheme}://{bucket}: {str(exc).splitlines()[0]}") from None
    _SCHEME_FS.setdefault(scheme, fs)
    return _SCHEME_FS[scheme]


_SCHEME_FS: dict[str, pafs.FileSystem] = {}


@dataclass(frozen=True)
class ObjectStat:
    """The fields of ``os.stat_result`` the store reads."""

    st_size: int
    st_mtime: float

    @property
    def st_mtime_ns(self) -> int:
        return int(self.st_mtime * 1e9)


class ObjectPath:
    """A key (or key prefix) in an object-store bucket, with pathlib's names for what the store does."""

    __slots__ = ("scheme", "bucket", "key", "_known")

    def __init__(self, uri: str) -> None:
        match = _URI.match(uri)
        if not match or match["scheme"].lower() not in SCHEMES:
            raise ObjectStoreError(
                f"{uri}: not an object-store URI (use s3://bucket/prefix or gs://bucket/prefix)"
            )
        bucket, _, key = match["rest"].partition("/")
        if not bucket:
            raise ObjectStoreError(f"{uri}: the URI names no bucket")
        self.scheme = match["scheme"].lower()
        self.bucket = bucket
        self.key = "/".join(p for p in key.split("/") if p not in ("", "."))
        self._known: pafs.FileInfo | None = None  # set for entries found by a listing: no second request

    # -- pure path operations -------------------------------------------------------------------------------

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.scheme, self.bucket)

    @property
    def location(self) -> str:
        """``bucket/key``: how pyarrow's file system names this object."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.location}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __reduce__(self) -> tuple:
        return ObjectPath, (str(self),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, other: str | PurePosixPath) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{self.location}/{other}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self.key).parts

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{self.bucket}/{PurePosixPath(self.key).parent}")

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> ObjectPath:
        return self.parent / (self.stem + suffix)

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        if self.bucket != other.bucket or self.scheme != other.scheme:
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.key).relative_to(other.key or ".")

    def resolve(self) -> ObjectPath:
        return self

    def expanduser(self) -> ObjectPath:
        return self

    def absolute(self) -> ObjectPath:
        return self

    # -- what exists ----------------------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        return self._known or self.fs.get_file_info(self.location)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> ObjectStat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return ObjectStat(info.size or 0, mtime)

    def _list(self, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.location, recursive=recursive, allow_not_found=True)
        return self.fs.get_file_info(selector)

    def _child(self, info: pafs.FileInfo) -> ObjectPath:
        child = ObjectPath(f"{self.scheme}://{info.path}")
        child._known = info
        return child

    def iterdir(self) -> Iterator[ObjectPath]:
        for info in self._list(recursive=False):
            yield self._child(info)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Entries matching ``pattern`` (fnmatch per segment, ``a/*.parquet`` style), like Path.glob."""
        segments = pattern.split("/")
        for info in self._list(recursive=len(segments) > 1):
            rel = PurePosixPath(info.path).relative_to(self.location).parts
            if len(rel) == len(segments) and all(
                fnmatch.fnmatchcase(p, s) for p, s in zip(rel, segments, strict=True)
            ):
                yield self._child(info)

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        """Entries at any depth whose name matches ``pattern``."""
        for info in self._list(recursive=True):
            if fnmatch.fnmatchcase(PurePosixPath(info.path).name, pattern):
                yield self._child(info)

    # -- reading and writing --------------------------------------------------------------------------------

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no directories (a prefix exists while a key lies under it)."""

    def rmdir(self) -> None:
        """Nothing to do, as for :meth:`mkdir`."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.location)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if not missing_ok or self.exists():
                raise

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.location) as fh:
                return fh.read()
        except OSError as exc:
            if not self.exists():
                raise FileNotFoundError(str(self)) from exc
            raise

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def write_bytes(self, data: bytes) -> int:
        """Upload ``data`` as this object: it appears whole when the upload completes, never in part."""
        with self.fs.open_output_stream(self.location) as fh:
            fh.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb", encoding: str = "utf-8") -> IO[Any]:
        """Random-access reading (``rb``), text reading (``r``) or a whole-object upload (``wb``)."""
        if mode == "rb":
            return self.fs.open_input_file(self.location)
        if mode in ("r", "rt"):
            return io.TextIOWrapper(io.BytesIO(self.read_bytes()), encoding=encoding)
        if mode == "wb":
            return self.fs.open_output_stream(self.location)
        raise ValueError(f"{self}: mode {mode!r} is not supported on an object store")

    def upload(self, local: Path) -> None:
        """Copy a finished local file to this key (one whole-object write)."""
        pafs.copy_files(str(local), self.location, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)  # fmt: skip

    def replace(self, target: ObjectPath) -> ObjectPath:
        """Move to ``target`` (copy then delete: readers see the object at one key or the other, or both)."""
        self.fs.move(self.location, target.location)
        return target

    rename = replace


StorePath = Path | ObjectPath


def as_path(root: str | Path | ObjectPath) -> StorePath:
    """A local :class:`Path` or an :class:`ObjectPath`, whichever ``root`` names."""
    if isinstance(root, (Path, ObjectPath)):
        return root
    text = str(root)
    if is_uri(text):
        return ObjectPath(text)
    return Path(text.removeprefix("file://"))


def probe_writable(root: ObjectPath) -> None:
    """Write and delete one small object under ``root``; ObjectStoreError (one line) when that fails: no
    endpoint, bad credentials, no bucket or no permission, found before any work starts."""
    probe = root / f".proteoflow-write-check-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except (OSError, pa.ArrowException) as exc:
        raise ObjectStoreError(f"cannot write ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:239] + "…"


def native(path: StorePath) -> str:
    """The path as its own file system names it (``bucket/key`` on an object store)."""
    return path.location if isinstance(path, ObjectPath) else str(path)


def read_table(path: StorePath, **kwargs: Any) -> pa.Table:
    """``pyarrow.parquet.read_table`` for a local or object-store path."""
    if isinstance(path, ObjectPath):
        return pq.read_table(path.location, filesystem=path.fs, **kwargs)
    return pq.read_table(path, **kwargs)


def parquet_file(path: StorePath) -> pq.ParquetFile:
    """``pyarrow.parquet.ParquetFile`` (footer, row groups) for a local or object-store path."""
    if isinstance(path, ObjectPath):
        return pq.ParquetFile(path.open("rb"))
    return pq.ParquetFile(path)


def dataset(paths: list[StorePath], **kwargs: Any) -> ds.Dataset:
    """A pyarrow dataset over files that all live on one file system (local, or one bucket)."""
    remote = [p for p in paths if isinstance(p, ObjectPath)]
    if remote:
        return ds.dataset([p.location for p in remote], filesystem=remote[0].fs, **kwargs)
    return ds.dataset([str(p) for p in paths], **kwargs)


def _duckdb_filesystem(scheme: str, fs: pafs.FileSystem) -> Any:
    """pyarrow's file system as the fsspec one DuckDB accepts, answering for ``scheme://`` paths."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    prefix = f"{scheme}://"

    class _Wrapper(ArrowFSWrapper):
        protocol = (scheme,)

        @classmethod
        def _strip_protocol(cls, path: Any) -> str:
            return str(path).removeprefix(prefix).rstrip("/")

    return _Wrapper(fs)


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that reads ``s3://`` (and ``gs://``) files through pyarrow's file system.

    DuckDB's own httpfs extension cannot be installed everywhere (no network); a registered Python file
    system does the same job. Extension auto-loading is off so DuckDB never tries to fetch httpfs for these
    paths; nothing is registered until this process has opened an object-store path."""
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})  # fmt: skip
    for scheme, fs in _SCHEME_FS.items():
        con.register_filesystem(_duckdb_filesystem(scheme, fs))
    return con
