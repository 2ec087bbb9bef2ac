"""Picks the implementation of the action a sync names: `actions/<name>.py` exports `ACTION`."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from klaviyo_pipelines.actions.base import Action
from klaviyo_pipelines.actions.registry import ACTIONS
from klaviyo_pipelines.config import SyncSpec


def build_action(sync: SyncSpec, columns: Sequence[str], config_path: str) -> Action:
    """The sync's action, with its mapping and settings checked against the model's columns."""
    module = importlib.import_module(ACTIONS[sync.action].module)
    return module.ACTION(sync, columns, config_path)
