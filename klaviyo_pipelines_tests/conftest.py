"""Shared fixtures: real warehouses (DuckDB file, PostgreSQL database) and a running sandbox."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_SERVER = os.environ.get(
    "KLAVIYO_PIPELINES_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432"
)
TEST_API_KEY = "pk_test_9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def _postgres_answers() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        engine = sa.create_engine(f"{PG_SERVER}/test", connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure means "no server here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


def require_postgres() -> None:
    """Skip where no PostgreSQL answers, but fail in CI, which must never pass without it."""
    problem = _postgres_answers()
    if problem is None:
        return
    message = f"PostgreSQL at {PG_SERVER} does not answer ({problem})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run the PostgreSQL tests")
    pytest.skip(message)


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


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch):
    """A Klaviyo sandbox over real HTTP on loopback, with the test key exported."""
    from klaviyo_pipelines.sandbox import Sandbox

    with Sandbox(api_key=TEST_API_KEY, port=0) as running:
        monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
        monkeypatch.setenv("KLAVIYO_BASE_URL", running.url)
        yield running
