"""Verify: read Klaviyo back and compare it with what each sync delivered.

Every run records what Klaviyo confirmed, but Klaviyo and the warehouse drift apart for
reasons no run sees (an edit in Klaviyo's UI, a merged or deleted profile, a list emptied by
hand, a flow unsubscribing people). Verification rebuilds each delivered row's payload from the
delivery state (`row_json`, the row as last delivered), reads Klaviyo back through its read
endpoints only, and reports what differs. `repair` forgets the drifted rows' delivery, so the
next sync sends them again, and takes extra members out of the lists a sync owns; without it
nothing is written. One module per kind of check:

- `profiles`: Upsert Profile, Add Profile To List (fields, list membership);
- `lists`: Remove Profile (rows out of the list), Remove Profile from List (extra members);
- `consent`: Subscribe / Unsubscribe Profile (channel consent);
- `events`: Track Event, Order Completed (count per metric and day).
"""

from __future__ import annotations

import math

from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.config import Config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.endpoints import EVENTS_READ, LISTS_READ, PROFILES, EndpointClass
from klaviyo_pipelines.runner import check_sync
from klaviyo_pipelines.verify.consent import check_consent
from klaviyo_pipelines.verify.context import Check, Verification
from klaviyo_pipelines.verify.delivered import choose, delivered_keys, forget_delivery
from klaviyo_pipelines.verify.events import PAGE, check_events
from klaviyo_pipelines.verify.lists import check_extra_members, check_removed
from klaviyo_pipelines.verify.profiles import check_profiles
from klaviyo_pipelines.verify.report import DEFAULT_SAMPLE, Drift, VerifyReport
from klaviyo_pipelines.warehouse.engine import Warehouse

__all__ = ["DEFAULT_SAMPLE", "Drift", "VerifyReport", "estimated_seconds", "verify_sync"]

CHECKS: dict[str, tuple[Check, EndpointClass, int]] = {
    # action: (its check, the read endpoint it mostly spends, rows (or events) a request)
    "upsert_profile": (check_profiles, PROFILES, 100),
    "add_profile_to_list": (check_profiles, PROFILES, 100),
    "remove_profile": (check_removed, LISTS_READ, 100),
    "remove_profile_from_list": (check_extra_members, LISTS_READ, 100),
    "subscribe_profile": (check_consent, PROFILES, 100),
    "unsubscribe_profile": (check_consent, PROFILES, 100),
    "track_event": (check_events, EVENTS_READ, PAGE),
    "order_completed": (check_events, EVENTS_READ, PAGE),
}
# Actions whose delivery state holds what they sent only for `added` rows: a delivered
# deletion leaves the state, and rows of a kind the sync does not act on are acknowledged.
SENT_WHEN_ADDED = frozenset({"remove_profile", "subscribe_profile", "unsubscribe_profile"})
NOT_SENT = (
    "acknowledged, never sent: this sync acts on deleted rows only, and a delivered deletion "
    "leaves the delivery state, so what it sent cannot be read back"
)


def verify_sync(
    config: Config,
    sync_name: str,
    wh: Warehouse,
    client: KlaviyoClient,
    *,
    sample: int | None = 1000,
    seed: int = 0,
    repair: bool = False,
) -> VerifyReport:
    """Compare up to `sample` delivered rows (None: all), chosen reproducibly by `seed`."""
    sync = config.syncs[sync_name]
    report = VerifyReport(sync=sync.name, action=sync.action)
    keys = delivered_keys(wh, sync.name)
    report.delivered = len(keys)
    chosen = choose(keys, sample, seed)
    if sync.action not in CHECKS:
        report.unchecked[f"{sync.action} cannot be verified"] = len(chosen)
        return report
    if sync.action in SENT_WHEN_ADDED and ChangeKind.ADDED not in sync.on:
        report.unchecked[NOT_SENT] = len(chosen)
        return report
    action = check_sync(config, sync_name, wh)
    check = CHECKS[sync.action][0]
    drifted = check(Verification(config, sync, action, wh, client, repair), report, chosen)
    if repair and drifted:
        report.repaired += forget_delivery(wh, sync.name, drifted)
    return report


def estimated_seconds(config: Config, wh: Warehouse, sync: str) -> float:
    """How long reading back every delivered row takes within the read quota it spends (for
    lists, a lower bound: one page per 100 members, whatever the rows)."""
    _, endpoint, per_request = CHECKS.get(config.syncs[sync].action, (None, PROFILES, 100))
    requests = math.ceil(len(delivered_keys(wh, sync)) / per_request)
    return requests / (endpoint.steady_per_minute / 60)
