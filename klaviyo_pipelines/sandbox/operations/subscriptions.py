"""Consent operations: bulk subscribe (<=1000 profiles) and bulk unsubscribe (<=100), 202 no body.

Recorded per profile and channel in ``state.subscriptions[profile_id]["email.marketing"]`` etc.
Rules emulated: each profile needs an email or phone number (or, to subscribe, a profile ``id``);
email channels need an email, SMS and WhatsApp channels a phone number (valid E.164);
``consented_at`` is allowed only with ``historical_import: true`` and then required, and must be
in the past. Unknown profiles are created. A given list must exist: subscribing adds the profiles
to it, unsubscribing removes them from it. The whole request is checked before anything changes.
Not emulated: double opt-in confirmation (consent is recorded at once), suppressions, push tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from klaviyo_pipelines.sandbox.errors import ApiError, invalid
from klaviyo_pipelines.sandbox.filters import parse_datetime
from klaviyo_pipelines.sandbox.messages import ApiResponse
from klaviyo_pipelines.sandbox.operations.common import Ctx, check_profile
from klaviyo_pipelines.sandbox.state import SandboxState, Subscription, utcnow

SUBSCRIBED = "SUBSCRIBED"
UNSUBSCRIBED = "UNSUBSCRIBED"
_PHONE_CHANNELS = ("sms", "whatsapp")


@dataclass
class _Plan:
    attributes: dict[str, Any]
    profile_id: str | None
    channels: list[tuple[str, datetime | None]]  # ("email.marketing", consented_at)


def _channels(subscriptions: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(channel key, JSON path suffix, parameters) for every non-null channel in the request."""
    found = []
    for channel, kinds in (subscriptions or {}).items():
        if not isinstance(kinds, dict):
            continue
        for kind, params in kinds.items():
            if isinstance(params, dict) and "consent" in params:
                found.append((f"{channel}.{kind}", f"{channel}/{kind}", params))
    return found


def _list_id(ctx: Ctx) -> str | None:
    relationships = ctx.body["data"].get("relationships") or {}
    data = (relationships.get("list") or {}).get("data")
    if not data:
        return None
    ctx.state.get_list(data["id"])
    return data["id"]


def _plan(
    state: SandboxState, index: int, profile: dict[str, Any], historical: bool, subscribing: bool
) -> _Plan:
    pointer = f"/data/attributes/profiles/data/{index}"
    raw = profile["attributes"]
    attrs = {k: raw[k] for k in ("email", "phone_number") if raw.get(k) is not None}
    profile_id = profile.get("id") if subscribing else None
    if not attrs and not profile_id:
        raise invalid("Either email or phone_number is required.", pointer=f"{pointer}/attributes")
    check_profile(state, attrs, f"{pointer}/attributes", require_identifier=not profile_id)
    known = state.profiles.get(profile_id) if profile_id else None
    email = attrs.get("email") or (known.email if known else None)
    phone = attrs.get("phone_number") or (known.phone_number if known else None)
    channels: list[tuple[str, datetime | None]] = []
    now = utcnow()
    for key, path, params in _channels(raw.get("subscriptions")):
        where = f"{pointer}/attributes/subscriptions/{path}"
        channel = key.split(".", 1)[0]
        if channel == "email" and not email:
            raise invalid("An email address is required for the email channel.", pointer=where)
        if channel in _PHONE_CHANNELS and not phone:
            raise invalid(f"A phone number is required for the {channel} channel.", pointer=where)
        consented_at = None
        if params.get("consented_at") is not None:
            if not historical:
                raise invalid(
                    "consented_at may only be provided when historical_import is true.",
                    pointer=f"{where}/consented_at",
                )
            consented_at = parse_datetime(params["consented_at"])
            if consented_at is None or consented_at > now:
                raise invalid("consented_at must be in the past.", pointer=f"{where}/consented_at")
        elif historical and subscribing and key != "email.open_tracking":
            raise invalid(
                "consented_at is required when historical_import is true.",
                pointer=f"{where}/consented_at",
            )
        channels.append((key, consented_at))
    try:
        state.resolve(attrs, profile_id)
    except ApiError as error:
        for entry in error.errors:
            entry["source"] = {"pointer": f"{pointer}/attributes"}
        raise
    return _Plan(attrs, profile_id, channels)


def _run(ctx: Ctx, consent: str) -> ApiResponse:
    data = ctx.body["data"]
    attributes = data["attributes"]
    historical = bool(attributes.get("historical_import"))
    subscribing = consent == SUBSCRIBED
    with ctx.state.lock:
        list_id = _list_id(ctx)
        plans = [
            _plan(ctx.state, i, profile, historical, subscribing)
            for i, profile in enumerate(attributes["profiles"]["data"])
        ]
        now = utcnow()
        touched = []
        for plan in plans:
            profile, _ = ctx.state.upsert_profile(plan.attributes, plan.profile_id)
            touched.append(profile.id)
            for channel, consented_at in plan.channels:
                ctx.state.set_consent(
                    Subscription(
                        profile_id=profile.id,
                        channel=channel,
                        consent=consent,
                        updated=now,
                        consented_at=consented_at,
                        list_id=list_id,
                        custom_source=attributes.get("custom_source"),
                        historical_import=historical,
                    )
                )
        if list_id is not None:
            if subscribing:
                ctx.state.add_members(list_id, touched)
            else:
                ctx.state.remove_members(list_id, touched)
    return ApiResponse(202)


def bulk_subscribe_profiles(ctx: Ctx) -> ApiResponse:
    return _run(ctx, SUBSCRIBED)


def bulk_unsubscribe_profiles(ctx: Ctx) -> ApiResponse:
    return _run(ctx, UNSUBSCRIBED)


HANDLERS = {
    "bulk_subscribe_profiles": bulk_subscribe_profiles,
    "bulk_unsubscribe_profiles": bulk_unsubscribe_profiles,
}
