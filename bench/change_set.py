"""How fast do we find what changed in the warehouse, and what does it cost in memory?

Every sync run starts by diffing the model against what Klaviyo already holds. We do it with
set-based SQL inside the warehouse (`take_snapshot` + `prepare_sync`), so that only the changed
rows ever reach Python. This script checks that the design pays off against the obvious
alternative: read the model and the delivered state into pandas, hash every row, merge on key.

Setup, not timed: a model `bench.people` of N rows generated in SQL, one snapshot and change set,
then every row marked delivered in SQL (a completed first sync, each row's JSON kept in the
state as a real sync keeps it). The pandas baseline keeps its own state table, laid out like
ours but holding its own (BIGINT) hashes, as it cannot make ours. The model then changes: 1% of
rows updated, 0.5% deleted, 0.5% added.

Timed, each side doing what a run needs before it can send: the rows to send with their
values, and NULL or duplicated keys held back. Ours: snapshot, key checks, change set (a table
of the rows to send, numbered for paging). Baseline: read the model and the state's keys and
hashes with `pandas.read_sql` (the ordinary way, on any SQLAlchemy URL), hash, find bad keys,
merge, classify, keep the rows to send. Counting the changes alone, as the baseline once did,
left it less to do than ours; reading the state's JSON, which only deletions need, would
give it more. Each phase runs in a fresh interpreter so that its peak RSS is its own; on
PostgreSQL our SQL runs in the server, whose memory the client's RSS does not show.

    python bench/change_set.py [--rows 1000000] [--columns 10] [--warehouse duckdb|postgresql]
    python bench/change_set.py --all    # the table: 1M and 10M rows on DuckDB, 1M on PostgreSQL

The baseline is skipped where its peak RSS (about 1.2 KB per row) would not fit in half the
memory available; the table says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy as sa

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
SYNC = "people_sync"
MODEL = "bench.people"
BASELINE_STATE = "bench.baseline_state"
TYPED_VALUES = {  # SQL of each generated column type, in terms of the row number i
    "int": "CAST((i * {m}) % 1000 AS INTEGER)",
    "double": "CAST(i AS DOUBLE PRECISION) / {m}",
    "text": "CASE WHEN i % 7 = 0 THEN NULL ELSE 'v' || ((i * {m}) % 997) END",
    "ts": "CASE WHEN i % 10 = 0 THEN NULL "
    "ELSE TIMESTAMP '2020-01-01' + ((i * {m}) % 100000) * INTERVAL '1 second' END",
}


def other_columns(columns: int) -> dict[str, str]:
    """Name -> SQL of the columns besides id and email, cycling through the types."""
    kinds = list(TYPED_VALUES)
    return {
        f"c{k}_{kinds[k % len(kinds)]}": TYPED_VALUES[kinds[k % len(kinds)]].format(m=k + 3)
        for k in range(columns - 2)
    }


def people_sql(dialect: str, columns: int, first: int, last: int) -> str:
    series = (
        f"range({first}, {last + 1})"
        if dialect == "duckdb"
        else f"generate_series({first}, {last})"
    )
    values = ", ".join(f"{sql} AS {name}" for name, sql in other_columns(columns).items())
    return f"SELECT i AS id, 'p' || i || '@example.com' AS email, {values} FROM {series} AS t(i)"


def make_config(url: str, columns: int) -> Any:
    """An upsert_profile sync reading every model column, so the row hash covers all of them."""
    from klaviyo_pipelines.config import parse_config

    properties = {name: name for name in other_columns(columns)}
    mapping = {"email": "email", "external_id": "id", "properties": properties}
    text = json.dumps(  # JSON is YAML
        {
            "warehouse": {"url": url},
            "klaviyo": {"api_key": "${KLAVIYO_API_KEY}"},
            "models": {"people": {"table": MODEL, "primary_key": "id"}},
            "syncs": {SYNC: {"model": "people", "action": "upsert_profile", "mapping": mapping}},
        }
    )
    return parse_config(text, "<bench>")


def pandas_hashes(model: Any) -> Any:
    """The baseline's row hash: pandas' own, over every column, as int64 for a BIGINT column."""
    import pandas as pd

    return pd.util.hash_pandas_object(model, index=False).to_numpy().view("int64")


def deliver_first_sync_in_sql(wh: Any, config: Any, rows: int) -> list[str]:
    """Snapshot and change set, then every row recorded delivered in SQL: a completed first
    sync without HTTP. Returns the columns the sync reads."""
    from klaviyo_pipelines.runner import SyncReport, prepare_sync
    from klaviyo_pipelines.warehouse.changes import changes_table
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot
    from klaviyo_pipelines.warehouse.state import state_table

    take_snapshot(wh, config.models["people"], config.path)
    report = SyncReport(sync=SYNC, action="upsert_profile", model="people")
    prepared = prepare_sync(config, SYNC, wh, report, retry_rejected=False)
    assert report.planned == {"added": rows}, report.planned
    with wh.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {wh.table(state_table(SYNC))} (row_key, row_hash, row_json, "
                f"recorded_at) SELECT c._kp_key, c._kp_hash, "
                f"{wh.row_json_sql(prepared.columns, 'c')}, now() "
                f"FROM {wh.table(changes_table(SYNC))} AS c WHERE c._kp_send"
            )
        )
    return prepared.columns


def setup(url: str, rows: int, columns: int, with_baseline: bool) -> None:
    """Model, first sync delivered (ours, and the baseline's if it runs), then the model changes."""
    import pandas as pd

    from klaviyo_pipelines.warehouse.engine import Warehouse

    wh, config = Warehouse(url), make_config(url, columns)
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS bench"))
        conn.execute(sa.text(f"CREATE TABLE {MODEL} AS {people_sql(wh.dialect, columns, 1, rows)}"))
    read = deliver_first_sync_in_sql(wh, config, rows)
    assert len(read) == columns, read  # the hash covers every column
    with wh.engine.begin() as conn:
        if with_baseline:
            model = pd.read_sql(sa.text(f"SELECT * FROM {MODEL}"), conn)
            conn.execute(
                sa.text(
                    f"CREATE TABLE {BASELINE_STATE} (row_key VARCHAR NOT NULL, "
                    "row_hash BIGINT NOT NULL, row_json VARCHAR, partition_key VARCHAR, "
                    "recorded_at TIMESTAMP NOT NULL)"
                )
            )
            stamp = datetime.now()
            wh.bulk_insert(
                conn,
                BASELINE_STATE,
                ["row_key", "row_hash", "recorded_at"],
                zip(
                    model["id"].astype(str),
                    pandas_hashes(model).tolist(),
                    [stamp] * len(model),
                    strict=True,
                ),
            )
            del model
        first = next(iter(other_columns(columns)))
        conn.execute(sa.text(f"UPDATE {MODEL} SET {first} = {first} + 1 WHERE id % 100 = 0"))
        conn.execute(sa.text(f"DELETE FROM {MODEL} WHERE id % 200 = 1"))
        added = people_sql(wh.dialect, columns, rows + 1, rows + rows // 200)
        conn.execute(sa.text(f"INSERT INTO {MODEL} {added}"))
    wh.dispose()


def expected_counts(rows: int) -> dict[str, int]:
    return {"added": rows // 200, "updated": rows // 100, "deleted": (rows + 199) // 200}


def ours(url: str, columns: int) -> dict[str, Any]:
    """The project's own path: snapshot, then the change set in changes__<sync>."""
    from klaviyo_pipelines.runner import SyncReport, prepare_sync
    from klaviyo_pipelines.warehouse.changes import changes_table
    from klaviyo_pipelines.warehouse.engine import Warehouse
    from klaviyo_pipelines.warehouse.snapshot import take_snapshot

    started = time.perf_counter()
    wh, config = Warehouse(url), make_config(url, columns)
    take_snapshot(wh, config.models["people"], config.path)
    snapshotted = time.perf_counter()
    report = SyncReport(sync=SYNC, action="upsert_profile", model="people")
    prepare_sync(config, SYNC, wh, report, retry_rejected=False)
    prepared = time.perf_counter()
    with wh.engine.connect() as conn:  # a check of the table a run reads, not timed
        query = f"SELECT _kp_kind, count(*) FROM {wh.table(changes_table(SYNC))} GROUP BY 1"
        counts = {kind: int(n) for kind, n in conn.execute(sa.text(query)).all()}
    wh.dispose()
    assert counts == report.found, (counts, report.found)
    return {
        "counts": counts,
        "steps": {"take_snapshot": snapshotted - started, "prepare_sync": prepared - snapshotted},
    }


def baseline(url: str, columns: int) -> dict[str, Any]:
    """The naive way: everything into pandas, hash, merge on key, classify."""
    import numpy as np
    import pandas as pd

    started = time.perf_counter()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        model = pd.read_sql(sa.text(f"SELECT * FROM {MODEL}"), conn)
        state = pd.read_sql(sa.text(f"SELECT row_key, row_hash FROM {BASELINE_STATE}"), conn)
    engine.dispose()
    read = time.perf_counter()
    keys = model["id"].astype(str)
    bad = keys.isna() | keys.duplicated(keep=False)  # held back, as ours does
    fresh = pd.DataFrame({"row_key": keys, "new_hash": pandas_hashes(model)})[~bad]
    hashed = time.perf_counter()
    both = fresh.merge(state, on="row_key", how="outer", indicator=True)
    kind = np.select(
        [
            both["_merge"] == "left_only",
            both["_merge"] == "right_only",
            both["new_hash"] != both["row_hash"],
        ],
        ["added", "deleted", "updated"],
        default="",
    )
    sending = set(both["row_key"][np.isin(kind, ["added", "updated"])])
    to_send = model[~bad & keys.isin(sending)]  # the rows to send, with their values
    assert len(to_send) == len(sending)
    counts = {k: int(n) for k, n in pd.Series(kind).value_counts().items() if k}
    return {
        "counts": counts,
        "steps": {
            "read_sql model + state": read - started,
            "hash_pandas_object + keys": hashed - read,
            "merge + classify + rows": time.perf_counter() - hashed,
        },
    }


PHASES = {"ours": ours, "baseline": baseline}
IMPORTS = {"ours": "klaviyo_pipelines.runner", "baseline": "pandas"}


def run_phase(phase: str, url: str, columns: int) -> dict[str, Any]:
    """Run a phase in a fresh interpreter; it reports its times, counts and peak RSS as JSON."""
    command = [sys.executable, __file__, "--phase", phase, "--url", url, "--columns", str(columns)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"phase {phase} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def peak_rss_mb() -> float:
    """VmHWM, this process's own peak. Not ru_maxrss: Linux carries it over fork and exec."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def child(phase: str, url: str, columns: int) -> None:
    importlib.import_module(IMPORTS[phase])
    sa.create_engine(url).dispose()  # imports the database driver
    start_mb = peak_rss_mb()
    result = PHASES[phase](url, columns)
    result["seconds"] = sum(result["steps"].values())
    result["peak_mb"], result["start_mb"] = peak_rss_mb(), start_mb
    print(json.dumps(result))


@contextmanager
def warehouse(kind: str) -> Iterator[str]:
    """A fresh warehouse URL: a DuckDB file in a temp dir, or a new PostgreSQL database."""
    if kind == "duckdb":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"duckdb:///{Path(tmp) / 'warehouse.duckdb'}"
        return
    name = f"kp_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def machine(url: str) -> str:
    """Two lines: the machine and date, then the software versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((ln.split(":")[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln), "?")
    software = [f"Python {platform.python_version()}"]
    software += [f"{name} {version(name)}" for name in ("duckdb", "SQLAlchemy", "pandas")]
    if url.startswith("postgresql"):
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            server = conn.execute(sa.text("SHOW server_version")).scalar()
        software.append(f"PostgreSQL {server.split()[0]}")
        engine.dispose()
    nproc = len(os.sched_getaffinity(0))
    return f"{nproc} CPUs ({cpu}), {datetime.now():%Y-%m-%d %H:%M}\n{', '.join(software)}"


BASELINE_KB_PER_ROW = 1.2  # its peak RSS per model row (10 columns), as measured at 1M


def baseline_skip_reason(rows: int) -> str | None:
    """Why the baseline cannot run here: it would need more than half the available memory."""
    meminfo = Path("/proc/meminfo").read_text()
    available_kb = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE).group(1))
    needed_kb = rows * BASELINE_KB_PER_ROW
    if needed_kb <= available_kb / 2:
        return None
    return (
        f"baseline skipped: needs ~{needed_kb / 2**20:.0f} GB, "
        f"over half of {available_kb / 2**20:.0f} GB available"
    )


def run_case(rows: int, columns: int, kind: str) -> dict[str, Any]:
    """Set up one warehouse, run both phases (the baseline where it fits), check the counts."""
    skipped = baseline_skip_reason(rows)
    phases = [p for p in PHASES if p != "baseline" or skipped is None]
    with warehouse(kind) as url:
        setup(url, rows, columns, with_baseline="baseline" in phases)
        about = machine(url)
        results = {phase: run_phase(phase, url, columns) for phase in phases}
    for phase, result in results.items():
        assert result["counts"] == expected_counts(rows), (phase, result["counts"], rows)
    return {"rows": rows, "warehouse": kind, "about": about, "results": results, "note": skipped}


def report(columns: int, cases: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)  # one row per phase and step, also when piped
    console.print(f"[bold]Change set: {columns} columns; 1% updated, 0.5% added, 0.5% deleted")
    console.print(cases[0]["about"].split("\n")[0])
    console.print(cases[-1]["about"].split("\n")[1])
    table = Table("case", "phase", "seconds", "peak RSS MB", "of which imports MB")
    table.columns[0].no_wrap = table.columns[1].no_wrap = True
    for case in cases:
        name = f"{case['rows'] / 1e6:g}M rows, {case['warehouse']}"
        results = case["results"]
        for phase, result in results.items():
            table.add_row(
                name,
                f"[bold]{phase}",
                f"{result['seconds']:.2f}",
                f"{result['peak_mb']:.0f}",
                f"{result['start_mb']:.0f}",
            )
            for step, seconds in result["steps"].items():
                table.add_row("", f"  {step}", f"{seconds:.2f}", "", "", style="dim")
        if "baseline" in results:
            ours_, base = results["ours"], results["baseline"]
            table.add_row(
                "",
                "[bold]baseline / ours",
                f"{base['seconds'] / ours_['seconds']:.1f}x",
                f"{base['peak_mb'] / ours_['peak_mb']:.1f}x",
                "",
            )
        else:
            table.add_row("", case["note"], "", "", "", style="italic")
        table.add_section()
    console.print(table)
    console.print("Changes found, the same by both: 1% updated, 0.5% added, 0.5% deleted.")
    if any(case["warehouse"] == "postgresql" for case in cases):
        console.print("On PostgreSQL ours runs in the server: its RSS is the client's alone.")


ALL_CASES = [(1_000_000, "duckdb"), (10_000_000, "duckdb"), (1_000_000, "postgresql")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=10, help="at least 3: id, email, others")
    parser.add_argument("--warehouse", choices=["duckdb", "postgresql"], default="duckdb")
    parser.add_argument("--all", action="store_true", help="1M and 10M on DuckDB, 1M on PostgreSQL")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        child(args.phase, args.url, args.columns)
        return
    if args.columns < 3 or args.rows < 200:
        parser.error("need --columns >= 3 and --rows >= 200")
    cases = ALL_CASES if args.all else [(args.rows, args.warehouse)]
    report(args.columns, [run_case(rows, args.columns, kind) for rows, kind in cases])


if __name__ == "__main__":
    main()
