"""How many rows per second can one core turn into Klaviyo requests?

The client must never be what limits a sync. This times the real action code on a shop's rows
(`shop_data.py`), page by page as the runner calls it: `prepare` (map, validate, serialise)
for each row, `batches` (pack by count and bytes), `request_body` per batch, and, listed
apart, the `row_json` the runner stores for each delivered row. Single-threaded.

Each implementation runs in a fresh interpreter per scenario: this checkout, and a baseline
revision (default `main`) extracted with `git archive`, so both are timed in the same run on
the same rows. Both must produce the same payloads (compared as parsed JSON) and reject the
same rows with the same field and reason, else the script fails.

Times are CPU time of the thread (other processes on a shared machine do not count), and
each implementation's fastest of `--repeat` runs is shown, the runs alternating. Rows are read
from an in-memory DuckDB a page at a time and are not timed; peak RSS is the worker's own
(VmHWM), the DuckDB table of rows included.

    python bench/client_cpu.py [--rows 100000] [--repeat 3] [--baseline REV] [--scenario NAME ...]
    python bench/client_cpu.py --profile upsert_profile     # cProfile of this checkout
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import platform
import pstats
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import shop_data

REPO = Path(__file__).resolve().parent.parent
BEFORE = "bb369e2"  # the phone validation before its fast path (issue #15)


@dataclass(frozen=True)
class Scenario:
    about: str
    action: str
    model_sql: Callable[[int], str]
    mapping: dict[str, Any]
    settings: dict[str, Any]


SCENARIOS = {
    "upsert_profile": Scenario(
        "profiles, 40% with a phone (all distinct), 7 properties",
        "upsert_profile",
        shop_data.customers_sql,
        shop_data.PROFILE_MAPPING,
        {"batch": True},
    ),
    "upsert_profile_all_phones": Scenario(
        "worst case: every profile has a phone, all distinct",
        "upsert_profile",
        lambda rows: shop_data.customers_sql(rows, phone_percent=100),
        shop_data.PROFILE_MAPPING,
        {"batch": True},
    ),
    "upsert_profile_no_phone": Scenario(
        "profiles, phone not mapped",
        "upsert_profile",
        shop_data.customers_sql,
        {**shop_data.PROFILE_MAPPING, "phone_number": None},
        {"batch": True},
    ),
    "track_event": Scenario(
        "events, 20 per customer (identifiers repeat), 40% with a phone",
        "track_event",
        shop_data.events_sql,
        shop_data.EVENT_MAPPING,
        {"batch": True},
    ),
    "order_completed": Scenario(
        "orders of 1-4 products (a JSON column), 4 per customer",
        "order_completed",
        shop_data.orders_sql,
        shop_data.ORDER_MAPPING,
        {"batch": True},
    ),
}
STAGES = ("prepare", "batches", "request_body")


# ---- the worker: one implementation, one scenario, in its own interpreter ------------------


def peak_rss_mb() -> float:
    """VmHWM, this process's own peak (ru_maxrss would carry the parent's over fork/exec)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def build_action(scenario: Scenario, columns: list[str]) -> Any:
    from klaviyo_pipelines.actions.factory import build_action as build
    from klaviyo_pipelines.config import parse_config

    mapping = {k: v for k, v in scenario.mapping.items() if v is not None}
    text = json.dumps(  # JSON is YAML
        {
            "warehouse": {"url": "duckdb:///:memory:"},
            "klaviyo": {"api_key": "${KLAVIYO_API_KEY}"},
            "models": {"shop": {"table": "shop", "primary_key": "id"}},
            "syncs": {
                "bench": {
                    "model": "shop",
                    "action": scenario.action,
                    "mapping": mapping,
                    "settings": scenario.settings,
                }
            },
        }
    )
    config = parse_config(text, "<bench>")
    return build(config.syncs["bench"], columns, config.path)


def pages(con: Any, columns: list[str], page_size: int) -> Iterator[list[Any]]:
    """Change rows as `iter_changes` makes them: key, kind, hash, the read columns' values."""
    from klaviyo_pipelines.actions.registry import ChangeKind
    from klaviyo_pipelines.warehouse.changes import ChangeRow

    names = ", ".join(columns)
    cursor = con.execute(f"SELECT CAST(id AS VARCHAR), {names} FROM shop ORDER BY id")
    while rows := cursor.fetchmany(page_size):
        yield [
            ChangeRow(
                key=row[0],
                kind=ChangeKind.ADDED,
                row_hash="h",
                values=dict(zip(columns, row[1:], strict=True)),
            )
            for row in rows
        ]


def canonical(body: bytes) -> bytes:
    return json.dumps(json.loads(body), sort_keys=True).encode()


def work(scenario_name: str, rows: int) -> dict[str, Any]:
    """Time the stages over every page; digest the output so implementations can be compared."""
    import duckdb

    from klaviyo_pipelines.actions.profile import InvalidRow
    from klaviyo_pipelines.actions.values import dumps, json_value

    scenario = SCENARIOS[scenario_name]
    con = duckdb.connect()
    con.execute(f"CREATE TABLE shop AS {scenario.model_sql(rows)}")
    model_columns = [d[0] for d in con.execute("SELECT * FROM shop LIMIT 0").description]
    action = build_action(scenario, model_columns)
    read = sorted(action.columns)
    seconds = dict.fromkeys((*STAGES, "row_json"), 0.0)
    counts = {"rows": 0, "rejected": 0, "requests": 0, "request_bytes": 0}
    payloads, rejections = hashlib.sha256(), hashlib.sha256()
    clock = time.thread_time  # CPU time: other processes on the machine do not count
    for page in pages(con, read, action.batch_size):
        started = clock()
        page = action.enrich(None, page)  # no line-items model: the page comes back as is
        items, invalid = [], []
        for row in page:
            try:
                items.append(action.prepare(row))
            except InvalidRow as exc:
                invalid.append((row.key, exc.field, exc.reason))
        prepared = clock()
        batches = list(action.batches(items))
        packed = clock()
        bodies = [action.request_body(batch) for batch in batches]
        serialised = clock()
        for item in items:
            dumps(json_value(item.row.values))
        stored = clock()
        seconds["prepare"] += prepared - started
        seconds["batches"] += packed - prepared
        seconds["request_body"] += serialised - packed
        seconds["row_json"] += stored - serialised
        counts["rows"] += len(page)
        counts["rejected"] += len(invalid)
        counts["requests"] += len(bodies)
        counts["request_bytes"] += sum(map(len, bodies))
        for body in bodies:
            payloads.update(canonical(body))
        rejections.update(json.dumps(invalid).encode())
    return {
        "seconds": seconds,
        "counts": counts,
        "payloads": payloads.hexdigest(),
        "rejections": rejections.hexdigest(),
        "peak_mb": peak_rss_mb(),
    }


def profile(scenario_name: str, rows: int) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(work, scenario_name, rows)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


# ---- the parent: run each implementation and scenario, compare, print -----------------------


def extract(revision: str, into: Path) -> Path:
    """The package as it was at `revision`, to import instead of this checkout's."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "klaviyo_pipelines"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_worker(code: Path, scenario: str, rows: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{Path(__file__).parent}"}
    command = [sys.executable, __file__, "--worker", scenario, "--rows", str(rows)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"{scenario} with {code} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(codes: dict[str, Path], scenario: str, rows: int, repeat: int) -> dict[str, Any]:
    """Each implementation's fastest of `repeat` runs, alternating them so both see the same
    background load (the machine is shared; the fastest run is the least disturbed)."""
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in codes}
    for _ in range(repeat):
        for impl, code in codes.items():
            runs[impl].append(run_worker(code, scenario, rows))
    return {impl: min(found, key=client_seconds) for impl, found in runs.items()}


def client_seconds(result: dict[str, Any]) -> float:
    return sum(result["seconds"][stage] for stage in STAGES)


def machine() -> str:
    from importlib.metadata import version

    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((ln.split(":")[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln), "?")
    software = [f"Python {platform.python_version()}"]
    for name in ("phonenumbers", "orjson", "duckdb"):
        try:
            software.append(f"{name} {version(name)}")
        except Exception:  # not installed (the baseline needs no orjson)
            continue
    load = os.getloadavg()[0]
    return (
        f"{len(os.sched_getaffinity(0))} CPUs ({cpu}), load {load:.1f}, "
        f"{datetime.now():%Y-%m-%d %H:%M}\n{', '.join(software)}"
    )


def report(
    rows: int, repeat: int, baseline: str, results: dict[str, dict[str, dict[str, Any]]]
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    console.print(
        f"[bold]Client CPU: {rows:,} rows per scenario, one core, fastest of {repeat} runs, "
        f"baseline {baseline}"
    )
    console.print(machine())
    table = Table(
        "scenario", "impl", *STAGES, "µs/row", "rows/s", "row_json", "peak RSS MB", "speed-up"
    )
    for name, by_impl in results.items():
        for impl, result in by_impl.items():
            n = result["counts"]["rows"]
            per_row = {k: v / n * 1e6 for k, v in result["seconds"].items()}
            total = sum(per_row[s] for s in STAGES)
            base = by_impl.get("baseline")
            speedup = ""
            if base and impl != "baseline":
                base_total = sum(base["seconds"][s] for s in STAGES) / n * 1e6
                speedup = f"{base_total / total:.2f}x"
            table.add_row(
                name if impl == next(iter(by_impl)) else "",
                impl,
                *[f"{per_row[s]:.1f}" for s in STAGES],
                f"{total:.1f}",
                f"{1e6 / total:,.0f}",
                f"{per_row['row_json']:.1f}",
                f"{result['peak_mb']:.0f}",
                speedup,
            )
    console.print(table)
    console.print(
        "CPU µs per row (thread time) by stage; rows/s = 1e6 / µs/row, the three stages. "
        "row_json: µs/row the runner spends storing each delivered row, not in the total."
    )
    for name, by_impl in results.items():
        counts = next(iter(by_impl.values()))["counts"]
        console.print(
            f"{name}: {SCENARIOS[name].about}; {counts['rejected']:,} rejected, "
            f"{counts['requests']:,} requests, {counts['request_bytes'] / counts['rows']:.0f} "
            "request bytes/row"
        )
    if any(len(by_impl) > 1 for by_impl in results.values()):
        console.print("Payloads and rejections (row, field, reason): identical in every scenario.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs each; the fastest counts")
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--baseline", default=BEFORE, help="git revision; 'none' to skip")
    parser.add_argument("--profile", choices=list(SCENARIOS), help="cProfile this checkout")
    parser.add_argument("--worker", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(args.worker, args.rows)))
        return
    if args.profile:
        sys.path.insert(0, str(REPO))
        profile(args.profile, args.rows)
        return
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"this": REPO}
        if args.baseline != "none":
            codes = {"baseline": extract(args.baseline, Path(tmp)), **codes}
        results = {name: measure(codes, name, args.rows, args.repeat) for name in args.scenario}
    for name, by_impl in results.items():
        outputs = {(r["payloads"], r["rejections"], r["counts"]["rows"]) for r in by_impl.values()}
        if len(outputs) > 1:
            sys.exit(f"{name}: the implementations' payloads or rejections differ")
    report(args.rows, args.repeat, args.baseline, results)


if __name__ == "__main__":
    main()
