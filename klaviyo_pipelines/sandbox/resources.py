"""JSON:API renderings of sandbox objects, shaped like Klaviyo's responses.

Why: clients parse these documents (ids, job counters, import-error pointers, links), so they
follow Klaviyo's response schemas: ``type``/``id``/``attributes``/``relationships``/``links``.
"""

from __future__ import annotations

from typing import Any

from klaviyo_pipelines.sandbox.state import (
    LOCATION_FIELDS,
    SCALAR_FIELDS,
    BulkImportJob,
    Event,
    ImportErrorRecord,
    KList,
    Metric,
    Profile,
    SandboxState,
    iso,
)

SUBSCRIPTION_CHANNELS = {
    "email": ("marketing",),
    "sms": ("marketing", "transactional"),
    "whatsapp": ("marketing", "transactional"),
    "push": ("marketing",),
}


def profile_resource(
    profile: Profile,
    base_url: str,
    fields: set[str] | None = None,
    state: SandboxState | None = None,
    with_subscriptions: bool = False,
) -> dict[str, Any]:
    attrs = profile.attributes
    out: dict[str, Any] = {name: attrs.get(name) for name in SCALAR_FIELDS}
    out["created"] = iso(profile.created)
    out["updated"] = iso(profile.updated)
    out["last_event_date"] = iso(profile.last_event_date)
    location = attrs.get("location") or {}
    out["location"] = {name: location.get(name) for name in LOCATION_FIELDS}
    out["properties"] = dict(attrs.get("properties") or {})
    if with_subscriptions and state is not None:
        out["subscriptions"] = subscriptions_view(state, profile.id)
    if fields:
        out = {k: v for k, v in out.items() if k in fields}
    url = f"{base_url}/api/profiles/{profile.id}/"
    return {
        "type": "profile",
        "id": profile.id,
        "attributes": out,
        "relationships": {
            "lists": {"links": {"self": f"{url}relationships/lists/", "related": f"{url}lists/"}},
            "segments": {
                "links": {"self": f"{url}relationships/segments/", "related": f"{url}segments/"}
            },
        },
        "links": {"self": url},
    }


def subscriptions_view(state: SandboxState, profile_id: str) -> dict[str, Any]:
    """A reduced ``additional-fields[profile]=subscriptions`` block: consent per channel."""
    records = state.subscriptions.get(profile_id, {})
    view: dict[str, Any] = {}
    for channel, kinds in SUBSCRIPTION_CHANNELS.items():
        view[channel] = {}
        for kind in kinds:
            record = records.get(f"{channel}.{kind}")
            view[channel][kind] = {
                "consent": record.consent if record else "NEVER_SUBSCRIBED",
                "consent_timestamp": iso(record.consented_at or record.updated) if record else None,
                "last_updated": iso(record.updated) if record else None,
                "custom_method_detail": record.custom_source if record else None,
            }
    return view


def list_resource(klist: KList, base_url: str) -> dict[str, Any]:
    url = f"{base_url}/api/lists/{klist.id}/"
    return {
        "type": "list",
        "id": klist.id,
        "attributes": {
            "name": klist.name,
            "created": iso(klist.created),
            "updated": iso(klist.updated),
            "opt_in_process": klist.opt_in_process,
        },
        "relationships": {
            "profiles": {
                "links": {"self": f"{url}relationships/profiles/", "related": f"{url}profiles/"}
            },
        },
        "links": {"self": url},
    }


def event_resource(
    event: Event, metric: Metric, base_url: str, fields: set[str] | None = None
) -> dict[str, Any]:
    """An event as `GET /api/events` returns it: no unique_id among its attributes (Klaviyo's
    schema has none), its time as `timestamp` and `datetime`, its profile and metric related."""
    attributes: dict[str, Any] = {
        "timestamp": int(event.time.timestamp()),
        "event_properties": dict(event.properties),
        "datetime": iso(event.time),
        "uuid": event.id,
    }
    if fields:
        attributes = {k: v for k, v in attributes.items() if k in fields}
    return {
        "type": "event",
        "id": event.id,
        "attributes": attributes,
        "relationships": {
            "profile": {"data": identifier("profile", event.profile_id)},
            "metric": {"data": identifier("metric", metric.id)},
        },
        "links": {"self": f"{base_url}/api/events/{event.id}/"},
    }


def metric_resource(metric: Metric, base_url: str) -> dict[str, Any]:
    return {
        "type": "metric",
        "id": metric.id,
        "attributes": {
            "name": metric.name,
            "created": iso(metric.created),
            "updated": iso(metric.created),
            "integration": {"name": "API", "category": "API"},
        },
        "links": {"self": f"{base_url}/api/metrics/{metric.id}/"},
    }


def job_resource(job: BulkImportJob, base_url: str) -> dict[str, Any]:
    url = f"{base_url}/api/profile-bulk-import-jobs/{job.id}/"
    return {
        "type": "profile-bulk-import-job",
        "id": job.id,
        "attributes": {
            "status": job.status,
            "created_at": iso(job.created_at),
            "total_count": job.total_count,
            "completed_count": job.completed_count,
            "failed_count": job.failed_count,
            "completed_at": iso(job.completed_at),
            "expires_at": iso(job.expires_at),
            "started_at": iso(job.started_at),
        },
        "relationships": {
            "lists": {
                "data": [{"type": "list", "id": list_id} for list_id in job.list_ids],
                "links": {"self": f"{url}relationships/lists/", "related": f"{url}lists/"},
            },
            "profiles": {
                "links": {"self": f"{url}relationships/profiles/", "related": f"{url}profiles/"}
            },
            "import-errors": {"links": {"related": f"{url}import-errors/"}},
        },
        "links": {"self": url},
    }


def import_error_resource(error: ImportErrorRecord) -> dict[str, Any]:
    return {
        "type": "import-error",
        "id": error.id,
        "attributes": {
            "code": error.code,
            "title": error.title,
            "detail": error.detail,
            "source": {"pointer": error.pointer},
            "original_payload": error.original_payload,
        },
    }


def identifier(kind: str, resource_id: str) -> dict[str, str]:
    return {"type": kind, "id": resource_id}
