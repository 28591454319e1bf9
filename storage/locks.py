"""Coordination between writers of one store, on a local disk or a shared file system, from one host or many.

Two mechanisms, both plain files under ``locks/`` and ``leases/`` created with ``O_CREAT | O_EXCL`` (atomic
on local and network file systems). An object store has no exclusive create that pyarrow can ask for, so
there a lock is taken by *write, then list*: each contender writes its own ``<name>.lock.<token>`` object,
then lists them all, and keeps the lock only when its own is the only one (else it deletes its object and
waits a random while). With read-after-write listing (S3, GCS and SeaweedFS all give it) two contenders
can never both see only their own: whoever lists second sees the first's object.

- :class:`StoreLock`: a short critical section (a commit that must see everything committed before it). A
  holder that died is detected (dead pid on this host) or outlives ``stale_s``, and its lock is broken.
- :class:`Lease`: a compute run's claim on the sequences of its plan, renewed by a heartbeat thread. Other
  runs skip claimed sequences while the lease is live; a crashed holder's claim lapses after ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from storage.layout import Store, _pid_alive, write_bytes_atomic
from storage.objects import ObjectPath, StorePath

LOCK_STALE_S = 120.0  # a commit never holds the lock this long; a holder that did is presumed dead
LEASE_TTL_S = 60.0
HEARTBEAT_S = LEASE_TTL_S / 4


class LockTimeout(Exception):
    """Another writer held the lock for longer than we were willing to wait; the message says who."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lock or lease: host, process and an id unique to this holder."""

    host: str
    pid: int
    token: str

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    def dead(self) -> bool:
        """Certainly dead: a process of this host that no longer exists (other hosts: never certain)."""
        return self.host == socket.gethostname() and not _pid_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _read_json(path: StorePath) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # gone (an object store may say so only as a failed read), or half-written
        return None


class StoreLock:
    """An advisory lock named ``name`` in the store; use as a context manager around a short commit."""

    def __init__(
        self, store: Store, name: str, timeout_s: float = 600.0, stale_s: float = LOCK_STALE_S
    ) -> None:
        self.path = store.root / "locks" / f"{name}.lock"
        self.timeout_s, self.stale_s = timeout_s, stale_s
        self.owner = Owner.me()
        self._object: ObjectPath | None = None  # the object that holds the lock on an object store
        self._renew = threading.Event()
        self._keeper: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            if isinstance(self.path, ObjectPath):
                if self._acquire_object():
                    return
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"{self.path.name} held by another writer for over {self.timeout_s:.0f} s"
                    )
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)
                continue
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._break_if_stale()
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"{self.path.name} held by {holder} for over {self.timeout_s:.0f} s"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({**asdict(self.owner), "acquired": time.time()}, fh)
            return

    def _acquire_object(self) -> bool:
        """One try of write-then-list on an object store; True when the lock is ours. Staleness is judged by
        the server's clock (the objects' modification times), never by the clocks of other hosts."""
        mine = self.path.with_name(f"{self.path.name}.{self.owner.token}")
        try:
            mine.write_bytes(json.dumps({**asdict(self.owner), "acquired": time.time()}).encode())
            others = [p for p in self.path.parent.glob(f"{self.path.name}.*") if p != mine]
            if not others:
                self._object = mine
                self._renew.clear()
                self._keeper = threading.Thread(
                    target=self._keep, args=(mine,), name=f"lock-{mine.name}", daemon=True
                )
                self._keeper.start()
                return True
            now = mine.stat().st_mtime
        finally:
            if self._object is not mine:
                mine.unlink(missing_ok=True)  # lost the race, or the listing failed: leave nothing behind
        for other in others:  # a holder silent for stale_s is presumed dead (no pid check across hosts)
            try:
                if now - other.stat().st_mtime > self.stale_s:
                    other.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        return False

    def _break_if_stale(self) -> str:
        """Remove the lock file when its holder is dead or it is older than ``stale_s``; say who holds it."""
        data = _read_json(self.path)
        if data is None:
            return "a writer that is just starting"
        holder = Owner(data["host"], int(data["pid"]), data["token"])
        if holder.dead() or time.time() - float(data.get("acquired", 0)) > self.stale_s:
            with contextlib.suppress(FileNotFoundError):
                # Only remove the file we judged: a new holder's file has another token.
                if (_read_json(self.path) or {}).get("token") == holder.token:
                    self.path.unlink()
        return holder.describe()

    def _keep(self, mine: ObjectPath) -> None:
        """Rewrite the lock object's time while it is held: a commit that uploads gigabytes under the lock
        outlives ``stale_s`` without being taken for a dead holder's (no pid can be checked across hosts)."""
        while not self._renew.wait(self.stale_s / 4):
            with contextlib.suppress(OSError):
                if not mine.exists():  # broken by another writer after renewals failed: never re-create it
                    return
                mine.write_bytes(json.dumps({**asdict(self.owner), "acquired": time.time()}).encode())

    def release(self) -> None:
        if self._object is not None:
            self._renew.set()
            if self._keeper is not None:
                self._keeper.join()  # no renewal may land after the delete (a renewal is one small request)
            self._object.unlink(missing_ok=True)
            self._object = None
            return
        if (_read_json(self.path) or {}).get("token") == self.owner.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class LeaseInfo:
    """A live or lapsed claim: whose, for which run and weights, valid until when (epoch seconds)."""

    run_id: str
    model_sha: str
    owner: Owner
    expires: float

    def live(self, now: float | None = None) -> bool:
        return not self.owner.dead() and (now or time.time()) < self.expires


class Lease:
    """A run's claim on its planned sequences for one model's weights, kept alive by a heartbeat thread."""

    def __init__(self, store: Store, run_id: str, model_sha: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.path = store.root / "leases" / model_sha / f"{run_id}.json"
        self.run_id, self.model_sha, self.ttl_s = run_id, model_sha, ttl_s
        self.owner = Owner.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        info = {"run_id": self.run_id, "model_sha": self.model_sha, "owner": asdict(self.owner),
                "expires": time.time() + self.ttl_s}  # fmt: skip
        write_bytes_atomic(self.path, json.dumps(info).encode())

    def held(self) -> bool:
        """Still ours and unexpired (a lapsed lease may have been taken over by another run)."""
        data = _read_json(self.path)
        return bool(data) and data["owner"]["token"] == self.owner.token and time.time() < data["expires"]

    def start(self) -> Lease:
        self._write()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        interval = min(HEARTBEAT_S, self.ttl_s / 4)
        while not self._stop.wait(interval):
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (_read_json(self.path) or {}).get("owner", {}).get("token") == self.owner.token:
            self.path.unlink(missing_ok=True)


def leases(store: Store, model_sha: str) -> list[LeaseInfo]:
    """Every lease file for these weights (live or lapsed)."""
    found = []
    for path in sorted((store.root / "leases" / model_sha).glob("*.json")):
        data = _read_json(path)
        if data:
            owner = Owner(**data["owner"])
            found.append(LeaseInfo(data["run_id"], data["model_sha"], owner, float(data["expires"])))
    return found
