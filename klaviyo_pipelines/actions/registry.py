"""Which Klaviyo (Actions) actions exist and which change kinds each accepts.

The change kinds follow the RETL table of the Klaviyo (Actions) destination documentation:
an action only ever sees the kinds listed here, and a config asking for another is refused
before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ChangeKind(StrEnum):
    """How a row differs from what was last delivered for a sync."""

    ADDED = "added"
    UPDATED = "updated"
    DELETED = "deleted"


@dataclass(frozen=True)
class ActionInfo:
    name: str
    title: str
    allowed_kinds: frozenset[ChangeKind]
    implemented: bool


_A, _U, _D = ChangeKind.ADDED, ChangeKind.UPDATED, ChangeKind.DELETED

ACTIONS: dict[str, ActionInfo] = {
    info.name: info
    for info in (
        ActionInfo("upsert_profile", "Upsert Profile", frozenset({_A, _U}), True),
        ActionInfo("track_event", "Track Event", frozenset({_A}), False),
        ActionInfo("order_completed", "Order Completed", frozenset({_A}), False),
        ActionInfo("remove_profile", "Remove Profile", frozenset({_A, _D}), False),
        ActionInfo("subscribe_profile", "Subscribe Profile", frozenset({_A, _D}), False),
        ActionInfo("unsubscribe_profile", "Unsubscribe Profile", frozenset({_A, _D}), False),
        ActionInfo("add_profile_to_list", "Add Profile To List (Engage)", frozenset({_A}), False),
        ActionInfo(
            "remove_profile_from_list", "Remove Profile from List (Engage)", frozenset({_A}), False
        ),
    )
}
