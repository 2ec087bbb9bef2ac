"""Picks the implementation of the action a sync names."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from klaviyo_pipelines.actions.base import Action
from klaviyo_pipelines.actions.upsert_profile import UpsertProfile
from klaviyo_pipelines.config import SyncSpec

_IMPLEMENTATIONS: dict[str, Callable[[SyncSpec, Sequence[str], str], Action]] = {
    "upsert_profile": UpsertProfile,
}


def build_action(sync: SyncSpec, columns: Sequence[str], config_path: str) -> Action:
    """The sync's action, with its mapping and settings checked against the model's columns."""
    return _IMPLEMENTATIONS[sync.action](sync, columns, config_path)
