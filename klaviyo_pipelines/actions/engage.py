"""Engage audiences' Klaviyo lists: which list an audience syncs to, and the exit guard.

An audience's list is, in order: the one configured for it (`settings.lists`), the one
remembered from its first sync (table `audience_lists`), a list whose name is exactly the
audience key, or (for Add Profile To List only) a new list with that name. The id is then
remembered, so renaming the list in Klaviyo never leads to a second list. Segment instead
creates a list for every new audience without looking for one, so a reconnected audience gets
a duplicate.

The exit guard stops a run that would take an audience's members out of its list wholesale
(the model returned nothing, or lost most of its rows): more likely a broken model than a real
exodus. A share alone would stop 2 of 3 members leaving a small audience, so a partial exit is
guarded only when more than `min_exits_guarded` members would leave; an emptying always is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from klaviyo_pipelines.config import ConfigError, SyncSpec
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.errors import PermanentError
from klaviyo_pipelines.warehouse.audiences import (
    MembershipChange,
    RememberedList,
    remember_list,
    remembered_list,
)
from klaviyo_pipelines.warehouse.engine import Warehouse

DEFAULT_MAX_EXIT_SHARE = 0.5
DEFAULT_MIN_EXITS_GUARDED = 10


class ListMissing(PermanentError):
    """The list remembered (or configured) for an audience no longer exists in Klaviyo."""


class ExitGuardTripped(PermanentError):
    """A run would remove more of an audience's members than its guard allows."""

    def __init__(self, message: str, path: str) -> None:
        self.message = message
        super().__init__(method="DELETE", path=path, reason=message)

    def _format(self) -> str:
        return self.message


def configured_lists(sync: SyncSpec, config_path: str) -> dict[str, str]:
    """`settings.lists`: audience key -> Klaviyo list id, overriding the list found by name."""
    raw = sync.settings.get("lists") or {}
    key = f"syncs.{sync.name}.settings.lists"
    if not isinstance(raw, Mapping):
        raise ConfigError(config_path, key, "must map audience keys to Klaviyo list ids")
    lists = {}
    for audience, list_id in raw.items():
        if (
            not isinstance(list_id, str | int)
            or isinstance(list_id, bool)
            or not str(list_id).strip()
        ):
            raise ConfigError(config_path, f"{key}.{audience}", f"not a list id: {list_id!r}")
        lists[str(audience)] = str(list_id).strip()
    return lists


def max_exit_share(sync: SyncSpec, config_path: str) -> float:
    value = sync.settings.get("max_exit_share", DEFAULT_MAX_EXIT_SHARE)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.max_exit_share",
            f"must be a number from 0 to 1 (1 turns the exit guard off), got {value!r}",
        )
    return float(value)


def min_exits_guarded(sync: SyncSpec, config_path: str) -> int:
    """`settings.min_exits_guarded`: exits a run may make whatever their share."""
    value = sync.settings.get("min_exits_guarded", DEFAULT_MIN_EXITS_GUARDED)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(
            config_path,
            f"syncs.{sync.name}.settings.min_exits_guarded",
            f"must be a whole number of members, 0 or more, got {value!r}",
        )
    return value


def name_filter(name: str) -> str:
    """`equals(name,["..."])`: Klaviyo accepts the name filter in list form only."""
    return 'equals(name,["' + name.replace("\\", "\\\\").replace('"', '\\"') + '"])'


def lists_named(client: KlaviyoClient, name: str) -> list[dict[str, Any]]:
    """Every list named exactly `name`, oldest first, reading every page."""
    params = {"filter": name_filter(name), "sort": "created"}
    found = client.paginate("/api/lists", params)
    return [item for item in found if (item.get("attributes") or {}).get("name") == name]


def audience_list(
    wh: Warehouse,
    client: KlaviyoClient,
    sync: SyncSpec,
    audience: str,
    configured: Mapping[str, str],
    *,
    create: bool,
    setting: str | None = None,
) -> RememberedList | None:
    """The audience's list (see the module docstring); None when there is none and `create`
    is false. A configured or remembered list that no longer exists raises ListMissing.
    Upsert Profile's `list_name` uses it too, the name as the audience; `setting` is then the
    config key a ListMissing tells the user to set."""
    setting = setting or f"syncs.{sync.name}.settings.lists.{audience}"
    if audience in configured:
        found = RememberedList(configured[audience], None)
        where = f"configured for audience {audience!r} in syncs.{sync.name}.settings.lists"
    elif (found := remembered_list(wh, sync.model, audience)) is not None:
        where = (
            f"remembered for audience {audience!r} of model {sync.model!r} (table audience_lists)"
        )
    else:
        named = lists_named(client, audience)
        if named:
            found = RememberedList(str(named[0]["id"]), audience)
        elif create:
            created = client.post(
                "/api/lists", json={"data": {"type": "list", "attributes": {"name": audience}}}
            )
            found = RememberedList(str(created["data"]["id"]), audience)
        else:
            return None
        remember_list(wh, sync.model, audience, found.list_id, found.list_name)
        return found
    try:
        resource = client.get(f"/api/lists/{found.list_id}")["data"]
    except PermanentError as exc:
        if exc.status != 404:
            raise
        raise ListMissing(
            method="GET",
            path=f"/api/lists/{found.list_id}",
            status=404,
            hint=(
                f"List {found.list_id} ({where}) no longer exists in Klaviyo. Its members were "
                f"synced to it, so a new list would miss them: set {setting} to the list to "
                "use, or delete the audience's row from audience_lists and its rows from the "
                "syncs' state to start it afresh"
            ),
        ) from None
    current = RememberedList(found.list_id, (resource.get("attributes") or {}).get("name"))
    if current != found:  # configured, or renamed in Klaviyo: the UI shows the current name
        remember_list(wh, sync.model, audience, current.list_id, current.list_name)
    return current


def check_exits(
    sync: SyncSpec,
    audience: str,
    change: MembershipChange,
    share_allowed: float,
    path: str,
    min_guarded: int = DEFAULT_MIN_EXITS_GUARDED,
) -> None:
    """Raise ExitGuardTripped when more than `min_guarded` members would leave and that is
    more than `share_allowed` of them, or when the audience would be emptied."""
    before = change.before
    if not change.exited or before <= 0:
        return
    settings = f"syncs.{sync.name}.settings"
    if change.members == 0:
        what = f"its model returns 0 members where the last sync had {before}"
        change_it = f"raise {settings}.max_exit_share to 1 (which turns the guard off)"
    elif change.exited <= min_guarded or change.exited / before <= share_allowed:
        return
    else:
        what = (
            f"{change.exited} of its {before} members would leave ({change.exited / before:.0%}, "
            f"more than max_exit_share {share_allowed:.0%} and more than min_exits_guarded "
            f"{min_guarded})"
        )
        change_it = (
            f"raise {settings}.max_exit_share (1 turns the guard off) or "
            f"{settings}.min_exits_guarded (exits up to that count are never stopped)"
        )
    raise ExitGuardTripped(
        f"Exit guard: nobody was removed from the list of audience {audience!r}: {what}. If the "
        "model is right, run again with the run config `override_exit_guard: true` (Dagster "
        f"launchpad, ops.klaviyo__{sync.name}.config) or {change_it}; otherwise fix the model "
        "and nothing will be removed.",
        path,
    )
