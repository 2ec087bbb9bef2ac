"""Profile operations: get (filtered, paginated), create, update, upsert (profile-import)."""

from __future__ import annotations

from klaviyo_pipelines.sandbox.errors import invalid
from klaviyo_pipelines.sandbox.filters import FilterExpr, parse_filter
from klaviyo_pipelines.sandbox.messages import ApiResponse
from klaviyo_pipelines.sandbox.operations.common import (
    Ctx,
    check_profile,
    compare,
    render_profile,
    sort_param,
    writable_attributes,
)
from klaviyo_pipelines.sandbox.pagination import page_request, paginate
from klaviyo_pipelines.sandbox.profile_rules import IDENTIFIERS
from klaviyo_pipelines.sandbox.state import Profile, SandboxState

_ATTRIBUTES = "/data/attributes"


def select_profiles(state: SandboxState, exprs: list[FilterExpr]) -> list[Profile]:
    """Profiles matching every filter term, in id (= creation) order. Caller holds the lock."""
    ids: set[str] | None = None
    checks = []
    for expr in exprs:
        if expr.field in IDENTIFIERS or expr.field == "id":
            found: set[str] = set()
            for value in expr.values:
                owner = value if expr.field == "id" else state.owner_of(expr.field, value)
                if owner and owner in state.profiles:
                    found.add(owner)
            ids = found if ids is None else ids & found
        elif expr.field in ("created", "updated"):
            checks.append(expr)
        else:
            # _kx and suppression filters: the sandbox has no web tracking or suppressions.
            ids = set()
    if ids is None:
        candidates = list(state.profiles.values())  # dict order is id order (monotonic ULIDs)
    else:
        candidates = [state.profiles[i] for i in sorted(ids)]
    for expr in checks:
        candidates = [p for p in candidates if compare(expr.op, getattr(p, expr.field), expr.value)]
    return candidates


def _sort_profiles(profiles: list[Profile], sort: tuple[str, bool] | None) -> list[Profile]:
    if sort is None:
        return profiles
    field, descending = sort
    if field == "id":
        return list(reversed(profiles)) if descending else profiles
    if field in ("created", "updated"):
        return sorted(profiles, key=lambda p: (getattr(p, field), p.id), reverse=descending)
    if field == "email":
        return sorted(profiles, key=lambda p: ((p.email or "").lower(), p.id), reverse=descending)
    return profiles  # suppression timestamps: nothing is suppressed in the sandbox


def get_profiles(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    raw_filter = ctx.request.param("filter")
    exprs = parse_filter(raw_filter, ctx.op.filters) if raw_filter is not None else []
    sort = sort_param(ctx)
    with ctx.state.lock:
        matches = _sort_profiles(select_profiles(ctx.state, exprs), sort)
        chunk, links = paginate(matches, page, ctx.base_url, ctx.request)
        data = [render_profile(ctx, p) for p in chunk]
    return ApiResponse(200, {"data": data, "links": links})


def get_profile(ctx: Ctx) -> ApiResponse:
    with ctx.state.lock:
        profile = ctx.state.get_profile(ctx.params["id"])
        resource = render_profile(ctx, profile)
    return ApiResponse(200, {"data": resource, "links": {"self": resource["links"]["self"]}})


def create_profile(ctx: Ctx) -> ApiResponse:
    attrs = writable_attributes(ctx.body["data"]["attributes"])
    check_profile(ctx.state, attrs, _ATTRIBUTES, require_identifier=True)
    with ctx.state.lock:
        profile = ctx.state.create_profile(attrs)
        resource = render_profile(ctx, profile)
    return ApiResponse(201, {"data": resource, "links": {"self": resource["links"]["self"]}})


def update_profile(ctx: Ctx) -> ApiResponse:
    data = ctx.body["data"]
    if data["id"] != ctx.params["id"]:
        raise invalid("The id in the body does not match the id in the URL.", pointer="/data/id")
    attrs = writable_attributes(data["attributes"])
    check_profile(ctx.state, attrs, _ATTRIBUTES, require_identifier=False)
    with ctx.state.lock:
        profile = ctx.state.update_profile(ctx.params["id"], attrs, data.get("meta"))
        resource = render_profile(ctx, profile)
    return ApiResponse(200, {"data": resource, "links": {"self": resource["links"]["self"]}})


def create_or_update_profile(ctx: Ctx) -> ApiResponse:
    data = ctx.body["data"]
    profile_id = data.get("id")
    attrs = writable_attributes(data["attributes"])
    check_profile(ctx.state, attrs, _ATTRIBUTES, require_identifier=not profile_id)
    with ctx.state.lock:
        profile, created = ctx.state.upsert_profile(attrs, profile_id, data.get("meta"))
        resource = render_profile(ctx, profile)
    status = 201 if created else 200
    return ApiResponse(status, {"data": resource, "links": {"self": resource["links"]["self"]}})


HANDLERS = {
    "get_profiles": get_profiles,
    "get_profile": get_profile,
    "create_profile": create_profile,
    "update_profile": update_profile,
    "create_or_update_profile": create_or_update_profile,
}
