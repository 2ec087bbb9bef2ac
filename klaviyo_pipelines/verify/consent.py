"""Subscribe / Unsubscribe Profile: the channel consent each delivered row set, read from its
profile's `subscriptions` (`GET /api/profiles?additional-fields[profile]=subscriptions`, 100 rows
a request)."""

from __future__ import annotations

from typing import Any

from klaviyo_pipelines.verify.context import Verification
from klaviyo_pipelines.verify.delivered import CHUNK, chunks, delivered_rows, rebuild
from klaviyo_pipelines.verify.profiles import find_profiles
from klaviyo_pipelines.verify.report import Drift, VerifyReport

WITH_CONSENT = {"additional-fields[profile]": "subscriptions"}
IN_A_LIST = (
    "unsubscribed in a list: Klaviyo records that as the list's suppression, not as the "
    "channel's consent, so it is not read back"
)


def check_consent(ctx: Verification, report: VerifyReport, chosen: list[str]) -> list[str]:
    unsubscribing = ctx.sync.action == "unsubscribe_profile"
    drifted: list[str] = []
    for rows in chunks(delivered_rows(ctx.wh, ctx.sync.name, chosen), CHUNK):
        expected: dict[str, dict[str, Any]] = {}
        for row in rows:
            if (item := rebuild(ctx.action, row, report)) is None:
                continue
            if unsubscribing and item.item.get("list_id"):
                report.unchecked[IN_A_LIST] += 1
                continue
            expected[row.key] = item.item["profile"]["attributes"]
        found = find_profiles(ctx.client, expected, WITH_CONSENT)
        for key, attributes in expected.items():
            if report.row(_compare(key, attributes["subscriptions"], found.get(key))):
                drifted.append(key)
    return drifted


def _compare(key: str, wanted: dict[str, Any], profile: dict | None) -> list[Drift]:
    """`consent_changed` per channel (`email.marketing`, `sms.marketing`, ...) whose consent is
    not the one the row set."""
    if profile is None:
        return [Drift(key, "missing")]
    held = (profile.get("attributes") or {}).get("subscriptions") or {}
    drifts = []
    for channel, kinds in wanted.items():
        for kind, params in kinds.items():
            consent = ((held.get(channel) or {}).get(kind) or {}).get("consent")
            if consent != params["consent"]:
                field = f"{channel}.{kind}"
                drifts.append(Drift(key, "consent_changed", field, params["consent"], consent))
    return drifts
