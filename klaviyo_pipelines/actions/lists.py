"""Klaviyo lists a sync sends to: checked before any row is sent, so a typo in a list id
fails the run with one message instead of rejecting every row."""

from __future__ import annotations

from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.errors import PermanentError


def list_exists(client: KlaviyoClient, list_id: str) -> bool:
    try:
        client.get(f"/api/lists/{list_id}")
    except PermanentError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def require_list(client: KlaviyoClient, list_id: str, setting: str) -> None:
    """Raise a 404 PermanentError naming the config key when the list does not exist."""
    if not list_exists(client, list_id):
        raise PermanentError(
            method="GET",
            path=f"/api/lists/{list_id}",
            status=404,
            hint=f"List {list_id!r} ({setting}) does not exist in this Klaviyo account",
        )
