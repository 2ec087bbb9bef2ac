"""One sync run and one verification against the sandbox, as the verify tests drive them."""

from __future__ import annotations

from typing import Any

from klaviyo_pipelines.config import Config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.verify import VerifyReport, verify_sync
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines_tests.conftest import TEST_API_KEY


def sync(
    config: Config, wh: Warehouse, sandbox: Sandbox, name: str, audience: str | None = None
) -> SyncReport:
    """Snapshot the sync's model (one audience's part of it, if given), then run the sync."""
    take_snapshot(wh, config.models[config.syncs[name].model], config.path, partition=audience)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.2) as client:
        return run_sync(config, name, wh, client, partition=audience)


def verify(
    config: Config, wh: Warehouse, sandbox: Sandbox, name: str, **options: Any
) -> VerifyReport:
    """Verify every delivered row of the sync unless `sample` says otherwise."""
    options.setdefault("sample", None)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.2) as client:
        return verify_sync(config, name, wh, client, **options)
