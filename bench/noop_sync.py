"""Does a second sync of an unchanged model cost nothing, end to end through Dagster?

A sync scheduled every few minutes mostly finds nothing to send; such a run must send no
request and finish in seconds, whatever the model's size.

Setup: a model of N rows (10 columns) on DuckDB, the Klaviyo sandbox on loopback (real HTTP)
with its API key in `KLAVIYO_API_KEY`, and a first sync whose rows are marked delivered in
SQL, as bench/change_set.py does: snapshot, change set, then the state written from it, with
no HTTP (timing the emulator's import of N profiles would not measure us).

Timed, in a fresh interpreter so that its peak RSS is its own: `materialize_syncs`, the CLI's
path through Dagster (`dagster.materialize` of the snapshot asset and the sync asset, in
process, on an ephemeral instance), from calling it to its report; and the interpreter's
whole run, imports included. Requests sent are read three ways: the sync's report, its
Dagster materialization metadata, and the sandbox's own request log. All must be 0.

    python bench/noop_sync.py [--rows 1000000]
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

import sqlalchemy as sa
from change_set import (
    SYNC,
    deliver_first_sync_in_sql,
    machine,
    other_columns,
    peak_rss_mb,
    people_sql,
)

API_KEY = "pk_bench_0123456789abcdef0123456789abcdef"


def make_config(url: str, base_url: str) -> Any:
    """An upsert_profile sync reading every model column, against the sandbox."""
    from klaviyo_pipelines.config import parse_config

    properties = {name: name for name in other_columns(10)}
    text = json.dumps(  # JSON is YAML
        {
            "warehouse": {"url": url},
            "klaviyo": {"api_key": "${KLAVIYO_API_KEY}", "base_url": base_url},
            "models": {"people": {"table": "bench.people", "primary_key": "id"}},
            "syncs": {
                SYNC: {
                    "model": "people",
                    "action": "upsert_profile",
                    "mapping": {"email": "email", "external_id": "id", "properties": properties},
                }
            },
        }
    )
    return parse_config(text, "<bench>")


def first_sync(url: str, base_url: str, rows: int) -> dict[str, Any]:
    """Model, snapshot and change set, then every row marked delivered in SQL (no HTTP)."""
    from klaviyo_pipelines.warehouse.engine import Warehouse

    wh, config = Warehouse(url), make_config(url, base_url)
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS bench"))
        conn.execute(sa.text(f"CREATE TABLE bench.people AS {people_sql(wh.sql, 10, 1, rows)}"))
    started = time.perf_counter()
    deliver_first_sync_in_sql(wh, config, rows)
    seconds = time.perf_counter() - started
    wh.dispose()
    return {"seconds": seconds, "peak_mb": peak_rss_mb()}


def noop_run(url: str, base_url: str) -> dict[str, Any]:
    """The second run, through Dagster; what it reports and what it cost."""
    import dagster as dg

    from klaviyo_pipelines.dagster_defs.assets import sync_key
    from klaviyo_pipelines.dagster_defs.execution import materialize_syncs

    imported = time.perf_counter()
    config = make_config(url, base_url)
    with dg.DagsterInstance.ephemeral() as instance:
        started = time.perf_counter()
        report = materialize_syncs(config, [SYNC], instance=instance)[SYNC]
        seconds = time.perf_counter() - started
        event = instance.get_latest_materialization_event(sync_key(SYNC))
        assert event is not None and event.asset_materialization is not None
        metadata = event.asset_materialization.metadata
    return {
        "seconds": seconds,
        "imports_seconds": imported - START,
        "status": report["status"],
        "found": report.get("found"),
        "report_requests": report["requests"],
        "metadata_requests": metadata["klaviyo/requests"].value,
        "peak_mb": peak_rss_mb(),
    }


START = time.perf_counter()
PHASES = {"first": first_sync, "noop": noop_run}


def run_phase(phase: str, url: str, base_url: str, rows: int) -> dict[str, Any]:
    """A phase in a fresh interpreter, timed from its start to its exit."""
    command = [sys.executable, __file__, "--phase", phase, "--url", url, "--base-url", base_url]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--rows", str(rows)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"phase {phase} failed:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def report(rows: int, about: str, first: dict[str, Any], noop: dict[str, Any], log: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    console.print(f"[bold]No-op sync: {rows:,} unchanged rows x 10 columns on DuckDB, via Dagster")
    console.print(about)
    table = Table("run", "seconds", "peak RSS MB", "requests")
    table.add_row(
        "first sync (snapshot + change set, delivery marked in SQL, no HTTP)",
        f"{first['seconds']:.2f}",
        f"{first['peak_mb']:.0f}",
        "0 (none made)",
    )
    table.add_row(
        "[bold]second run, materialize_syncs (snapshot + sync assets)",
        f"{noop['seconds']:.2f}",
        f"{noop['peak_mb']:.0f}",
        f"report {noop['report_requests']}, metadata {noop['metadata_requests']}, sandbox {log}",
    )
    table.add_row(
        "  the same, whole interpreter: start, imports, run, exit",
        f"{noop['process_seconds']:.2f}",
        "",
        "",
        style="dim",
    )
    table.add_row(
        "  of which Python + Dagster imports", f"{noop['imports_seconds']:.2f}", "", "", style="dim"
    )
    console.print(table)
    console.print(f"Second run: status {noop['status']}, changes found {noop['found'] or 'none'}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "first":
        print(json.dumps(first_sync(args.url, args.base_url, args.rows)))
        return
    if args.phase == "noop":
        print(json.dumps(noop_run(args.url, args.base_url)))
        return
    from klaviyo_pipelines.sandbox import Sandbox

    os.environ["KLAVIYO_API_KEY"] = API_KEY  # the children inherit it; Dagster reads it
    with tempfile.TemporaryDirectory() as tmp, Sandbox(api_key=API_KEY, port=0) as sandbox:
        url = f"duckdb:///{Path(tmp) / 'warehouse.duckdb'}"
        first = run_phase("first", url, sandbox.url, args.rows)
        before = len(sandbox.state.requests)
        noop = run_phase("noop", url, sandbox.url, args.rows)
        log = len(sandbox.state.requests) - before
        about = machine(url)
    assert noop["status"] == "success", noop
    assert noop["report_requests"] == noop["metadata_requests"] == log == 0, (noop, log)
    report(args.rows, about, first, noop, log)


if __name__ == "__main__":
    main()
