"""List membership: Remove Profile's rows must be out of its list, and an Engage audience's list
must hold no one the warehouse does not (`extra_member`). Lists are read 100 members a page,
with each member's identifiers, so rows are matched to members without a profile lookup."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from klaviyo_pipelines.actions.engage import configured_lists
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import check_sync
from klaviyo_pipelines.verify.context import Verification
from klaviyo_pipelines.verify.delivered import (
    CHUNK,
    chunks,
    delivered_rows,
    rebuild,
)
from klaviyo_pipelines.verify.report import Drift, VerifyReport
from klaviyo_pipelines.warehouse.audiences import remembered_list

IDENTIFIERS = ("email", "phone_number", "external_id")  # a profile is found by the first one
ENGAGE = ("add_profile_to_list", "remove_profile_from_list")
MAX_IDS = 1_000  # profile ids one list removal takes


@dataclass(frozen=True)
class Member:
    id: str
    identity: frozenset[tuple[str, str]]  # (identifier, value as Klaviyo compares it)


def match(name: str, value: str) -> str:
    """How Klaviyo compares an identifier: emails in any case, the others exactly."""
    return value.lower() if name == "email" else value


def identity(values: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset(
        (name, match(name, str(values[name]))) for name in IDENTIFIERS if values.get(name)
    )


class MemberPages:
    """Each list's members, read once per verification."""

    def __init__(self, client: KlaviyoClient) -> None:
        self.client = client
        self._members: dict[str, list[Member]] = {}

    def members(self, list_id: str) -> list[Member]:
        if list_id not in self._members:
            params = {"fields[profile]": ",".join(IDENTIFIERS), "page[size]": CHUNK}
            self._members[list_id] = [
                Member(str(profile["id"]), identity(profile.get("attributes") or {}))
                for profile in self.client.paginate(f"/api/lists/{list_id}/profiles", params)
            ]
        return self._members[list_id]

    def ids(self, list_id: str) -> set[str]:
        return {member.id for member in self.members(list_id)}


def audience_list(ctx: Verification, audience: str) -> tuple[str, bool] | None:
    """The audience's list and whether the sync owns it (a list configured in `settings.lists`
    may hold other people); None when the audience never got one. Reads only: unlike a run,
    verification never looks a list up by name nor creates one."""
    configured = configured_lists(ctx.sync, ctx.config.path)
    if audience in configured:
        return configured[audience], False
    found = remembered_list(ctx.wh, ctx.sync.model, audience)
    return (found.list_id, True) if found else None


def check_removed(ctx: Verification, report: VerifyReport, chosen: list[str]) -> list[str]:
    """Remove Profile: no delivered row's profile is a member of the list."""
    members = MemberPages(ctx.client).members(ctx.action.list_id)  # type: ignore[attr-defined]
    drifted: list[str] = []
    for rows in chunks(delivered_rows(ctx.wh, ctx.sync.name, chosen), CHUNK):
        for row in rows:
            if (item := rebuild(ctx.action, row, report)) is None:
                continue
            wanted = identity(item.item)
            still = [m for m in members if m.identity & wanted]
            drifts = [Drift(row.key, "still_a_member", "list", None, m.id) for m in still[:1]]
            if report.row(drifts):
                drifted.append(row.key)
    return drifted


def check_extra_members(ctx: Verification, report: VerifyReport, chosen: list[str]) -> list[str]:
    """Remove Profile from List: the members of each audience's list that no Engage sync of
    the model holds as a member now. Its counts are list members, not rows: what it sent
    (deletions) has left the delivery state. `repair` takes the extra members out of the
    list, where the sync owns it."""
    held = _held(ctx)
    pages = MemberPages(ctx.client)
    for audience in sorted(held):
        found = audience_list(ctx, audience)
        if found is None:
            continue
        list_id, owned = found
        if not owned:
            report.unchecked[
                f"list {list_id} of audience {audience!r} is configured, so it "
                "may hold other people: its extra members are not checked"
            ] += 1
            continue
        extra = []
        for member in pages.members(list_id):
            drifts = []
            if not member.identity & held[audience]:
                key = json.dumps([audience, member.id], separators=(",", ":"))
                drifts = [Drift(key, "extra_member", "list", None, _shown(member))]
                extra.append(member.id)
            report.row(drifts)
        if ctx.repair and extra:
            for chunk in chunks(extra, MAX_IDS):
                body = {"data": [{"type": "profile", "id": pid} for pid in chunk]}
                ctx.client.delete(f"/api/lists/{list_id}/relationships/profiles", body)
            report.repaired += len(extra)
    return []


def _held(ctx: Verification) -> dict[str, frozenset[tuple[str, str]]]:
    """Per audience, the identifiers of its members as the model's Engage syncs hold them: both
    syncs' delivery state, so a member one of them has not seen yet is never taken for extra.
    An audience neither holds anyone of (it may never have run) is not checked."""
    held: dict[str, set[tuple[str, str]]] = {}
    for name, sync in ctx.config.syncs.items():
        if sync.model != ctx.sync.model or sync.action not in ENGAGE:
            continue
        action = ctx.action if name == ctx.sync.name else check_sync(ctx.config, name, ctx.wh)
        for row in delivered_rows(ctx.wh, name):
            try:
                item = action.prepare(row.change()).item
            except InvalidRow:
                continue  # never sent, so in no list
            values = item.get("attributes", item)  # Add: a profile; Remove: its identifiers
            held.setdefault(row.partition or "", set()).update(identity(values))
    return {audience: frozenset(ids) for audience, ids in held.items()}


def _shown(member: Member) -> str:
    """The member as a person would look them up: an identifier, else the profile id."""
    for name in IDENTIFIERS:
        value = next((v for n, v in member.identity if n == name), None)
        if value:
            return value
    return member.id
