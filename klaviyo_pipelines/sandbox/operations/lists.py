"""List operations: find (by name), get, create, read members, add and remove members."""

from __future__ import annotations

from klaviyo_pipelines.sandbox.errors import ApiError, error_object
from klaviyo_pipelines.sandbox.filters import parse_filter
from klaviyo_pipelines.sandbox.messages import ApiResponse
from klaviyo_pipelines.sandbox.operations.common import Ctx, compare, render_profile, sort_param
from klaviyo_pipelines.sandbox.pagination import page_request, paginate
from klaviyo_pipelines.sandbox.resources import identifier, list_resource
from klaviyo_pipelines.sandbox.state import KList


def get_lists(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    raw_filter = ctx.request.param("filter")
    exprs = parse_filter(raw_filter, ctx.op.filters) if raw_filter is not None else []
    sort = sort_param(ctx)
    with ctx.state.lock:
        lists: list[KList] = list(ctx.state.lists.values())
        for expr in exprs:
            if expr.field in ("name", "id"):
                wanted = set(expr.values)
                lists = [k for k in lists if getattr(k, expr.field) in wanted]
            else:
                lists = [k for k in lists if compare(expr.op, getattr(k, expr.field), expr.value)]
        if sort is not None:
            field, descending = sort
            lists.sort(key=lambda k: (getattr(k, field), k.id), reverse=descending)
        chunk, links = paginate(lists, page, ctx.base_url, ctx.request)
        data = [list_resource(k, ctx.base_url) for k in chunk]
    return ApiResponse(200, {"data": data, "links": links})


def get_list(ctx: Ctx) -> ApiResponse:
    with ctx.state.lock:
        resource = list_resource(ctx.state.get_list(ctx.params["id"]), ctx.base_url)
    return ApiResponse(200, {"data": resource, "links": {"self": resource["links"]["self"]}})


def create_list(ctx: Ctx) -> ApiResponse:
    attrs = ctx.body["data"]["attributes"]
    klist = ctx.state.create_list(attrs["name"], attrs.get("opt_in_process"))
    resource = list_resource(klist, ctx.base_url)
    return ApiResponse(201, {"data": resource, "links": {"self": resource["links"]["self"]}})


def _members(ctx: Ctx) -> list[str]:
    """Member profile ids in join order, filtered by the request's ``filter``. Caller holds lock."""
    state = ctx.state
    state.get_list(ctx.params["id"])
    joined = state.memberships[ctx.params["id"]]
    raw_filter = ctx.request.param("filter")
    members = list(joined)
    for expr in parse_filter(raw_filter, ctx.op.filters) if raw_filter is not None else []:
        if expr.field in ("email", "phone_number"):
            owners = {state.owner_of(expr.field, v) for v in expr.values}
            members = [m for m in members if m in owners]
        elif expr.field == "joined_group_at":
            members = [m for m in members if compare(expr.op, joined[m], expr.value)]
        else:  # push_token, _kx: nothing of the kind exists in the sandbox
            members = []
    sort = sort_param(ctx)
    if sort is not None and sort[1]:
        members.reverse()
    return members


def get_profiles_for_list(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    with ctx.state.lock:
        chunk, links = paginate(_members(ctx), page, ctx.base_url, ctx.request)
        data = [
            render_profile(ctx, ctx.state.profiles[i]) for i in chunk if i in ctx.state.profiles
        ]
    return ApiResponse(200, {"data": data, "links": links})


def get_profile_ids_for_list(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    with ctx.state.lock:
        chunk, links = paginate(_members(ctx), page, ctx.base_url, ctx.request)
    return ApiResponse(200, {"data": [identifier("profile", i) for i in chunk], "links": links})


def _profile_ids(ctx: Ctx) -> list[str]:
    """Ids from a relationship body; unknown profiles are a 400 pointing at each bad entry."""
    ids = [entry["id"] for entry in ctx.body["data"]]
    unknown = [
        error_object(400, "invalid", f"Profile {pid} does not exist.", pointer=f"/data/{i}/id")
        for i, pid in enumerate(ids)
        if pid not in ctx.state.profiles
    ]
    if unknown:
        raise ApiError(400, unknown[:10])
    return ids


def add_profiles_to_list(ctx: Ctx) -> ApiResponse:
    with ctx.state.lock:
        ctx.state.get_list(ctx.params["id"])
        ctx.state.add_members(ctx.params["id"], _profile_ids(ctx))
    return ApiResponse(204)


def remove_profiles_from_list(ctx: Ctx) -> ApiResponse:
    with ctx.state.lock:
        ctx.state.get_list(ctx.params["id"])
        ctx.state.remove_members(ctx.params["id"], _profile_ids(ctx))
    return ApiResponse(204)


HANDLERS = {
    "get_lists": get_lists,
    "get_list": get_list,
    "create_list": create_list,
    "get_profiles_for_list": get_profiles_for_list,
    "get_profile_ids_for_list": get_profile_ids_for_list,
    "add_profiles_to_list": add_profiles_to_list,
    "remove_profiles_from_list": remove_profiles_from_list,
}
