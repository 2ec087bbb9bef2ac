"""Klaviyo endpoint classes: the batch limits and per-account rate limits each one obeys.

Both the client (to pace itself) and the sandbox (to enforce limits) read this table, so the
two can never disagree. Figures are from Klaviyo's OpenAPI (`x-klaviyo-ratelimit`, revision
2026-07-15), listed in docs/operations.md (Rate limits), which a test keeps equal to this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KB = 1024
MB = 1024 * 1024


@dataclass(frozen=True)
class EndpointClass:
    """A family of Klaviyo operations that share one rate-limit bucket and one set of limits."""

    name: str
    burst_per_second: int
    steady_per_minute: int
    max_items: int | None = None
    max_bytes: int | None = None
    max_item_bytes: int | None = None


PROFILES = EndpointClass("profiles", 75, 750, max_items=1, max_bytes=100 * KB)
PROFILE_BULK_IMPORT = EndpointClass(
    "profile_bulk_import", 10, 150, max_items=10_000, max_bytes=5 * MB, max_item_bytes=100 * KB
)
# Watching import jobs (GET a job, the job list): Klaviyo's own quota per operation, not the
# import POST's, so polls never take an import's place; nor do a job's errors take a poll's.
PROFILE_BULK_IMPORT_JOBS = EndpointClass("profile_bulk_import_jobs", 10, 150)
PROFILE_BULK_IMPORT_ERRORS = EndpointClass("profile_bulk_import_errors", 10, 150)
EVENTS = EndpointClass("events", 350, 3500, max_items=1, max_bytes=5 * MB)
EVENT_BULK_CREATE = EndpointClass("event_bulk_create", 10, 150, max_items=1_000, max_bytes=5 * MB)
# Reading events and metrics back (`verify`): quotas of their own, never a sync's writes.
EVENTS_READ = EndpointClass("events_read", 350, 3500)
METRICS = EndpointClass("metrics", 10, 150)
LISTS_READ = EndpointClass("lists_read", 75, 750)
LISTS_WRITE = EndpointClass("lists_write", 10, 150)
LIST_MEMBERSHIP = EndpointClass("list_membership", 10, 150, max_items=1_000)
SUBSCRIBE = EndpointClass("subscribe", 75, 750, max_items=1_000)
UNSUBSCRIBE = EndpointClass("unsubscribe", 75, 750, max_items=100)
SUPPRESSION = EndpointClass("suppression", 75, 750, max_items=100)
DATA_PRIVACY = EndpointClass("data_privacy", 3, 60, max_items=1)
ACCOUNTS = EndpointClass("accounts", 1, 15)

# (method, path regex) -> class. First match wins; paths are relative to the base URL.
_ROUTES: tuple[tuple[str, re.Pattern[str], EndpointClass], ...] = tuple(
    (method, re.compile(pattern), cls)
    for method, pattern, cls in (
        (
            "GET",
            r"^/api/profile-bulk-import-jobs/[^/]+/import-errors/?$",
            PROFILE_BULK_IMPORT_ERRORS,
        ),
        ("GET", r"^/api/profile-bulk-import-jobs(/.*)?$", PROFILE_BULK_IMPORT_JOBS),
        ("*", r"^/api/profile-bulk-import-jobs(/.*)?$", PROFILE_BULK_IMPORT),
        ("*", r"^/api/profiles/?$", PROFILES),
        ("*", r"^/api/profiles/[^/]+/?$", PROFILES),
        ("*", r"^/api/profile-import/?$", PROFILES),
        ("GET", r"^/api/events/?$", EVENTS_READ),
        ("*", r"^/api/events/?$", EVENTS),
        ("GET", r"^/api/metrics(/.*)?$", METRICS),
        ("*", r"^/api/event-bulk-create-jobs/?$", EVENT_BULK_CREATE),
        ("GET", r"^/api/lists(/.*)?$", LISTS_READ),
        ("*", r"^/api/lists/[^/]+/relationships/profiles/?$", LIST_MEMBERSHIP),
        ("*", r"^/api/lists(/.*)?$", LISTS_WRITE),
        ("*", r"^/api/profile-subscription-bulk-create-jobs/?$", SUBSCRIBE),
        ("*", r"^/api/profile-subscription-bulk-delete-jobs/?$", UNSUBSCRIBE),
        ("*", r"^/api/profile-suppression-bulk-(create|delete)-jobs(/.*)?$", SUPPRESSION),
        ("*", r"^/api/data-privacy-deletion-jobs/?$", DATA_PRIVACY),
        ("*", r"^/api/accounts(/.*)?$", ACCOUNTS),
    )
)

DEFAULT = EndpointClass("default", 10, 150)


def endpoint_class(method: str, path: str) -> EndpointClass:
    """Return the endpoint class for a request, `DEFAULT` (the conservative M tier) if unknown."""
    method = method.upper()
    for route_method, pattern, cls in _ROUTES:
        if route_method in ("*", method) and pattern.match(path):
            return cls
    return DEFAULT
