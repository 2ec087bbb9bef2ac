"""One run per sync at a time: a second run of the same sync is refused, so no row goes twice.

Two runs of one sync would share `changes__<sync>` (the second replaces it while the first
reads it page by page) and could both send a row before either records it delivered. So every
run holds a lock for its whole length, in up to three layers:

- in the process, a `threading.Lock` per warehouse, schema and sync (threads, Dagster's
  in-process executor);
- on PostgreSQL and MySQL/MariaDB, the engine's session lock (advisory lock, GET_LOCK) on a
  hash of the schema and the sync, held on its own connection outside any transaction, so
  the delivery transactions commit freely while it is held; the server releases it when
  that connection ends, also when the process is killed;
- on engines without one (Snowflake, BigQuery, Redshift, Databricks), a lease row in
  `run_locks` of the state schema: taken by an UPDATE that only succeeds on a free or expired
  lease (such DML on one table is serialized by those engines), renewed while the run lasts,
  cleared at its end; a killed run's lease expires after LEASE_SECONDS;
- on a DuckDB file, an exclusive `flock` on `<file>.locks/<schema>.<sync>.lock`: DuckDB's
  own file lock lasts one connection, and connections are released between statements (a
  delivery's within 10 s, see `engine.DUCKDB_HOLD_SECONDS`) so that other processes can
  read, which would let two processes' runs interleave. The kernel drops
  the flock when the process dies.

A partitioned sync is locked per partition (each has its own change set and rows).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.errors import warehouse_step
from klaviyo_pipelines.warehouse.state import create_tables, now

try:
    import fcntl
except ImportError:  # Windows: the process-wide lock still applies
    fcntl = None  # type: ignore[assignment]

_POLL_SECONDS = 0.05
LOCKS = "run_locks"
# A lease outlives its run by at most this long when the process is killed; renewed every
# third of it while the run lasts.
LEASE_SECONDS = 120.0
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
        if wh.sql.has_session_lock:
            stack.enter_context(_session_lock(wh, name, label, deadline))
        elif wh.dialect != "duckdb":
            stack.enter_context(_lease(wh, name, label, deadline))
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
    return str(path) if path else wh.name


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
def _session_lock(wh: Warehouse, name: str, label: str, deadline: float) -> Iterator[None]:
    key = lock_id(wh.state_schema, name)
    lock_name = f"{wh.state_schema}\x1f{name}"
    with warehouse_step(wh.name, f"lock of {label}"):
        conn: Connection = wh.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        with warehouse_step(wh.name, f"lock of {label}"):
            while not wh.sql.acquire_session_lock(conn, key, lock_name):
                if time.monotonic() >= deadline:
                    holder = wh.sql.lock_holder(conn, key, lock_name)
                    raise SyncLocked(label, f"lock held by {holder}")
                time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            try:
                wh.sql.release_session_lock(conn, key, lock_name)
            except sa.exc.DBAPIError:
                # A session lock outlives a pooled connection's return to the pool: never
                # give one back that may still hold it (a broken session has lost it anyway).
                conn.invalidate()
    finally:
        conn.close()


def _locks_table_def(wh: Warehouse) -> sa.Table:
    return sa.Table(
        LOCKS,
        sa.MetaData(),
        sa.Column("name", wh.sql.key_type, nullable=False),
        sa.Column("holder", wh.sql.key_type),
        sa.Column("expires_at", wh.sql.time_type),
        schema=wh.state_schema,
    )


@contextmanager
def _lease(wh: Warehouse, name: str, label: str, deadline: float) -> Iterator[None]:
    """A lease row: taken by one UPDATE that matches only a free or expired lease."""
    table = wh.table(LOCKS)
    key = f"{lock_id(wh.state_schema, name):x}"
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ts = wh.sql.cast_timestamp
    params = {"name": key, "me": me}
    with warehouse_step(wh.name, f"lock of {label}"):
        create_tables(wh, _locks_table_def(wh))
        with wh.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} (name, holder, expires_at) "
                    f"SELECT {wh.sql.cast_text(':name')}, NULL, NULL "
                    f"FROM (SELECT 1 AS one) AS z WHERE NOT EXISTS "
                    f"(SELECT 1 FROM {table} WHERE name = :name)"
                ),
                params,
            )
        take = sa.text(
            f"UPDATE {table} SET holder = :me, expires_at = {ts(':until')} WHERE name = :name "
            f"AND (holder IS NULL OR holder = :me OR expires_at < {ts(':now')})"
        )

        def renew() -> bool:
            stamp = now()
            until = stamp + timedelta(seconds=LEASE_SECONDS)
            with wh.engine.begin() as conn:
                result = conn.execute(take, {**params, "now": stamp, "until": until})
            return result.rowcount > 0

        while not renew():
            if time.monotonic() >= deadline:
                raise SyncLocked(label, f"lease in {table} held by another run")
            time.sleep(_POLL_SECONDS * 10)
    stop = threading.Event()

    def keep_renewing() -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            with suppress(sa.exc.SQLAlchemyError):
                renew()

    renewer = threading.Thread(target=keep_renewing, name=f"lease {label}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with suppress(sa.exc.SQLAlchemyError), wh.engine.begin() as conn:
            conn.execute(
                sa.text(f"UPDATE {table} SET holder = NULL WHERE name = :name AND holder = :me"),
                params,
            )


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
