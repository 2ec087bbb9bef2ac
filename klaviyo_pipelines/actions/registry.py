"""Which Klaviyo (Actions) actions exist and which change kinds each accepts.

The change kinds follow the RETL table of the Klaviyo (Actions) destination documentation:
an action only ever sees the kinds listed here, and a config asking for another is refused
before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from importlib.util import find_spec


class ChangeKind(StrEnum):
    """How a row differs from what was last delivered for a sync."""

    ADDED = "added"
    UPDATED = "updated"
    DELETED = "deleted"


# Each read row names its kind: a dict lookup costs 20 ns, `ChangeKind(name)` 450.
KIND_BY_NAME = {kind.value: kind for kind in ChangeKind}


@dataclass(frozen=True)
class ActionInfo:
    name: str
    title: str
    allowed_kinds: frozenset[ChangeKind]

    @property
    def module(self) -> str:
        """Each action lives in `klaviyo_pipelines.actions.<name>`, exporting `ACTION`."""
        return f"klaviyo_pipelines.actions.{self.name}"

    @property
    def implemented(self) -> bool:
        return find_spec(self.module) is not None


_A, _U, _D = ChangeKind.ADDED, ChangeKind.UPDATED, ChangeKind.DELETED

ACTIONS: dict[str, ActionInfo] = {
    info.name: info
    for info in (
        ActionInfo("upsert_profile", "Upsert Profile", frozenset({_A, _U})),
        ActionInfo("track_event", "Track Event", frozenset({_A})),
        ActionInfo("order_completed", "Order Completed", frozenset({_A})),
        ActionInfo("remove_profile", "Remove Profile", frozenset({_A, _D})),
        ActionInfo("subscribe_profile", "Subscribe Profile", frozenset({_A, _D})),
        ActionInfo("unsubscribe_profile", "Unsubscribe Profile", frozenset({_A, _D})),
        # Engage: an audience's members entering (added) and leaving (deleted) its model.
        ActionInfo("add_profile_to_list", "Add Profile To List (Engage)", frozenset({_A})),
        ActionInfo(
            "remove_profile_from_list", "Remove Profile from List (Engage)", frozenset({_D})
        ),
    )
}
