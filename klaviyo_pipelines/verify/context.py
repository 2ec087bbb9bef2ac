"""What each kind of check receives: the sync, its action, the warehouse, the API, and whether
it may repair."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from klaviyo_pipelines.actions.base import Action
from klaviyo_pipelines.config import Config, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.verify.report import VerifyReport
from klaviyo_pipelines.warehouse.engine import Warehouse


@dataclass(frozen=True)
class Verification:
    config: Config
    sync: SyncSpec
    action: Action
    wh: Warehouse
    client: KlaviyoClient
    repair: bool


# A check compares the chosen delivered rows with Klaviyo and returns the keys of the rows
# whose delivery a repair forgets.
Check = Callable[[Verification, VerifyReport, list[str]], list[str]]
