"""Handlers for every Klaviyo operation the sandbox implements, keyed by OpenAPI operation id."""

from __future__ import annotations

from klaviyo_pipelines.sandbox.operations import (
    accounts,
    bulk_import,
    events,
    lists,
    metrics,
    profiles,
    subscriptions,
)
from klaviyo_pipelines.sandbox.operations.common import Ctx, Handler

HANDLERS: dict[str, Handler] = {
    **accounts.HANDLERS,
    **profiles.HANDLERS,
    **lists.HANDLERS,
    **bulk_import.HANDLERS,
    **events.HANDLERS,
    **metrics.HANDLERS,
    **subscriptions.HANDLERS,
}

__all__ = ["HANDLERS", "Ctx", "Handler"]
