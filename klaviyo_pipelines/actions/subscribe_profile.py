"""Subscribe Profile: give the rows' profiles marketing consent (email and/or SMS).

`POST /api/profile-subscription-bulk-create-jobs`, up to 1,000 profiles a request (see
`consent.py` for grouping and outcomes). An email gets `email.marketing` SUBSCRIBED; a phone
(E.164, read with `country_code`) gets `sms.marketing`, and `sms.transactional` too with
`sms_transactional: true`. A row with a bad email or phone is rejected whole, even if its other
identifier is good: the row is sent as mapped or not at all, and the ledger says why.

`custom_source` defaults to `klaviyo_pipelines:<namespace>`, the sync's `namespace` or else its
name (Segment sends its own source id "-59", which means nothing outside Segment), so Klaviyo's
consent history shows which sync subscribed a profile. `consented_at` is sent only with `historical_import: true`, which
Klaviyo requires for it, and then must be set and in the past.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from klaviyo_pipelines.actions.consent import BASE_MAPPING, BASE_SETTINGS, ConsentAction
from klaviyo_pipelines.actions.lookup import Identifiers
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.actions.values import iso_datetime
from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.endpoints import SUBSCRIBE

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class SubscribeProfile(ConsentAction):
    info = ACTIONS["subscribe_profile"]
    job_type = "profile-subscription-bulk-create-job"
    path = "/api/profile-subscription-bulk-create-jobs"
    job_endpoint = SUBSCRIBE
    mapping_keys = (*BASE_MAPPING, "custom_source", "historical_import", "consented_at")
    setting_keys = BASE_SETTINGS | {"custom_source", "historical_import", "sms_transactional"}

    def __init__(self, sync: SyncSpec, columns: Sequence[str], config_path: str) -> None:
        super().__init__(sync, columns, config_path)
        self.custom_source = self.text_setting(
            "custom_source", f"klaviyo_pipelines:{sync.identity}"
        )
        self.historical_import = self.bool_setting("historical_import", False)
        self.sms_transactional = self.bool_setting("sms_transactional", False)
        historical_possible = self.historical_import or "historical_import" in self.mapping
        if historical_possible and "consented_at" not in self.mapping:
            raise ConfigError(
                config_path,
                f"syncs.{sync.name}.mapping.consented_at",
                "required with historical_import: Klaviyo needs the past time each profile "
                "consented",
            )
        if "consented_at" in self.mapping and not historical_possible:
            raise ConfigError(
                config_path,
                f"syncs.{sync.name}.mapping.consented_at",
                "Klaviyo accepts consented_at only in a historical import: set "
                "settings.historical_import: true (or map historical_import), or unmap it",
            )

    def group(self, values: Mapping[str, Any]) -> dict[str, Any]:
        source = self.column_value(values, "custom_source")
        historical = self.column_value(values, "historical_import")
        return {
            **super().group(values),
            "custom_source": str(source).strip() if source is not None else self.custom_source,
            "historical_import": (
                self.historical_import if historical is None else _boolean(historical)
            ),
        }

    def job_attributes(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "custom_source": group["custom_source"],
            "historical_import": group["historical_import"],
        }

    def subscriptions(
        self, identifiers: Identifiers, values: Mapping[str, Any], group: Mapping[str, Any]
    ) -> dict[str, Any]:
        channel: dict[str, Any] = {"consent": "SUBSCRIBED"}
        if group["historical_import"]:
            channel["consented_at"] = _consent_time(self.column_value(values, "consented_at"))
        subscriptions: dict[str, Any] = {}
        if identifiers.email:
            subscriptions["email"] = {"marketing": channel}
        if identifiers.phone_number:
            sms = {"marketing": channel}
            if self.sms_transactional:
                sms["transactional"] = channel
            subscriptions["sms"] = sms
        return subscriptions


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise InvalidRow("historical_import", f"{value!r} is not true or false")


def _consent_time(value: Any) -> str:
    """ISO-8601 UTC of a past time. Values arrive JSON-ready (`column_value`), so a warehouse
    datetime or date is already ISO text; a date means its midnight, naive means UTC."""
    if value is None:
        raise InvalidRow(
            "consented_at", "empty, but historical_import needs the time the profile consented"
        )
    text = str(value).strip()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRow("consented_at", f"{text!r} is not an ISO-8601 date-time") from None
    rendered = iso_datetime(when)
    if (when if when.tzinfo else when.replace(tzinfo=UTC)) > datetime.now(UTC):
        raise InvalidRow(
            "consented_at", f"{rendered} is in the future; Klaviyo accepts only past consent"
        )
    return rendered


ACTION = SubscribeProfile
