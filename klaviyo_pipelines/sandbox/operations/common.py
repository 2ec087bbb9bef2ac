"""What every operation handler receives, and the profile checks several of them share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from klaviyo_pipelines.sandbox.errors import ApiError, error_object, invalid
from klaviyo_pipelines.sandbox.jobs import JobWorker
from klaviyo_pipelines.sandbox.messages import ApiRequest, ApiResponse
from klaviyo_pipelines.sandbox.profile_rules import (
    MISSING_IDENTIFIER,
    check_identifiers,
    has_identifier,
)
from klaviyo_pipelines.sandbox.resources import profile_resource
from klaviyo_pipelines.sandbox.schemas import Operation
from klaviyo_pipelines.sandbox.state import LOCATION_FIELDS, SCALAR_FIELDS, Profile, SandboxState


@dataclass
class Ctx:
    """A validated request, ready for its operation: body already passed the official schema."""

    request: ApiRequest
    op: Operation
    params: dict[str, str]
    body: Any
    state: SandboxState
    worker: JobWorker
    base_url: str
    job_delay: float


Handler = Callable[[Ctx], ApiResponse]

WRITABLE_PROFILE_FIELDS = (*SCALAR_FIELDS, "location", "properties")


def writable_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes the sandbox stores (``_kx``, ``anonymous_id`` and the like are dropped)."""
    out = {k: attrs[k] for k in WRITABLE_PROFILE_FIELDS if k in attrs}
    location = out.get("location")
    if isinstance(location, dict):
        out["location"] = {k: v for k, v in location.items() if k in LOCATION_FIELDS}
    return out


def _refusal(state: SandboxState, attrs: dict[str, Any], require_identifier: bool) -> str | None:
    """A missing identifier or the ``reject_profile`` hook's reason, else None."""
    if require_identifier and not has_identifier(attrs):
        return MISSING_IDENTIFIER
    hook = state.reject_profile
    if hook is not None:
        reason = hook(dict(attrs))
        if reason:
            return str(reason)
    return None


def profile_problem(
    state: SandboxState, attrs: dict[str, Any], require_identifier: bool
) -> tuple[str, str] | None:
    """First reason Klaviyo would refuse these attributes, as (field or "", detail), else None."""
    violations = check_identifiers(attrs)
    if violations:
        return violations[0].field, violations[0].detail
    reason = _refusal(state, attrs, require_identifier)
    return ("", reason) if reason else None


def check_profile(
    state: SandboxState, attrs: dict[str, Any], pointer: str, require_identifier: bool
) -> None:
    """Raise a 400 with a pointer to the refused attribute (``pointer`` is the attributes object)."""
    violations = check_identifiers(attrs)
    if violations:
        raise ApiError(
            400,
            [
                error_object(400, "invalid", v.detail, pointer=f"{pointer}/{v.field}")
                for v in violations
            ],
        )
    reason = _refusal(state, attrs, require_identifier)
    if reason:
        raise invalid(reason, pointer=pointer)


def csv_param(ctx: Ctx, name: str) -> set[str] | None:
    raw = ctx.request.param(name)
    if not raw:
        return None
    return {part.strip().split(".")[0] for part in raw.split(",") if part.strip()}


def sort_param(ctx: Ctx) -> tuple[str, bool] | None:
    """(field, descending) from ``sort``, 400 if the operation does not declare it."""
    raw = ctx.request.param("sort")
    if raw is None:
        return None
    if not ctx.op.sorts or raw not in ctx.op.sorts:
        allowed = ", ".join(ctx.op.sorts or ()) or "none"
        raise invalid(f"Invalid sort '{raw}'. Allowed: {allowed}.", parameter="sort")
    return raw.lstrip("-"), raw.startswith("-")


def compare(op: str, left: datetime | None, right: datetime) -> bool:
    """Datetime comparison operators of Klaviyo's filter language."""
    if left is None:
        return False
    if op == "greater-than":
        return left > right
    if op == "greater-or-equal":
        return left >= right
    if op == "less-than":
        return left < right
    if op == "less-or-equal":
        return left <= right
    return left == right


def render_profile(ctx: Ctx, profile: Profile) -> dict[str, Any]:
    """A profile resource honouring ``fields[profile]`` and ``additional-fields[profile]``."""
    extra = csv_param(ctx, "additional-fields[profile]") or set()
    return profile_resource(
        profile,
        ctx.base_url,
        fields=csv_param(ctx, "fields[profile]"),
        state=ctx.state,
        with_subscriptions="subscriptions" in extra,
    )
