"""Upsert Profile and Add Profile To List (Engage): each delivered row's profile, found by its
identifier 100 rows a request, compared field by field with the payload the row makes, and
its membership of the list the row was added to."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from klaviyo_pipelines.actions.lookup import filter_expressions
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.verify.context import Verification
from klaviyo_pipelines.verify.delivered import CHUNK, DeliveredRow, chunks, delivered_rows, rebuild
from klaviyo_pipelines.verify.lists import IDENTIFIERS, MemberPages, audience_list, match
from klaviyo_pipelines.verify.report import Drift, VerifyReport


def check_profiles(ctx: Verification, report: VerifyReport, chosen: list[str]) -> list[str]:
    members = MemberPages(ctx.client)
    drifted: list[str] = []
    for rows in chunks(delivered_rows(ctx.wh, ctx.sync.name, chosen), CHUNK):
        expected: dict[str, dict[str, Any]] = {}
        lists: dict[str, str | None] = {}
        for row in rows:
            if (item := rebuild(ctx.action, row, report)) is not None:
                expected[row.key] = item.item["attributes"]
                lists[row.key] = _list_of(ctx, row)
        found = find_profiles(ctx.client, expected)
        for key, attributes in expected.items():
            profile = found.get(key)
            drifts = compare_fields(key, attributes, profile)
            list_id = lists[key]
            if profile is not None and list_id and str(profile["id"]) not in members.ids(list_id):
                drifts.append(Drift(key, "not_a_member", "list"))
            if report.row(drifts):
                drifted.append(key)
    return drifted


def _list_of(ctx: Verification, row: DeliveredRow) -> str | None:
    """The list the row joined: Upsert's `list_id`, an audience's own list for Engage."""
    if ctx.sync.action == "add_profile_to_list":
        found = audience_list(ctx, row.partition or "")
        return found[0] if found else None
    list_id = getattr(ctx.action, "list_id", None)
    return None if not list_id or list_id.startswith("<") else list_id  # `<...>`: not found yet


def find_profiles(
    client: KlaviyoClient,
    expected: Mapping[str, Mapping[str, Any]],
    params: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Each row's Klaviyo profile, found by its first identifier (email, phone, external id),
    100 a request through `GET /api/profiles?filter=any(...)`. Rows naming one person (a
    member of two audiences) share the lookup."""
    by_field: dict[str, dict[str, list[str]]] = {name: {} for name in IDENTIFIERS}
    for key, attributes in expected.items():
        for name in IDENTIFIERS:
            if attributes.get(name):
                by_field[name].setdefault(match(name, attributes[name]), []).append(key)
                break
    found: dict[str, dict] = {}
    for name, wanted in by_field.items():
        for expression in filter_expressions(name, sorted(wanted)):
            query = {"filter": expression, "page[size]": CHUNK, **(params or {})}
            for profile in client.paginate("/api/profiles", query):
                value = (profile.get("attributes") or {}).get(name)
                if isinstance(value, str):
                    found.update(dict.fromkeys(wanted.get(match(name, value), []), profile))
    return found


def compare_fields(key: str, expected: dict[str, Any], profile: dict | None) -> list[Drift]:
    if profile is None:
        return [Drift(key, "missing")]
    actual = profile.get("attributes") or {}
    drifts = []
    for name, value in expected.items():
        if isinstance(value, dict):  # location, properties: each key the row set
            held = actual.get(name) or {}
            for sub, sub_value in value.items():
                if not _same(sub_value, held.get(sub)):
                    drifts.append(
                        Drift(key, "different", f"{name}.{sub}", sub_value, held.get(sub))
                    )
        elif not _same(value, actual.get(name)):
            drifts.append(Drift(key, "different", name, value, actual.get(name)))
    return drifts


def _same(sent: Any, held: Any) -> bool:
    if isinstance(sent, str) and isinstance(held, str):
        return sent == held or (sent.lower() == held.lower() and "@" in sent)  # emails: any case
    if isinstance(sent, int | float) and isinstance(held, int | float):
        return math.isclose(sent, held, rel_tol=1e-9, abs_tol=1e-9)
    return json.dumps(sent, sort_keys=True, default=str) == json.dumps(
        held, sort_keys=True, default=str
    )
