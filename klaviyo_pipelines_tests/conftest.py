"""Shared fixtures: real warehouses (DuckDB file, PostgreSQL database) and a running sandbox."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_SERVER = os.environ.get(
    "KLAVIYO_PIPELINES_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432"
)
MARIADB_SERVER = os.environ.get(
    "KLAVIYO_PIPELINES_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306"
)
TEST_API_KEY = "pk_test_9f8e7d6c5b4a39281706f5e4d3c2b1a0"

# Started in the background (`make test &`), the suite inherits SIGINT ignored, and so would
# every process it starts; its tests of Ctrl-C need the terminal's usual SIGINT. Set here, in
# the process that starts pytest-xdist's workers, they start with it too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _server_answers(url: str) -> str | None:
    """None when the server at `url` answers, else why not."""
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure means "no server here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


def _require(name: str, url: str) -> None:
    """Skip where the server does not answer, but fail in CI, which must never pass without it."""
    problem = _server_answers(url)
    if problem is None:
        return
    message = f"{name} at {url} does not answer ({problem})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run the {name} tests")
    pytest.skip(message)


def require_postgres() -> None:
    _require("PostgreSQL", f"{PG_SERVER}/test")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    require_postgres()
    name = f"kp_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh MariaDB database for one test's models, dropped afterwards; a test's state
    schema (another database on MySQL) is named after it: see `state_schema_for`."""
    _require("MariaDB", f"{MARIADB_SERVER}/test")
    name = f"kp_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{MARIADB_SERVER}/test")
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    try:
        yield f"{MARIADB_SERVER}/{name}"
    finally:
        with admin.begin() as conn:
            for database in (name, state_schema_for(f"{MARIADB_SERVER}/{name}")):
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{database}`"))
        admin.dispose()


@pytest.fixture
def snowflake_url() -> Iterator[str]:
    """Snowflake's SQL, run by the fakesnow emulator inside this process (a fresh database per
    test). It needs its own environment (constraints/snowflake.txt): `make test-snowflake`."""
    try:
        import fakesnow
    except ImportError as exc:
        message = f"the Snowflake emulator is not installed here ({exc}): make test-snowflake"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run the Snowflake tests")
        pytest.skip(message)
    with fakesnow.patch():
        yield "snowflake://kp@emulator/kp_test/public"


def state_schema_for(url: str) -> str:
    """The state schema a test uses: on MySQL a schema is a database, shared by the server's
    tests, so each test gets its own; elsewhere the default."""
    database = sa.engine.make_url(url).database
    return f"{database}_state" if url.startswith("mysql") else "klaviyo_sync"


@pytest.fixture(autouse=True)
def _no_persistent_dagster_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests use ephemeral Dagster instances, whatever DAGSTER_HOME the shell has."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


@pytest.fixture
def duckdb_url(tmp_path: Path) -> str:
    return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"


@pytest.fixture(params=["duckdb", "postgresql"])
def warehouse_url(request: pytest.FixtureRequest) -> str:
    """Every warehouse test runs on both the embedded default and a real server."""
    return request.getfixturevalue("duckdb_url" if request.param == "duckdb" else "postgres_url")


@pytest.fixture(params=["duckdb", "postgres", "mariadb"])
def every_warehouse_url(request: pytest.FixtureRequest) -> str:
    """The warehouse suite's engines: every one that runs here (docs/warehouses.md)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch):
    """A Klaviyo sandbox over real HTTP on loopback, with the test key exported."""
    from klaviyo_pipelines.sandbox import Sandbox

    with Sandbox(api_key=TEST_API_KEY, port=0) as running:
        monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
        monkeypatch.setenv("KLAVIYO_BASE_URL", running.url)
        yield running
