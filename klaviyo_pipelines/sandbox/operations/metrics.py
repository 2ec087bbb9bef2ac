"""Reading events back: ``GET /api/events`` (filtered by metric, profile and time, up to 1,000 a
page) and ``GET /api/metrics`` (the metric ids those filters take).

Why as Klaviyo has them: `verify` counts a sync's events per metric and day through exactly
these reads, and the filters are checked against the operation's declared ``x-klaviyo-filters``,
so a filter Klaviyo would refuse (``unique_id`` is not one) is refused here too.
"""

from __future__ import annotations

from klaviyo_pipelines.sandbox.errors import invalid
from klaviyo_pipelines.sandbox.filters import parse_filter
from klaviyo_pipelines.sandbox.messages import ApiResponse
from klaviyo_pipelines.sandbox.operations.common import Ctx, compare, csv_param, sort_param
from klaviyo_pipelines.sandbox.pagination import page_request, paginate
from klaviyo_pipelines.sandbox.resources import event_resource, metric_resource
from klaviyo_pipelines.sandbox.state import Event


def get_events(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    raw_filter = ctx.request.param("filter")
    exprs = parse_filter(raw_filter, ctx.op.filters) if raw_filter is not None else []
    sort = sort_param(ctx)
    with ctx.state.lock:
        by_id = {metric.id: metric for metric in ctx.state.metrics.values()}
        events: list[Event] = list(ctx.state.events)
        for expr in exprs:
            if expr.field == "metric_id":
                names = {by_id[v].name for v in expr.values if v in by_id}
                events = [e for e in events if e.metric in names]
            elif expr.field == "profile_id":
                events = [e for e in events if e.profile_id == expr.value]
            elif expr.field == "datetime":
                events = [e for e in events if compare(expr.op, e.time, expr.value)]
            else:  # `timestamp` (epoch seconds), `has(profile)`, `has(metric)`
                raise invalid(
                    f"The sandbox does not filter events on '{expr.field}'.", parameter="filter"
                )
        events.sort(key=lambda e: (e.time, e.id), reverse=bool(sort and sort[1]))
        chunk, links = paginate(events, page, ctx.base_url, ctx.request)
        fields = csv_param(ctx, "fields[event]")
        metrics = ctx.state.metrics
        data = [event_resource(e, metrics[e.metric], ctx.base_url, fields) for e in chunk]
    return ApiResponse(200, {"data": data, "links": links})


def get_metrics(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    raw_filter = ctx.request.param("filter")
    exprs = parse_filter(raw_filter, ctx.op.filters) if raw_filter is not None else []
    with ctx.state.lock:
        metrics = sorted(ctx.state.metrics.values(), key=lambda m: m.created)
        if any(expr.value != "API" for expr in exprs):  # every sandbox metric comes from the API
            metrics = []
        chunk, links = paginate(metrics, page, ctx.base_url, ctx.request)
        data = [metric_resource(metric, ctx.base_url) for metric in chunk]
    return ApiResponse(200, {"data": data, "links": links})


HANDLERS = {"get_events": get_events, "get_metrics": get_metrics}
