"""One run per sync at a time: a second run of the same sync is refused, so no row goes twice.

Two runs of one sync would share `changes__<sync>` (the second replaces it while the first
reads it page by page) and could both send a row before either records it delivered. So every
run holds a lock for its whole length, in up to three layers:

- in the process, a `threading.Lock` per warehouse, schema and sync (threads, Dagster's
  in-process executor);
- on PostgreSQL, a session advisory lock on a hash of the schema and the sync, held on its own
  connection outside any transaction, so the delivery transactions commit freely while it is
  held; PostgreSQL releases it when that connection ends, also when the process is killed;
- on a DuckDB file, an exclusive `flock` on `<file>.locks/<schema>.<sync>.lock`: DuckDB's
  own file lock lasts one connection, and connections are released between statements (a
  delivery's within a second, see `engine.DUCKDB_HOLD_SECONDS`) so that other processes can
  read, which would let two processes' runs interleave. The kernel drops
  the flock when the process dies.

A partitioned sync is locked per partition (each has its own change set and rows).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from klaviyo_pipelines.warehouse.engine import Warehouse

try:
    import fcntl
except ImportError:  # Windows: the process-wide lock still applies
    fcntl = None  # type: ignore[assignment]

_POLL_SECONDS = 0.05
_process_locks: dict[tuple[str, str, str], threading.Lock] = {}
_process_locks_guard = threading.Lock()


class SyncLocked(RuntimeError):
    """Another run of the same sync holds the lock; this run sent nothing and changed nothing."""

    def __init__(self, what: str, holder: str) -> None:
        self.holder = holder
        super().__init__(
            f"{what} is already running ({holder}); this run did nothing: "
            "wait for that run to end, then run again"
        )


@contextmanager
def sync_lock(
    wh: Warehouse, sync: str, partition: str | None = None, wait: float = 0.0
) -> Iterator[None]:
    """Hold the sync's lock for the block; raise SyncLocked if it is not free within `wait` s.

    A partitioned sync is locked per partition: partitions have their own change sets and
    disjoint rows, so a backfill may run them side by side.
    """
    label = f"sync {sync!r}" + (f" for partition {partition!r}" if partition else "")
    name = sync if partition is None else f"{sync}\x1f{partition}"
    deadline = time.monotonic() + wait
    with ExitStack() as stack:
        stack.enter_context(_process_lock(wh, name, label, deadline))
        if wh.dialect == "postgresql":
            stack.enter_context(_advisory_lock(wh, name, label, deadline))
        elif (database := duckdb_file(wh)) is not None:
            stem = sync if partition is None else f"{sync}.{_digest(partition)}"
            locks = database.with_name(f"{database.name}.locks")  # one folder, not dozens of files
            locks.mkdir(exist_ok=True)
            path = locks / f"{wh.state_schema}.{stem}.lock"
            stack.enter_context(_file_lock(path, label, deadline))
        yield


def _digest(text: str) -> str:
    """A file-name-safe stand-in for a partition key, which may hold any text."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def lock_id(schema: str, name: str) -> int:
    """The advisory lock key: a signed 64-bit hash of schema and sync (PostgreSQL's bigint)."""
    digest = hashlib.sha256(f"klaviyo_pipelines\x1f{schema}\x1f{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def duckdb_file(wh: Warehouse) -> Path | None:
    """The DuckDB database file, or None for another dialect or an in-memory database."""
    if wh.dialect != "duckdb":
        return None
    database = wh.engine.url.database
    if not database or database == ":memory:" or database.startswith(":memory:"):
        return None
    return Path(database).resolve()


def _warehouse_id(wh: Warehouse) -> str:
    path = duckdb_file(wh)
    return str(path) if path else wh.engine.url.render_as_string(hide_password=True)


@contextmanager
def _process_lock(wh: Warehouse, name: str, label: str, deadline: float) -> Iterator[None]:
    key = (_warehouse_id(wh), wh.state_schema, name)
    with _process_locks_guard:
        lock = _process_locks.setdefault(key, threading.Lock())
    if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise SyncLocked(label, "another run in this process")
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _advisory_lock(wh: Warehouse, name: str, label: str, deadline: float) -> Iterator[None]:
    key = {"key": lock_id(wh.state_schema, name)}
    conn: Connection = wh.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        while not conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), key).scalar():
            if time.monotonic() >= deadline:
                holder = conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND ((classid::bigint << 32) | objid::bigint) = :key LIMIT 1"
                    ),
                    key,
                ).scalar()
                where = f"PostgreSQL backend {holder}" if holder else "another session"
                raise SyncLocked(label, f"advisory lock held by {where}")
            time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            # a session that broke meanwhile has lost the lock already; never mask the run
            with suppress(sa.exc.DBAPIError):
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), key)
    finally:
        conn.close()


@contextmanager
def _file_lock(path: Path, label: str, deadline: float) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise SyncLocked(label, f"process {pid} holds {path}") from None
                time.sleep(_POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
