"""Does a first sync's memory stay flat as the model grows?

Rows are meant to be streamed: the change set is computed in the warehouse and read back a
page at a time, so a 10M-row first sync should peak under 1 GB and no higher than a 1M one.
For each size N this builds a shop's customers (`shop_data.py`) in a DuckDB file, then runs a
real first sync in a fresh interpreter: `take_snapshot` then `runner.run_sync` (Upsert Profile
in bulk, or Track Event), over real HTTP to the sandbox in another process. It prints rows,
seconds, rows/s, the client's peak RSS (VmHWM; DuckDB is embedded, so its memory counts), the
peak of each phase (sampled), and how the peak grows per million rows.

The sandbox runs without rate limits (the client paces as for Klaviyo, with windows shortened
1000x so pacing is not what is measured) and, so that it does not hold millions of profiles,
forgets every second the profiles, events and finished jobs it no longer needs. With
`--real-limits` both keep Klaviyo's limits at time scale 1 instead, and `--job-latency`
makes each bulk job complete that many seconds after it was accepted (issue #15's 10M run).

    python bench/first_sync_memory.py [--rows 100000 1000000] [--action upsert_profile]
    python bench/first_sync_memory.py --rows 10000000   # opt-in: over an hour on 2 busy cores
    python bench/first_sync_memory.py --rows 10000000 --real-limits --job-latency 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import shop_data

KEY = "pk_bench_first_sync_memory"
ACTIONS = {
    "upsert_profile": (shop_data.customers_sql, shop_data.PROFILE_MAPPING),
    "track_event": (shop_data.events_sql, shop_data.EVENT_MAPPING),
}
TIME_SCALE = 1000.0
FINISHED_JOB_TTL = timedelta(seconds=60)  # the client reads a job's errors just after it ends


def status_kb(field: str, pid: int | str = "self") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the sandbox process ---------------------------------------------------------------------


def serve(real_limits: bool, job_latency: float) -> None:
    """Serve until SIGTERM, forgetting what a first sync no longer needs every second."""
    from klaviyo_pipelines.sandbox import Sandbox
    from klaviyo_pipelines.sandbox.state import utcnow

    sandbox = Sandbox(api_key=KEY, port=0, enforce_rate_limits=real_limits, job_delay=job_latency)
    sandbox.start()
    print(sandbox.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    state = sandbox.state
    while not stop.wait(1.0):
        with state.lock:  # private fields: this is the benchmark's sandbox, not a feature
            state.profiles.clear()
            state._by_email.clear()
            state._by_phone.clear()
            state._by_external_id.clear()
            state.events.clear()
            state._event_keys.clear()
            state.requests.clear()
            old = utcnow() - FINISHED_JOB_TTL
            for job_id, job in list(state.jobs.items()):
                if job.completed_at and job.completed_at < old:
                    del state.jobs[job_id]
    sandbox.stop()


# ---- the model and the sync, each in its own interpreter ------------------------------------


def build(db: str, action: str, rows: int) -> None:
    import duckdb

    con = duckdb.connect(db)
    con.execute(f"CREATE TABLE shop AS {ACTIONS[action][0](rows)}")
    con.close()


def config_for(db: str, action: str) -> Any:
    from klaviyo_pipelines.config import parse_config

    settings = {"batch": True} if action == "upsert_profile" else {}
    text = json.dumps(  # JSON is YAML
        {
            "warehouse": {"url": f"duckdb:///{db}"},
            "klaviyo": {"api_key": "${KLAVIYO_API_KEY}"},
            "models": {"shop": {"table": "shop", "primary_key": "id"}},
            "syncs": {
                "first": {
                    "model": "shop",
                    "action": action,
                    "mapping": ACTIONS[action][1],
                    "settings": settings,
                }
            },
        }
    )
    return parse_config(text, "<bench>")


class RssSampler(threading.Thread):
    """The highest RSS seen in each phase, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "imports"
        self.peaks: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            mb = status_kb("VmRSS") / 1024
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mb)


def sync(db: str, action: str, url: str, real_limits: bool) -> dict[str, Any]:
    from klaviyo_pipelines import runner
    from klaviyo_pipelines.klaviyo.client import KlaviyoClient
    from klaviyo_pipelines.warehouse.engine import Warehouse
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot

    sampler = RssSampler()
    sampler.start()
    imports_mb = status_kb("VmRSS") / 1024
    wh, config = Warehouse(f"duckdb:///{db}"), config_for(db, action)
    sampler.phase = "snapshot"
    started = time.perf_counter()
    take_snapshot(wh, config.models["shop"], config.path)
    snapshotted = time.perf_counter()
    sampler.phase = "change set"
    diff = runner.prepare_sync

    def prepare_then_deliver(*args: Any, **kwargs: Any) -> Any:
        prepared = diff(*args, **kwargs)
        sampler.phase = "delivery"
        return prepared

    runner.prepare_sync = prepare_then_deliver  # only to tell the phases apart
    after_batch: list[tuple[int, float]] = []  # (rows done, RSS MB) after each batch

    def on_batch(report: Any, _result: Any) -> None:
        done = sum(report.delivered.values()) + sum(report.rejected.values())
        after_batch.append((done, status_kb("VmRSS") / 1024))

    scale = 1.0 if real_limits else TIME_SCALE
    with KlaviyoClient(KEY, base_url=url, time_scale=scale, max_backoff=1.0) as client:
        report = runner.run_sync(config, "first", wh, client, on_batch=on_batch)
    done = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    wh.dispose()
    if report.status != "success":
        raise SystemExit(f"sync failed: {report.error}")
    return {
        "delivered": sum(report.delivered.values()),
        "rejected": sum(report.rejected.values()),
        "requests": report.requests,
        "snapshot_s": snapshotted - started,
        "sync_s": done - snapshotted,
        "imports_mb": imports_mb,
        "phase_mb": sampler.peaks,
        "after_batch": [after_batch[0], after_batch[len(after_batch) // 10], after_batch[-1]],
        "peak_mb": status_kb("VmHWM") / 1024,
        "cpu_s": time.process_time(),
    }


# ---- the parent ------------------------------------------------------------------------------


def child(*args: str) -> list[str]:
    return [sys.executable, __file__, *args]


def measure(action: str, rows: int, real_limits: bool, job_latency: float) -> dict[str, Any]:
    env = {**os.environ, "KLAVIYO_API_KEY": KEY}
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "shop.duckdb")
        clock = time.perf_counter()
        subprocess.run(child("--build", db, "--action", action, "--n", str(rows)), check=True)
        built = time.perf_counter() - clock
        limits = ["--real-limits"] if real_limits else []
        serve_command = child("--serve", "--job-latency", str(job_latency), *limits)
        sandbox = subprocess.Popen(serve_command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            url = sandbox.stdout.readline().strip()  # type: ignore[union-attr]
            done = subprocess.run(
                child("--sync", db, "--action", action, "--url", url, *limits),
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            sandbox_mb = status_kb("VmHWM", sandbox.pid) / 1024
            sandbox_cpu = cpu_seconds(sandbox.pid)
        finally:
            sandbox.terminate()
            sandbox.wait(timeout=30)
        if done.returncode:
            raise SystemExit(f"{rows:,} rows: the sync failed\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.splitlines()[-1])
    return {**result, "rows": rows, "build_s": built, "sandbox_mb": sandbox_mb,
            "sandbox_cpu_s": sandbox_cpu}  # fmt: skip


def report(
    action: str, results: list[dict[str, Any]], real_limits: bool, job_latency: float
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    console.print(f"[bold]First sync memory: {action}, DuckDB, sandbox in another process")
    limits = "Klaviyo's rate limits at time scale 1" if real_limits else "no rate limits"
    console.print(f"{limits}; bulk jobs complete {job_latency:g} s after acceptance")
    load = os.getloadavg()[0]
    console.print(
        f"{len(os.sched_getaffinity(0))} CPUs, load {load:.1f}, {datetime.now():%Y-%m-%d %H:%M}"
    )
    table = Table(
        "rows", "snapshot s", "sync s", "rows/s", "client CPU s", "peak RSS MB",
        "snapshot MB", "change set MB", "delivery MB", "MB / 1M more rows", "sandbox MB",
        "sandbox CPU s",
    )  # fmt: skip
    previous = None
    for r in results:
        growth = ""
        if previous:
            more = (r["rows"] - previous["rows"]) / 1e6
            growth = f"{(r['peak_mb'] - previous['peak_mb']) / more:+.0f}"
        phases = [f"{r['phase_mb'].get(p, 0):.0f}" for p in ("snapshot", "change set", "delivery")]
        table.add_row(
            f"{r['rows']:,}",
            f"{r['snapshot_s']:.1f}",
            f"{r['sync_s']:.1f}",
            f"{r['rows'] / r['sync_s']:,.0f}",
            f"{r['cpu_s']:.0f}",
            f"{r['peak_mb']:.0f}",
            *phases,
            growth,
            f"{r['sandbox_mb']:.0f}",
            f"{r['sandbox_cpu_s']:.0f}",
        )
        previous = r
    console.print(table)
    for r in results:
        console.print(
            f"{r['rows']:,} rows: {r['delivered']:,} delivered, {r['rejected']:,} rejected "
            f"(invalid email or phone), {r['requests']:,} requests; RSS after imports "
            f"{r['imports_mb']:.0f} MB; model built in {r['build_s']:.0f} s (not counted)"
        )
        (first, first_mb), _, (last, last_mb) = r["after_batch"]
        console.print(
            f"  RSS after the first batch {first_mb:.0f} MB ({first:,} rows), after the last "
            f"{last_mb:.0f} MB ({last:,} rows)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--action", choices=list(ACTIONS), default="upsert_profile")
    parser.add_argument(
        "--real-limits", action="store_true", help="Klaviyo's rate limits at time scale 1"
    )
    parser.add_argument(
        "--job-latency", type=float, default=0.0, help="seconds from a job's acceptance to its end"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="DB", help=argparse.SUPPRESS)
    parser.add_argument("--sync", metavar="DB", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.real_limits, args.job_latency)
    elif args.build:
        build(args.build, args.action, args.n)
    elif args.sync:
        print(json.dumps(sync(args.sync, args.action, args.url, args.real_limits)))
    else:
        results = [
            measure(args.action, rows, args.real_limits, args.job_latency)
            for rows in sorted(args.rows)
        ]
        report(args.action, results, args.real_limits, args.job_latency)


if __name__ == "__main__":
    main()
