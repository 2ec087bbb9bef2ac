"""Unsubscribe Profile: withdraw the rows' profiles' marketing consent (email and/or SMS).

`POST /api/profile-subscription-bulk-delete-jobs`, up to 100 profiles a request (see
`consent.py` for grouping and outcomes). An email gets `email.marketing` UNSUBSCRIBED; a phone
(E.164, read with `country_code`) gets both `sms.marketing` and `sms.transactional`.

With a `list_id` (setting or column) Klaviyo unsubscribes the profiles from that list, and, by
its own warning, profiles that are not in that list are unsubscribed globally. Without one they
are unsubscribed from all marketing on those channels. A row with a bad email or phone is
rejected whole with the reason, never silently skipped, and a batch whose rows were all
rejected sends nothing and reports every row rejected (Segment reported them all delivered).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from klaviyo_pipelines.actions.consent import ConsentAction
from klaviyo_pipelines.actions.lookup import Identifiers
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.klaviyo.endpoints import UNSUBSCRIBE

UNSUBSCRIBED = {"consent": "UNSUBSCRIBED"}


class UnsubscribeProfile(ConsentAction):
    info = ACTIONS["unsubscribe_profile"]
    job_type = "profile-subscription-bulk-delete-job"
    path = "/api/profile-subscription-bulk-delete-jobs"
    job_endpoint = UNSUBSCRIBE

    def subscriptions(
        self, identifiers: Identifiers, values: Mapping[str, Any], group: Mapping[str, Any]
    ) -> dict[str, Any]:
        subscriptions: dict[str, Any] = {}
        if identifiers.email:
            subscriptions["email"] = {"marketing": UNSUBSCRIBED}
        if identifiers.phone_number:
            subscriptions["sms"] = {"marketing": UNSUBSCRIBED, "transactional": UNSUBSCRIBED}
        return subscriptions


ACTION = UnsubscribeProfile
