"""The warehouse connection: one SQLAlchemy engine plus the few dialect differences we need.

Only identifiers we quote ourselves and bound parameters ever reach SQL text; the user's model
SQL is the one piece of SQL we run as given, since it is the user's own query.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from klaviyo_pipelines.config import ModelSpec
from klaviyo_pipelines.warehouse.dialects import WarehouseDialect, dialect_class, dialect_for
from klaviyo_pipelines.warehouse.errors import warehouse_step

# DuckDB settings for our connections; the same keys in the warehouse URL's query override them
# (`duckdb:///w.duckdb?memory_limit=4GB`). Our tables are sets read back in key order, so
# DuckDB need not keep rows in insertion order, which lets it write in parallel and without
# buffering. A sync shares its machine with Dagster: DuckDB's own default memory limit (80% of
# RAM) let a 10M-row change set reach 3 GB. At 512 MB it spills to disk: a 10M-row change set
# peaks at ~690 MB RSS instead of ~1.35 GB at 1 GB, for about 1.6x its time (bench/).
# Checkpoints come when the file is closed (after every use but a delivery's; a delivery lets
# go when it waits, and after DUCKDB_HOLD_SECONDS at most), not each time 16 MB of log piled
# up, DuckDB's default: a delivery commits 10,000 rows of state at a time, and at DuckDB's
# default a million-profile sync ran 6% and 32% slower in two paired runs (bench/delivery.py).
DUCKDB_SETTINGS = {
    "preserve_insertion_order": False,
    "memory_limit": "512MB",
    "checkpoint_threshold": "1GB",
}
# How long a DuckDB connection waits for another process (a sensor tick, a run) to release the
# file before failing: every use holds it for one statement or one batch's transaction, a
# delivery for DUCKDB_HOLD_SECONDS at most at a time.
DUCKDB_FILE_WAIT_SECONDS = 60.0
# While a run delivers, one idle connection keeps the DuckDB file open in our process between
# its transactions, so each transaction joins the open database (~1 ms) instead of opening the
# file (~18 ms, three times a page). The hold is let go whenever the run has waited for Klaviyo
# `delivery.LET_GO_AFTER_SECONDS`, and after this long at most, so that other processes still
# get their turns (they wait up to DUCKDB_FILE_WAIT_SECONDS). Not shorter: letting go closes
# the database, which checkpoints it, rewriting the state table's last row group; at 1 s, a
# million-row first sync spent 18 of its 67 s on its main thread closing and reopening.
DUCKDB_HOLD_SECONDS = 10.0
# A colon that SQLAlchemy's text() would read as a bind parameter, and ours (config.py binds
# each `${VAR}` of a model's SQL as `:kp_env_<n>`).
_COLON = re.compile(r"(?<![:\w\\]):(?=\w)(\w*)")
_ENV_PARAM = re.compile(r":kp_env_\d+\Z")
_CREATE_ATTEMPTS = 6  # ~1.6 s of waiting for a racing first run to commit its DDL


def _file_held_by_another_process(exc: BaseException) -> bool:
    return "Could not set lock on file" in str(exc)


_wait_for_duckdb_file = retry(
    retry=retry_if_exception(_file_held_by_another_process),
    wait=wait_random_exponential(multiplier=0.05, max=1.0),
    stop=stop_after_delay(DUCKDB_FILE_WAIT_SECONDS),
    reraise=True,
)


class Warehouse:
    """A SQLAlchemy engine and the schema where snapshots, delivery state and the ledger live."""

    def __init__(self, url: str, state_schema: str = "klaviyo_sync") -> None:
        self.url = url
        self.state_schema = state_schema
        dialect_class(url)  # UnsupportedWarehouse before any driver is imported
        # DuckDB allows one writing process per file: release it between uses so that Dagster
        # run workers, the CLI and the UI can take turns.
        kwargs: dict[str, Any] = (
            {"poolclass": NullPool, "connect_args": {"config": dict(DUCKDB_SETTINGS)}}
            if url.startswith("duckdb")
            else {"pool_pre_ping": True}
        )
        self.engine: Engine = sa.create_engine(url, **kwargs)
        self.sql: WarehouseDialect = dialect_for(self.engine)
        self.dialect = self.sql.name  # "mysql" for MariaDB too
        # The warehouse as messages name it: the URL with its password masked.
        self.name = self.engine.url.render_as_string(hide_password=True)
        self._holders = 0  # deliveries inside `holding_file` (Dagster may run several in threads)
        self._hold: Any = None  # the idle DBAPI connection that keeps the file open
        self._held_since = 0.0
        self._hold_guard = threading.Lock()
        if self.dialect == "duckdb":
            # Another process holding the file (a sensor reading it while a run writes) is a
            # matter of a moment: wait for it rather than fail the run or the tick.
            @sa.event.listens_for(self.engine, "do_connect")
            def _connect_when_free(dialect, _record, cargs, cparams):  # type: ignore[no-untyped-def]
                connect = _wait_for_duckdb_file(dialect.connect)
                with self._hold_guard:
                    if self._holders and self._hold is None:
                        self._hold, self._held_since = connect(*cargs, **cparams), time.monotonic()
                return connect(*cargs, **cparams)

            @sa.event.listens_for(self.engine, "checkin")
            def _let_go_when_held_long(_dbapi_connection, _record):  # type: ignore[no-untyped-def]
                if time.monotonic() - self._held_since > DUCKDB_HOLD_SECONDS:
                    self.let_go()

    def __repr__(self) -> str:
        return f"Warehouse({self.name!r})"

    def dispose(self) -> None:
        self.let_go()
        self.engine.dispose()

    @contextmanager
    def holding_file(self) -> Iterator[None]:
        """Keep a DuckDB file open between the block's transactions (see DUCKDB_HOLD_SECONDS);
        call `let_go` before waiting on anything else. Other dialects pool their connections."""
        database = self.engine.url.database
        if self.dialect != "duckdb" or not database or database.startswith(":memory:"):
            yield
            return
        with self._hold_guard:
            self._holders += 1
        try:
            yield
        finally:
            with self._hold_guard:
                self._holders -= 1
                last = not self._holders
            if last:
                self.let_go()

    def let_go(self) -> None:
        """Close the hold: other processes may open the file until our next transaction."""
        with self._hold_guard:
            hold, self._hold = self._hold, None
        if hold is not None:
            hold.close()

    @contextmanager
    def begin(self, step: str) -> Iterator[Connection]:
        """A transaction whose database errors become a WarehouseError naming `step`."""
        with warehouse_step(self.name, step), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self, step: str) -> Iterator[Connection]:
        """A connection whose database errors become a WarehouseError naming `step`."""
        with warehouse_step(self.name, step), self.engine.connect() as conn:
            yield conn

    def quote(self, name: str) -> str:
        return self.sql.quote(name)

    def fit(self, name: str) -> str:
        """One of our table names, within the engine's identifier limit: a name too long
        keeps its start and gains a hash of the whole, so two long names never collide
        (PostgreSQL cuts at 63 bytes, and two syncs sharing 56 characters shared tables;
        SQLAlchemy holds DuckDB to PostgreSQL's limit too)."""
        limit = min(self.sql.max_identifier_length, self.engine.dialect.max_identifier_length)
        if len(name.encode()) <= limit:
            return name
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        head = name.encode()[: limit - len(digest) - 1].decode(errors="ignore")
        return f"{head}_{digest}"

    def table(self, name: str) -> str:
        """A quoted, schema-qualified name of one of our own tables."""
        return f"{self.quote(self.state_schema)}.{self.quote(self.fit(name))}"

    def scratch(self, name: str, owner: str) -> str:
        """A working table for one statement sequence of `owner` (a sync): connection-local
        where the engine has temporary tables, else a table of the state schema named for
        its owner, whom the run lock keeps to one run at a time."""
        if self.sql.session_temp_tables:
            return self.quote(name)
        return self.table(f"{name}__{hashlib.sha256(owner.encode()).hexdigest()[:12]}")

    def model_sql(self, model: ModelSpec) -> str:
        """The model's query as SQL text for SQLAlchemy: its own colons escaped (`':x'` in a
        literal is not a parameter), `${VAR}` values bound as `:kp_env_<n>` (config.py),
        and on its own lines, so a trailing `-- comment` ends where the query does."""
        if model.sql is None:
            assert model.table is not None
            return "select * from " + ".".join(self.quote(p) for p in model.table.split("."))
        sql = model.sql.strip()
        while sql.endswith(";"):
            sql = sql[:-1].rstrip()
        escaped = _COLON.sub(lambda m: m[0] if _ENV_PARAM.match(m[0]) else "\\" + m[0], sql)
        return f"\n{escaped}\n"

    def ensure_schema(self) -> None:
        """Create the state schema in its own transaction; two first runs racing to create it
        (PostgreSQL: UniqueViolation; DuckDB: write-write conflict) both go on."""
        schema = self.quote(self.state_schema)
        with warehouse_step(self.name, "create the state schema"):
            self.create_racing(
                lambda conn: conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema}")),
                lambda conn: self.state_schema in sa.inspect(conn).get_schema_names(),
            )

    def create_racing(
        self, create: Callable[[Connection], object], exists: Callable[[Connection], bool]
    ) -> None:
        """Run `create` in a transaction of its own; when it fails, another process may be
        creating the same thing: wait for it to be there, a few times, before failing."""
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    create(conn)
                return
            except sa.exc.DBAPIError:
                with self.engine.connect() as conn:
                    if exists(conn):
                        return
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * 2**attempt)

    @contextmanager
    def uncompressed(self, conn: Connection) -> Iterator[None]:
        """Write a working copy that the next run replaces without compressing it: on DuckDB,
        choosing each column's compression was half the cost of copying a model."""
        if self.dialect != "duckdb":
            yield
            return
        conn.execute(sa.text("SET force_compression = 'uncompressed'"))
        yield  # after a failure the connection is thrown away: no RESET to mask the error
        conn.execute(sa.text("RESET force_compression"))

    def table_exists(self, conn: Connection, name: str) -> bool:
        return sa.inspect(conn).has_table(self.fit(name), schema=self.state_schema)

    def columns_of_query(
        self, conn: Connection, sql: str, params: dict[str, Any] | None = None
    ) -> list[str]:
        result = conn.execute(
            sa.text(f"SELECT * FROM ({sql}) AS kp_model WHERE 1 = 0"), params or {}
        )
        return list(result.keys())

    def bulk_insert(
        self, conn: Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Insert many rows fast: COPY on PostgreSQL, a registered pandas frame on DuckDB.

        `table` is an already quoted name. Values are passed as data, never formatted into SQL.
        """
        rows = list(rows)
        if not rows:
            return
        column_list = ", ".join(self.quote(c) for c in columns)
        raw = conn.connection.driver_connection
        if self.dialect == "postgresql":
            with (
                raw.cursor() as cursor,
                cursor.copy(f"COPY {table} ({column_list}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        elif self.dialect == "duckdb":
            import pandas as pd

            frame = pd.DataFrame.from_records(rows, columns=list(columns))
            view = "kp_bulk_rows"
            raw.register(view, frame)
            try:
                raw.execute(f"INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {view}")
            finally:
                raw.unregister(view)
        else:
            placeholders = ", ".join(f":p{i}" for i in range(len(columns)))
            conn.execute(
                sa.text(f"INSERT INTO {table} ({column_list}) VALUES ({placeholders})"),
                [{f"p{i}": value for i, value in enumerate(row)} for row in rows],
            )
