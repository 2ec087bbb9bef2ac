"""The warehouse engines we run on, one module each, and how a URL picks one.

An engine outside this list is refused with a message (never run on a guessed generic path):
SQL that compiles is not SQL that computes the right change set (MySQL reads `||` as OR).
"""

from __future__ import annotations

import sqlalchemy as sa

from klaviyo_pipelines.warehouse.dialects.base import WarehouseDialect
from klaviyo_pipelines.warehouse.dialects.bigquery import BigQueryDialect
from klaviyo_pipelines.warehouse.dialects.databricks import DatabricksDialect
from klaviyo_pipelines.warehouse.dialects.duckdb import DuckDBDialect
from klaviyo_pipelines.warehouse.dialects.mysql import MySQLDialect
from klaviyo_pipelines.warehouse.dialects.postgresql import PostgreSQLDialect
from klaviyo_pipelines.warehouse.dialects.redshift import RedshiftDialect
from klaviyo_pipelines.warehouse.dialects.snowflake import SnowflakeDialect

# SQLAlchemy's dialect name (the URL's scheme before `+driver`) -> our engine module.
ENGINES: dict[str, type[WarehouseDialect]] = {
    "duckdb": DuckDBDialect,
    "postgresql": PostgreSQLDialect,
    "mysql": MySQLDialect,
    "mariadb": MySQLDialect,
    "snowflake": SnowflakeDialect,
    "bigquery": BigQueryDialect,
    "redshift": RedshiftDialect,
    "databricks": DatabricksDialect,
}


class UnsupportedWarehouse(ValueError):
    """The URL names an engine we have not verified; the message lists the ones we have."""


def engine_name(url: str) -> str:
    """The engine a SQLAlchemy URL names (`mysql+pymysql://...` -> `mysql`)."""
    return sa.engine.make_url(url).get_backend_name()


def dialect_class(url: str) -> type[WarehouseDialect]:
    name = engine_name(url)
    if name not in ENGINES:
        known = ", ".join(sorted(ENGINES))
        raise UnsupportedWarehouse(
            f"the warehouse engine {name!r} is not supported (supported: {known}); "
            "see docs/warehouses.md"
        )
    return ENGINES[name]


def check_url(url: str) -> type[WarehouseDialect]:
    """The engine of `url`, its driver importable; else UnsupportedWarehouse saying what to
    install (`pip install 'klaviyo_pipelines[mysql]'`)."""
    engine = dialect_class(url)
    try:
        sa.engine.make_url(url).get_dialect().import_dbapi()
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        install = f"pip install 'klaviyo_pipelines[{engine.extra}]'" if engine.extra else ""
        raise UnsupportedWarehouse(
            f"the driver for {engine.name} is not installed ({exc}); {install or 'reinstall'}"
        ) from None
    return engine


CAVEATS = {
    "emulated": "is verified on an emulator only (fakesnow runs its SQL on DuckDB)",
    "experimental": "is experimental: its statements are parsed here, never run",
}


def level_warning(url: str) -> str | None:
    """What `validate` says of an engine not proven on a real server, or None."""
    engine = dialect_class(url)
    caveat = CAVEATS.get(engine.level)
    if caveat is None:
        return None
    return f"{engine.name} {caveat}: run `plan` and check the first syncs; see docs/warehouses.md"


def dialect_for(engine: sa.Engine) -> WarehouseDialect:
    return dialect_class(f"{engine.dialect.name}://")(engine.dialect, engine)


__all__ = [
    "ENGINES",
    "UnsupportedWarehouse",
    "WarehouseDialect",
    "check_url",
    "dialect_class",
    "dialect_for",
    "level_warning",
]
