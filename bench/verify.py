"""How fast does `verify --all` read 100,000 delivered profiles back, within Klaviyo's read limits?

Verification looks each delivered profile up by email, 100 a request (`GET /api/profiles?
filter=any(email,[...])`), on the profiles quota: 75 requests a second, 750 a minute. Its
ceiling is therefore 750 / 60 x 100 = 1,250 profiles/s steady (7,500/s within a burst second).
Klaviyo's windows are fixed, so a run shorter than a few minutes is flattered by its first
minute (a whole steady budget at burst speed): the steady rate is measured over the first
whole window, from the sandbox's own log (profiles in the first 750 lookups, divided by the time
from the first of them to the 751st, the first one the next window let through), as
bench/delivery.py does.

Setup (not timed): a model of N profiles on DuckDB (email, external id, names, two
properties), delivered by a real sync to the sandbox (its own process) with its rate limits
off; then every 1,000th profile is edited in the sandbox behind the project's back, so the run
must find exactly those. Timed, in a fresh interpreter so that its peak RSS is its own:
`verify_sync(sample=None)` against the sandbox enforcing Klaviyo's real limits (time scale 1).

    .venv/bin/python bench/verify.py                  # 100,000 profiles, about 2 minutes
    .venv/bin/python bench/verify.py --rows 20000     # within one window: burst speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from change_set import peak_rss_mb
from delivery import SandboxProcess

API_KEY = "pk_bench_0123456789abcdef0123456789abcdef"
SYNC = "profiles"
EDIT_EVERY = 1_000  # every 1,000th profile drifts
LOOKUP = 100  # profiles a lookup request finds
PEOPLE = (
    "SELECT 'c' || i AS customer_id, 'p' || i || '@example.com' AS email, "
    "'First' || (i % 997) AS first_name, 'Last' || (i % 991) AS last_name, "
    "CAST(i % 5000 AS DOUBLE) / 7 AS ltv, 'tier' || (i % 4) AS tier FROM range(0, {rows}) t(i)"
)


def config_text(url: str, base_url: str) -> str:
    return json.dumps(  # JSON is YAML
        {
            "warehouse": {"url": url},
            "klaviyo": {"api_key": "${KLAVIYO_API_KEY}", "base_url": base_url},
            "models": {"people": {"table": "src.people", "primary_key": "customer_id"}},
            "syncs": {
                SYNC: {
                    "model": "people",
                    "action": "upsert_profile",
                    "mapping": {
                        "email": "email",
                        "external_id": "customer_id",
                        "first_name": "first_name",
                        "last_name": "last_name",
                        "properties": {"ltv": "ltv", "tier": "tier"},
                    },
                    "settings": {"batch_size": 10_000},
                }
            },
        }
    )


# ---- the sandbox, in its own process ---------------------------------------------------------


def serve_sandbox() -> None:
    """Run the sandbox here; obey one JSON command per stdin line, answer one JSON line."""
    from klaviyo_pipelines.sandbox import Sandbox

    sandbox = Sandbox(api_key=API_KEY, enforce_rate_limits=False, job_delay=0.01).start()
    print(json.dumps({"url": sandbox.url}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        answer: dict[str, Any] = {}
        if command["op"] == "drift":  # edit every EDIT_EVERY-th profile behind our back
            with sandbox.state.lock:
                profiles = sorted(sandbox.state.profiles.values(), key=lambda p: p.email or "")
                edited = [p for p in profiles if int(p.email[1:].split("@")[0]) % EDIT_EVERY == 0]
                for profile in edited:
                    profile.attributes["first_name"] = "Edited in the UI"
            answer = {"edited": len(edited), "profiles": len(profiles)}
        elif command["op"] == "limits":  # Klaviyo's real limits from now on, counters reset
            sandbox.limiter.reset()
            sandbox.app.enforce_rate_limits = True
            with sandbox.state.lock:
                answer = {"mark": len(sandbox.state.requests)}
        elif command["op"] == "log":
            with sandbox.state.lock:
                log = sandbox.state.requests[command["since"] :]
                answer = {"requests": [(r.at, r.endpoint, r.method, r.status) for r in log]}
        elif command["op"] == "stop":
            break
        print(json.dumps(answer), flush=True)
    sandbox.stop()


# ---- the client's two phases, each in a fresh interpreter --------------------------------------


def deliver(url: str, base_url: str, rows: int) -> dict[str, Any]:
    """Setup: the model, and a real sync delivering it (the sandbox's limits off)."""
    import sqlalchemy as sa

    from klaviyo_pipelines.config import parse_config
    from klaviyo_pipelines.klaviyo.client import KlaviyoClient
    from klaviyo_pipelines.runner import run_sync
    from klaviyo_pipelines.warehouse.engine import Warehouse
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot

    config = parse_config(config_text(url, base_url), "bench.yaml")
    wh = Warehouse(url)
    try:
        with wh.engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA src"))
            conn.exec_driver_sql(f"CREATE TABLE src.people AS {PEOPLE.format(rows=rows)}")
        take_snapshot(wh, config.models["people"], config.path)
        with KlaviyoClient(API_KEY, base_url=base_url) as client:
            report = run_sync(config, SYNC, wh, client)
    finally:
        wh.dispose()
    if report.status != "success" or sum(report.delivered.values()) != rows:
        raise SystemExit(f"the setup sync failed: {report.status} {report.error}")
    return {"delivered": rows}


def verify(url: str, base_url: str) -> dict[str, Any]:
    """Timed: every delivered row read back at Klaviyo's real limits."""
    from klaviyo_pipelines.config import parse_config
    from klaviyo_pipelines.klaviyo.client import KlaviyoClient
    from klaviyo_pipelines.verify import estimated_seconds, verify_sync
    from klaviyo_pipelines.warehouse.engine import Warehouse

    config = parse_config(config_text(url, base_url), "bench.yaml")
    wh = Warehouse(url)
    start_mb = peak_rss_mb()
    try:
        estimate = estimated_seconds(config, wh, SYNC)
        with KlaviyoClient(API_KEY, base_url=base_url) as client:
            started, cpu = time.monotonic(), time.process_time()
            report = verify_sync(config, SYNC, wh, client, sample=None)
            seconds, cpu = time.monotonic() - started, time.process_time() - cpu
            stats = client.stats
    finally:
        wh.dispose()
    return {
        "estimate": estimate,
        "seconds": seconds,
        "cpu": cpu,
        "report": report.to_dict(),
        "requests": stats.requests,
        "rate_limited": stats.rate_limited,
        "waited": stats.waited_seconds,
        "peak_mb": peak_rss_mb(),
        "start_mb": start_mb,
    }


def child(phase: str, *args: str) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, __file__, f"--{phase}", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KLAVIYO_API_KEY": API_KEY},
    )
    if run.returncode:
        raise SystemExit(f"{phase}: {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---- the orchestrator ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """A process's CPU time (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def whole_window(log: list[list[Any]], steady: int) -> tuple[float, int] | None:
    """(seconds, lookups) of the profiles class's first whole steady window: from its first
    lookup to the first one the next window let through."""
    lookups = sorted(r[0] for r in log if r[1] == "profiles" and r[3] != 429)
    if len(lookups) <= steady:
        return None
    return lookups[steady] - lookups[0], steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="delivered profiles")
    args = parser.parse_args()
    from klaviyo_pipelines.klaviyo.endpoints import PROFILES

    sandbox = SandboxProcess(__file__)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"duckdb:///{Path(tmp) / 'warehouse.duckdb'}"
            started = time.monotonic()
            child("deliver", url, sandbox.url, str(args.rows))
            drift = sandbox.ask("drift")
            print(
                f"setup: {args.rows:,} profiles delivered by a sync in "
                f"{time.monotonic() - started:.0f} s (limits off); {drift['edited']:,} edited "
                "in the sandbox"
            )
            mark = sandbox.ask("limits")["mark"]
            sandbox_cpu = cpu_seconds(sandbox.proc.pid)
            result = child("verify", url, sandbox.url)
            sandbox_cpu = cpu_seconds(sandbox.proc.pid) - sandbox_cpu
            log = sandbox.ask("log", since=mark)["requests"]
    finally:
        sandbox.close()
    report = result["report"]
    if (report["checked"], report["drifted"]) != (args.rows, drift["edited"]):
        raise SystemExit(f"verify found {report['drifted']} drifted of {report['checked']}")
    by_class: dict[str, int] = {}
    for record in log:
        by_class[record[1]] = by_class.get(record[1], 0) + 1
    served_429 = sum(1 for r in log if r[3] == 429)
    writes = sum(1 for r in log if r[2] != "GET")
    ceiling = PROFILES.steady_per_minute / 60 * LOOKUP
    burst = PROFILES.burst_per_second * LOOKUP
    rate = report["checked"] / result["seconds"]
    print(
        f"verify --all of {report['checked']:,} profiles at Klaviyo's real limits (profiles: "
        f"{PROFILES.burst_per_second}/s burst, {PROFILES.steady_per_minute}/min steady)"
    )
    print(
        f"  {result['seconds']:.1f} s (estimated beforehand {result['estimate']:.0f} s): "
        f"{rate:,.0f} profiles/s overall"
    )
    window = whole_window(log, PROFILES.steady_per_minute)
    if window:
        seconds, lookups = window
        steady = lookups * LOOKUP / seconds
        print(
            f"  first whole steady window: {lookups} lookups in {seconds:.1f} s = "
            f"{steady:,.0f} profiles/s, {100 * steady / ceiling:.0f}% of the read ceiling"
        )
    else:
        print("  within the first steady window (burst speed): no whole window to measure")
    print(
        f"  read ceiling: {PROFILES.steady_per_minute}/min x {LOOKUP} = {ceiling:,.0f} "
        f"profiles/s steady ({burst:,} within a burst second)"
    )
    print(
        f"  requests: {result['requests']:,} by the client, "
        + ", ".join(f"{n:,} {name}" for name, n in sorted(by_class.items()))
        + f" in the sandbox's log; {writes} writes"
    )
    print(
        f"  429s: {result['rate_limited']} seen by the client, {served_429} served; "
        f"waited {result['waited']:.1f} s for the quota"
    )
    print(
        f"  drift found: {report['drifted']:,} ({report['drifted_by_kind']}), "
        f"{drift['edited']:,} made"
    )
    print(
        f"  CPU: client {result['cpu']:.1f} s ({1e3 * result['cpu'] / result['requests']:.0f} ms "
        f"a lookup), sandbox {sandbox_cpu:.1f} s "
        f"({1e3 * sandbox_cpu / max(1, len(log)):.0f} ms a lookup)"
    )
    print(
        f"  client peak RSS {result['peak_mb']:.0f} MB "
        f"({result['peak_mb'] - result['start_mb']:+.0f} MB over its imports)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-sandbox"]:
        serve_sandbox()
    elif sys.argv[1:2] == ["--deliver"]:
        print(json.dumps(deliver(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    elif sys.argv[1:2] == ["--verify"]:
        print(json.dumps(verify(sys.argv[2], sys.argv[3])))
    else:
        main()
