"""Track Event and Order Completed: Klaviyo's count of events per metric and day against the
events the delivered rows make.

Klaviyo cannot find an event by its unique_id: `GET /api/events` filters on `metric_id`,
`profile_id`, `datetime` and `timestamp` only, and an event's attributes do not include it. So
each (metric, day) a sampled row has an event in is counted: `GET /api/events` filtered by the
metric's id and the day, 1,000 events a page, against the distinct (profile, unique_id) pairs
the delivered rows make that day. Fewer in Klaviyo is drift (`missing`, field `count`); more
is not, since other sources may record the same metric. Which rows of a short day lack their
event cannot be told, so a repair forgets the whole day's rows: Klaviyo drops those it already
has by unique_id when the next sync sends them again.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta
from typing import Any

from klaviyo_pipelines.actions.events import EventAction, entry_events
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.verify.context import Verification
from klaviyo_pipelines.verify.delivered import delivered_rows
from klaviyo_pipelines.verify.lists import identity
from klaviyo_pipelines.verify.report import Drift, VerifyReport

PAGE = 1_000  # GET /api/events' largest page

Day = tuple[str, str]  # (metric name, YYYY-MM-DD in UTC)


def check_events(ctx: Verification, report: VerifyReport, chosen: list[str]) -> list[str]:
    assert isinstance(ctx.action, EventAction)
    wanted = set(chosen)
    events: dict[Day, set[tuple[Any, str]]] = defaultdict(set)
    rows_of: dict[Day, set[str]] = defaultdict(set)
    days: set[Day] = set()
    for row in delivered_rows(ctx.wh, ctx.sync.name):  # every row: a day's count covers all
        try:
            entry = ctx.action.entry(row.change())
        except InvalidRow as exc:
            if row.key in wanted:
                report.unchecked[f"cannot rebuild its payload: {exc}"] += 1
            continue
        who = identity(entry["attributes"]["profile"]["data"]["attributes"])
        for event in entry_events(entry):
            attributes = event["attributes"]
            metric = attributes["metric"]["data"]["attributes"]["name"]
            # Without a mapped time Klaviyo dated the event on receipt: the day it was confirmed.
            day = (metric, attributes.get("time", "")[:10] or _day(row.recorded_at))
            events[day].add((who, attributes["unique_id"]))
            rows_of[day].add(row.key)
            if row.key in wanted:
                days.add(day)
    metric_ids = {
        (metric.get("attributes") or {}).get("name"): str(metric["id"])
        for metric in ctx.client.paginate("/api/metrics")
    }
    checked: set[str] = set()
    short: set[str] = set()
    missing = 0
    for day in sorted(days):
        expected, metric_id = len(events[day]), metric_ids.get(day[0])
        held = _count(ctx.client, metric_id, day[1]) if metric_id else 0
        checked |= rows_of[day]
        if held < expected:
            missing += min(expected - held, len(rows_of[day]))
            short |= rows_of[day]
            report.sample([Drift(f"{day[0]} on {day[1]}", "missing", "count", expected, held)])
    drifted = min(missing, len(short))
    report.checked += len(checked)
    report.in_step += len(checked) - drifted
    if drifted:
        report.drifted["missing"] += drifted
    return sorted(short)


def _count(client: KlaviyoClient, metric_id: str, day: str) -> int:
    start = date.fromisoformat(day)
    end = start + timedelta(days=1)
    expression = (
        f'equals(metric_id,"{metric_id}"),greater-or-equal(datetime,{start}T00:00:00Z),'
        f"less-than(datetime,{end}T00:00:00Z)"
    )
    params = {"filter": expression, "fields[event]": "datetime", "page[size]": PAGE}
    return sum(1 for _ in client.paginate("/api/events", params))


def _day(moment: datetime | str) -> str:
    return moment.date().isoformat() if isinstance(moment, datetime) else str(moment)[:10]
