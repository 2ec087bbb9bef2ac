"""Dagster resources: the warehouse engine and the Klaviyo API, configured from the YAML file.

The API key, and a warehouse URL from an environment variable, reach Dagster only as an
`EnvVar`, so the UI and the run config show the variable's name, never its value; inside a
step, where the values are resolved, the resources' repr and str mask them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
import sqlalchemy as sa

from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.warehouse.engine import Warehouse

# httpx logs every URL at INFO, query string included: profile lookups carry emails there.
logging.getLogger("httpx").setLevel(logging.WARNING)


DEFAULT_RESOURCE_PREFIX = "klaviyo_"


@dataclass(frozen=True)
class ResourceKeys:
    """Our resources' keys: prefixed, so merged into a user's project (who often has a
    `warehouse` of their own) they never clash."""

    warehouse: str
    api: str

    @classmethod
    def with_prefix(cls, prefix: str = DEFAULT_RESOURCE_PREFIX) -> ResourceKeys:
        return cls(warehouse=f"{prefix}warehouse", api=f"{prefix}api")


class WarehouseResource(dg.ConfigurableResource):
    """The user's warehouse (any SQLAlchemy URL) and the schema our tables live in."""

    url: str
    state_schema: str = "klaviyo_sync"

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Inside a step the URL is resolved from its EnvVar: show it without its password."""
        for name, value in super().__repr_args__():
            yield name, _without_password(value) if name == "url" else value

    def open(self) -> Warehouse:
        return Warehouse(self.url, self.state_schema)


class KlaviyoApiResource(dg.ConfigurableResource):
    """Klaviyo's REST API: one client, with its rate limiter, per step."""

    api_key: str
    base_url: str = "https://a.klaviyo.com"
    revision: str = "2026-07-15"
    timeout_seconds: float = 30.0
    max_attempts: int = 6

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Inside a step the key is resolved from its EnvVar: never show it (repr and str)."""
        for name, value in super().__repr_args__():
            yield name, "********" if name == "api_key" else value

    @contextmanager
    def client(self) -> Iterator[KlaviyoClient]:
        with KlaviyoClient(
            self.api_key,
            base_url=self.base_url,
            revision=self.revision,
            timeout=self.timeout_seconds,
            max_attempts=self.max_attempts,
        ) as client:
            yield client


def _without_password(url: str) -> str:
    if isinstance(url, dg.EnvVar):
        return url  # the variable's name, not yet its value
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return "********"
