"""How close does each action come to Klaviyo's rate limits, and is the sandbox ever the limit?

For every action a sync runs against the sandbox enforcing Klaviyo's real per-endpoint-class
limits (`klaviyo/endpoints.py`), with windows shortened by a time scale so that minutes of
limits pass in seconds. Its throughput is compared with the ceiling:

    ceiling rows/s = steady limit per second x time scale x rows per request of the binding class

where the binding class is the one an action's rows are rationed by: the class of its writes,
or, for Remove Profile (from List), the profile lookups (100 profiles a page, 750/m) when they
allow fewer rows than the removals (1,000 ids a call, 150/m). "Per request" is the share of
that class's steady request budget used; "per row" counts only the rows the requests carried,
so requests that carry no row (job polls, import-error reads) lower it: the ceiling counts them.

Klaviyo's windows are fixed (1 s burst, 60 s steady), so a short run is flattered by its first
window (a whole steady budget at burst speed). The measure is therefore taken over whole
windows, from the sandbox's own log: the rows carried by the binding class's first n x L
requests (L its steady limit), divided by the time from the first of them to request
n x L + 1, the first one the next window let through. Each run is sized for n windows.

The sandbox runs in its own process (its CPU is its own, the client's is separate); it is then
asked, with rate limits off, how many rows and requests per second it serves for the same
workloads, and what CPU that costs it. Each action's client runs in a fresh interpreter, so its
peak RSS is its own.

Then, with Klaviyo's largest batches (10,000 profiles an import, 1,000 events a request) at time
scale 1 against the enforced limits, a shop's realistic rows (`shop_data.py`: phones, Decimal
money, timestamps) are sent to tell whether Klaviyo's rate limit or the client's CPU binds. A
steady window of Track Event (150 requests, 150,000 events) is measured whole; one of Upsert
Profile would need 750,000 profiles, so its rows/s are measured over its writes instead, which
stay under the steady limit unless the client outpaces it.

    .venv/bin/python bench/delivery.py            # every action, about 8 minutes
    .venv/bin/python bench/delivery.py --only track_event --windows 1
    .venv/bin/python bench/delivery.py --full-batches no    # or only: the scale-1 full batches
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shop_data

API_KEY = "pk_bench_0123456789abcdef0123456789abcdef"
LIST_ID = "BNCHLS"
AUDIENCE = "vip"
PRODUCTS_PER_ORDER = 3


@dataclass(frozen=True)
class Case:
    """One action's workload: its model SQL (row number `i`), mapping, settings, what binds."""

    action: str
    title: str
    write_class: str  # endpoint class of the action's writes
    binding_class: str  # the class whose steady budget rations rows
    rows_per_request: int  # rows a full request of the binding class carries
    scale: float  # sandbox and client time scale
    sql: str
    mapping: dict[str, Any]
    settings: dict[str, Any]
    extra_requests: int = 0  # requests of the binding class per batch that carry no row
    rows_per_item: float = 1.0  # Order Completed: events per order
    audience: bool = False
    seed_profiles: bool = False  # rows must exist in Klaviyo (and in the list) first
    note: str = ""
    shop_sql: Callable[[int], str] | None = None  # a shop's whole model (key `id`), not `sql`
    rows: int | None = None  # rows to send, when not sized by whole windows


PEOPLE = (
    "SELECT 'c' || i AS customer_id, 'p' || i || '@example.com' AS email, "
    "'First' || (i % 997) AS first_name, 'Last' || (i % 991) AS last_name, "
    "CAST(i % 5000 AS DOUBLE) / 7 AS ltv, 'tier' || (i % 4) AS tier"
)
AUDIENCE_PEOPLE = f"SELECT '{AUDIENCE}' AS segment, " + PEOPLE[len("SELECT ") :]
VIEWS = (
    "SELECT 'v' || i AS view_id, 'p' || (i % 50000) || '@example.com' AS email, "
    "'https://shop.example.com/p/' || (i % 2000) AS url, "
    "TIMESTAMP '2026-01-01' + (i % 100000) * INTERVAL '1 second' AS viewed_at"
)
ORDERS = (
    "SELECT 'o' || i AS order_id, 'p' || (i % 50000) || '@example.com' AS email, "
    "TIMESTAMP '2026-01-01' + (i % 100000) * INTERVAL '1 second' AS placed_at, "
    "CAST(i % 900 AS DOUBLE) + 0.5 AS total, "
    "'[' || "
    + " || ',' || ".join(
        f'\'{{"sku":"S\' || ((i + {k}) % 500) || \'","price":{3 * (k + 1)}}}\''
        for k in range(PRODUCTS_PER_ORDER)
    )
    + " || ']' AS products"
)
CONSENT = "SELECT 'e' || i AS optin_id, 'p' || i || '@example.com' AS email"

CASES = [
    Case(
        "upsert_profile",
        "Upsert Profile",
        "profile_bulk_import",
        "profile_bulk_import",
        250,
        4.0,
        PEOPLE,
        {"external_id": "customer_id", "properties": {"ltv": "ltv", "tier": "tier"}},
        {"batch_size": 250},
        note="batch 250 of 10,000; job polls have their own quota",
    ),
    Case(
        "track_event",
        "Track Event",
        "event_bulk_create",
        "event_bulk_create",
        250,
        4.0,
        VIEWS,
        {"time": "viewed_at", "properties": {"url": "url"}},
        {"metric_name": "Viewed Page", "batch_size": 250},
        note="batch 250 of 1,000 events",
    ),
    Case(
        "order_completed",
        "Order Completed",
        "event_bulk_create",
        "event_bulk_create",
        248,
        4.0,
        ORDERS,
        {"time": "placed_at", "value": "total", "products": "products"},
        {"value_currency": "USD", "batch_size": 250},
        rows_per_item=1 + PRODUCTS_PER_ORDER,
        note="batch 250 of 1,000 events: 62 orders of 4 events; rows/s are orders/s",
    ),
    Case(
        "remove_profile",
        "Remove Profile",
        "list_membership",
        "profiles",
        100,
        2.0,
        CONSENT.replace("optin_id", "churn_id"),
        {"email": "email"},
        {"list_id": LIST_ID},
        seed_profiles=True,
    ),
    Case(
        "subscribe_profile",
        "Subscribe Profile",
        "subscribe",
        "subscribe",
        100,
        2.0,
        CONSENT,
        {"email": "email"},
        {"list_id": LIST_ID, "batch_size": 100},
        note="batch 100 of 1,000",
    ),
    Case(
        "unsubscribe_profile",
        "Unsubscribe Profile",
        "unsubscribe",
        "unsubscribe",
        100,
        2.0,
        CONSENT.replace("optin_id", "optout_id"),
        {"email": "email"},
        {},
    ),
    Case(
        "add_profile_to_list",
        "Add Profile To List",
        "profile_bulk_import",
        "profile_bulk_import",
        250,
        4.0,
        AUDIENCE_PEOPLE,
        {"external_id": "customer_id", "first_name": "first_name"},
        {"lists": {AUDIENCE: LIST_ID}, "batch_size": 250},
        audience=True,
        note="as Upsert Profile",
    ),
    Case(
        "remove_profile_from_list",
        "Remove Profile from List",
        "list_membership",
        "profiles",
        100,
        2.0,
        AUDIENCE_PEOPLE,
        {"email": "email"},
        {"lists": {AUDIENCE: LIST_ID}, "max_exit_share": 1.0},
        audience=True,
        seed_profiles=True,
    ),
]

# Klaviyo's largest batches at time scale 1, with a shop's rows: does the limit or our CPU bind?
FULL_BATCH_CASES = [
    Case(
        "upsert_profile",
        "Upsert Profile, full",
        "profile_bulk_import",
        "profile_bulk_import",
        10_000,
        1.0,
        "",
        shop_data.PROFILE_MAPPING,
        {"batch_size": 10_000},
        shop_sql=shop_data.customers_sql,
        rows=300_000,
        note="batch 10,000 at scale 1, shop rows (40% phones); rows/s over its writes",
    ),
    Case(
        "track_event",
        "Track Event, full",
        "event_bulk_create",
        "event_bulk_create",
        1_000,
        1.0,
        "",
        shop_data.EVENT_MAPPING,
        {"batch_size": 1_000},
        shop_sql=shop_data.events_sql,
        note="batch 1,000 at scale 1, shop rows (40% phones); one whole steady window",
    ),
]


def case_named(title: str) -> Case:
    return next(c for c in CASES + FULL_BATCH_CASES if c.title == title)


# ---- the sandbox process ----------------------------------------------------------------------


def serve_sandbox() -> None:
    """Run the sandbox here; obey one JSON command per stdin line, answer one JSON line."""
    from klaviyo_pipelines.sandbox import Sandbox

    sandbox = Sandbox(api_key=API_KEY, job_delay=0.05).start()
    print(json.dumps({"url": sandbox.url}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        answer: dict[str, Any] = {}
        if op == "setup":
            sandbox.reset()
            sandbox.app.enforce_rate_limits = command["limits"]
            sandbox.limiter.time_scale = command["scale"]
            # A job stays queued job_delay s, then processes for about as long: it completes
            # about job_latency s after it was accepted.
            sandbox.app.job_delay = command.get("job_latency", 0.1) / 2
            sandbox.state.create_list("Bench list", list_id=LIST_ID)
            state = sandbox.state
            ids = [
                state.upsert_profile({"email": f"p{i}@example.com"})[0].id
                for i in range(command["profiles"])
            ]
            state.add_members(LIST_ID, ids)
        elif op == "usage":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            answer = {"cpu": usage.ru_utime + usage.ru_stime, "wall": time.monotonic()}
        elif op == "log":
            with sandbox.state.lock:
                answer = {
                    "requests": [
                        (r.at, r.endpoint, r.items, r.status, r.operation)
                        for r in sandbox.state.requests
                    ]
                }
        elif op == "stop":
            break
        print(json.dumps(answer), flush=True)
    sandbox.stop()


class SandboxProcess:
    """The sandbox in its own process, served by `script --serve-sandbox` (each benchmark
    answers its own commands), so its CPU is not the client's."""

    def __init__(self, script: str = __file__, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, script, "--serve-sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.url = self._read()["url"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
            self.proc.stdin.close()
        self.proc.wait(10)


# ---- one action's client, in its own process -------------------------------------------------


def config_text(case: Case, url: str, base_url: str) -> str:
    model: dict[str, Any] = {"sql": "select * from src.source", "primary_key": "customer_id"}
    if case.audience:
        model["audience"] = {"column": "segment"}
    elif case.shop_sql:
        model["primary_key"] = "id"
    else:
        model["primary_key"] = case.sql.split(" AS ")[1].split(",")[0].strip()
    sync = {
        "model": "source",
        "action": case.action,
        "mapping": case.mapping,
        "settings": case.settings,
    }
    return json.dumps(
        {
            "warehouse": {"url": url},
            "klaviyo": {"api_key": "${KLAVIYO_API_KEY}", "base_url": base_url},
            "models": {"source": model},
            "syncs": {"bench": sync},
        }
    )


def run_case(name: str, rows: int, scale: float, base_url: str) -> dict[str, Any]:
    """Load `rows` rows, snapshot, then time one run of the sync. Prints a JSON result."""
    import sqlalchemy as sa

    from klaviyo_pipelines.config import parse_config
    from klaviyo_pipelines.klaviyo.client import KlaviyoClient
    from klaviyo_pipelines.runner import run_sync
    from klaviyo_pipelines.warehouse.engine import Warehouse
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot

    case = case_named(name)
    os.environ["KLAVIYO_API_KEY"] = API_KEY
    with tempfile.TemporaryDirectory() as tmp:
        url = f"duckdb:///{Path(tmp) / 'warehouse.duckdb'}"
        config = parse_config(config_text(case, url, base_url), "bench.yaml")
        wh = Warehouse(url)
        with wh.engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA src"))
            model_sql = (
                case.shop_sql(rows) if case.shop_sql else f"{case.sql} FROM range(0, {rows}) t(i)"
            )
            conn.exec_driver_sql(f"CREATE TABLE src.source AS {model_sql}")
        partition = AUDIENCE if case.audience else None
        model = config.models["source"]
        with KlaviyoClient(API_KEY, base_url=base_url, time_scale=scale) as client:
            if case.action == "remove_profile_from_list":
                # Members first enter (acknowledged, nothing sent), then all leave.
                take_snapshot(wh, model, config.path, partition)
                run_sync(config, "bench", wh, client, partition=partition)
                with wh.engine.begin() as conn:
                    conn.execute(sa.text("DELETE FROM src.source"))
            take_snapshot(wh, model, config.path, partition)
            cpu_before, main_before = time.process_time(), time.thread_time()
            before = client.stats
            started = time.monotonic()
            report = run_sync(config, "bench", wh, client, partition=partition)
            elapsed = time.monotonic() - started
            main_cpu = time.thread_time() - main_before  # preparing and committing: serial
            after = client.stats
        wh.engine.dispose()
    if report.status != "success":
        raise SystemExit(f"{name}: the sync failed: {report.error}")
    return {
        "delivered": sum(report.delivered.values()),
        "rejected": sum(report.rejected.values()),
        "seconds": elapsed,
        "requests": after.requests - before.requests,
        "rate_limited": after.rate_limited - before.rate_limited,
        "cpu": time.process_time() - cpu_before,
        "main_cpu": main_cpu,
        "waited": after.waited_seconds - before.waited_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ---- the orchestrator ----------------------------------------------------------------------------


STEADY = {  # steady limit per minute of each class the cases use (checked against endpoints.py)
    "profile_bulk_import": 150,
    "event_bulk_create": 150,
    "list_membership": 150,
    "profiles": 750,
    "subscribe": 750,
    "unsubscribe": 750,
}


def rows_for(case: Case, windows: int) -> int:
    """Rows whose delivery needs `windows` full steady windows of the binding class, plus one
    request into the next (and a little more, since polls and lookups use requests too)."""
    if case.rows:
        return case.rows
    requests = STEADY[case.binding_class] * windows + 1
    batches = requests / (1 + case.extra_requests)
    return int(batches * case.rows_per_request / case.rows_per_item * 1.15)


def whole_windows(
    log: list[tuple[float, str, int, int, str | None]], case: Case, limit: int
) -> tuple[float, int, int] | None:
    """(seconds, items written, binding requests) over the binding class's whole steady
    windows: from its first request to the first one a further window let through."""
    binding = sorted(r for r in log if r[1] == case.binding_class and r[3] != 429)
    windows = (len(binding) - 1) // limit
    if windows < 1:
        return None
    start, stop = binding[0][0], binding[windows * limit][0]
    items = sum(r[2] for r in log if r[1] == case.write_class and start <= r[0] < stop)
    return stop - start, items, windows * limit


def over_writes(
    log: list[tuple[float, str, int, int, str | None]], case: Case
) -> tuple[float, int, int] | None:
    """(seconds, items, writes) from the first write carrying rows to the last, the last one's
    items not counted: a rate the steady limit did not touch, the run being within one window."""
    writes = sorted(r for r in log if r[1] == case.write_class and r[3] != 429 and r[2])
    if len(writes) < 2:
        return None
    return writes[-1][0] - writes[0][0], sum(r[2] for r in writes[:-1]), len(writes) - 1


def measure(
    case: Case,
    sandbox: SandboxProcess,
    windows: int,
    limits: bool,
    share: int = 1,
    rows: int | None = None,
    job_latency: float = 0.1,
) -> dict[str, Any]:
    rows = rows or rows_for(case, windows) // share
    scale = case.scale if limits else 1e6
    sandbox.ask(
        "setup",
        limits=limits,
        scale=scale,
        profiles=rows if case.seed_profiles else 0,
        job_latency=job_latency,
    )
    usage0 = sandbox.ask("usage")
    child = subprocess.run(
        [sys.executable, __file__, "--run-case", case.title, str(rows), str(scale), sandbox.url],
        capture_output=True,
        text=True,
        check=False,
    )
    usage1 = sandbox.ask("usage")
    if child.returncode:
        raise SystemExit(f"{case.action}: {child.stderr[-2000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    log = [tuple(r) for r in sandbox.ask("log")["requests"]]
    result["rows"] = rows
    result["sandbox_cpu"] = usage1["cpu"] - usage0["cpu"]
    result["429_by_class"] = dict(Counter(r[1] for r in log if r[3] == 429))
    if limits:
        result["windows"] = whole_windows(log, case, STEADY[case.binding_class])
        result["writes"] = over_writes(log, case)
    return result


def check_limits() -> None:
    from klaviyo_pipelines.klaviyo import endpoints

    for cls in vars(endpoints).values():
        if isinstance(cls, endpoints.EndpointClass) and cls.name in STEADY:
            assert STEADY[cls.name] == cls.steady_per_minute, cls.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help="action name (repeatable)")
    parser.add_argument("--windows", type=int, default=1, help="whole steady windows measured")
    parser.add_argument(
        "--full-batches",
        choices=["yes", "no", "only"],
        default="yes",
        help="also (or only) send the largest batches at time scale 1 (about 2.5 minutes)",
    )
    parser.add_argument("--rows", type=int, help="rows of each largest-batch case")
    parser.add_argument(
        "--job-latency",
        type=float,
        nargs="+",
        default=[0.1],
        help="seconds from a bulk job's acceptance to its completion (largest-batch cases)",
    )
    args = parser.parse_args()
    check_limits()
    chosen = [c for c in CASES + FULL_BATCH_CASES if not args.only or c.action in args.only]
    cases = [c for c in chosen if c in CASES and args.full_batches != "only"]
    full = [c for c in chosen if c in FULL_BATCH_CASES and args.full_batches != "no"]
    sandbox = SandboxProcess()
    print(f"{os.cpu_count()} CPUs; sandbox pid {sandbox.proc.pid}, client in a child per action")
    lines, full_lines = [], []
    try:
        for case in cases:
            limited = measure(case, sandbox, args.windows, limits=True)
            free = measure(case, sandbox, args.windows, limits=False, share=3)
            lines.append((case, limited, free))
            print(f"  {case.title}: done", file=sys.stderr, flush=True)
        for case in full:
            for latency in args.job_latency:
                run = measure(case, sandbox, 1, True, rows=args.rows, job_latency=latency)
                run["job_latency"] = latency
                full_lines.append((case, run))
                print(f"  {case.title}, jobs {latency:g} s: done", file=sys.stderr, flush=True)
    finally:
        sandbox.close()
    if lines:
        print_table(lines)
    if full_lines:
        print_full_batches(full_lines)


def print_full_batches(lines: list[tuple[Case, dict[str, Any]]]) -> None:
    """Largest batches at scale 1: the rate reached against the ceiling, and who binds."""
    head = (
        f"{'action':<22}{'batch':>7}{'+req':>5}{'ceil rows/s':>12}{'rows/s':>8}{'%ceil':>7}"
        f"  {'measured over':<32}{'429s':>5}{'waited s':>9}{'cli CPU':>8}{'main thr':>9}"
        f"{'CPU us/row':>11}{'rows/CPU s':>11}{'sbx CPU':>8}{'RSS MB':>7}  binds"
    )
    print()
    print(head)
    print("-" * len(head))
    for case, run in lines:
        limit = STEADY[case.binding_class]
        ceiling = limit / 60 * case.scale * case.rows_per_request / (1 + case.extra_requests)
        if run["windows"]:
            seconds, items, requests = run["windows"]
            span = f"{requests} requests, whole window"
        else:
            seconds, items, requests = run["writes"]
            span = f"{requests} writes in {seconds:.0f} s (< {limit}/m)"
        rate = items / seconds
        main_share = run["main_cpu"] / run["seconds"]
        per_core = run["rows"] / run["cpu"]  # what one core of ours would carry, alone
        binds = (
            "rate limit" if rate >= 0.9 * ceiling
            else "job latency: batches in flight wait for their jobs"
            if run["cpu"] / run["seconds"] < 0.5
            else "client CPU" if per_core < ceiling
            else "neither: the machine's other work, or time per batch"
        )  # fmt: skip
        print(
            f"{case.title:<22}{case.rows_per_request:>7,}{case.extra_requests:>5}{ceiling:>12,.0f}"
            f"{rate:>8,.0f}{100 * rate / ceiling:>6.1f}%  {span:<32}{run['rate_limited']:>5}"
            f"{run['waited']:>9.1f}{100 * run['cpu'] / run['seconds']:>7.0f}%"
            f"{100 * main_share:>8.0f}%{1e6 * run['cpu'] / run['rows']:>11.0f}{per_core:>11,.0f}"
            f"{100 * run['sandbox_cpu'] / run['seconds']:>7.0f}%{run['peak_rss_mb']:>7.0f}  {binds}"
        )
        print(
            f"    {case.note}; {run['rows']:,} rows, {run['seconds']:.0f} s, "
            f"jobs complete {run['job_latency']:g} s after acceptance"
            + (f"; 429s by class: {run['429_by_class']}" if run["429_by_class"] else "")
        )
    print(
        "cli CPU = the client process's CPU (all threads) over the run, in % of one core; main "
        "thr = its main thread's (reading pages, preparing, committing: serial work); CPU us/row "
        "and rows/CPU s = the client's CPU per row sent (change set included) and its inverse, "
        "what one core of ours carries when nothing else runs: below the ceiling, our CPU binds; "
        "waited s = time the rate limiter held requests back."
    )


def print_table(lines: list[tuple[Case, dict[str, Any], dict[str, Any]]]) -> None:
    head = (
        f"{'action':<25}{'class (binding)':<32}{'scale':>6}{'limit/m':>8}{'batch':>6}"
        f"{'+req':>5}{'ceil rows/s':>12}{'rows/s':>8}{'%ceil':>7}{'%reqs':>7}{'requests':>9}"
        f"{'429s':>10}{'RSS MB':>7}{'cli CPU':>8}{'sbx CPU':>8}"
        f"{'free rows/s':>12}{'free req/s':>11}{'sbx CPU free':>13}"
    )
    print(head)
    print("-" * len(head))
    for case, limited, free in lines:
        limit = STEADY[case.binding_class]
        per_second = limit / 60 * case.scale
        ceiling = per_second * case.rows_per_request / (1 + case.extra_requests)
        ceiling /= case.rows_per_item
        window = limited["windows"]
        rate, request_share = float("nan"), float("nan")
        if window:
            seconds, items, requests = window
            rate = items / case.rows_per_item / seconds
            request_share = requests / seconds / per_second
        classes = case.write_class + (
            f" ({case.binding_class})" if case.binding_class != case.write_class else ""
        )
        requests = limited["requests"]
        print(
            f"{case.title:<25}{classes:<32}{case.scale:>6g}{limit:>8}"
            f"{case.rows_per_request:>6}{case.extra_requests:>5}{ceiling:>12,.0f}{rate:>8,.0f}"
            f"{100 * rate / ceiling:>6.1f}%{100 * request_share:>6.1f}%{requests:>9}"
            f"{limited['rate_limited']:>4} ({100 * limited['rate_limited'] / requests:.1f}%)"
            f"{limited['peak_rss_mb']:>7.0f}{100 * limited['cpu'] / limited['seconds']:>7.0f}%"
            f"{100 * limited['sandbox_cpu'] / limited['seconds']:>7.0f}%"
            f"{free['delivered'] / free['seconds']:>12,.0f}"
            f"{free['requests'] / free['seconds']:>11,.0f}"
            f"{100 * free['sandbox_cpu'] / free['seconds']:>12.0f}%"
        )
        if case.note:
            print(f"    {case.note}")
    print(
        "ceil rows/s = steady limit/s x scale x rows a request carries / (1 + requests per batch "
        "carrying no row, +req); rows/s over whole steady windows (see the docstring); %reqs = "
        "share of the binding class's request budget used; free = rate limits off (client "
        "paced by nothing), which the sandbox serves at the CPU shown: its headroom."
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-sandbox"]:
        serve_sandbox()
    elif sys.argv[1:2] == ["--run-case"]:
        name, rows, scale, url = sys.argv[2:6]  # name: the case's title
        print(json.dumps(run_case(name, int(rows), float(scale), url)))
    else:
        main()
