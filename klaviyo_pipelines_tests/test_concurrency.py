"""Two runs of one sync at the same moment: the second is refused, nothing is sent twice.

Threads in one process meet the process-wide lock; processes meet PostgreSQL's advisory lock or
the DuckDB file's flock. A lock held by a process that is then killed is released at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from klaviyo_pipelines.cli import main
from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, plan_sync, run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.lock import SyncLocked, sync_lock
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import delivered_count, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.shop import (
    load_shop,
    make_shop,
    open_warehouse,
    seed_sandbox,
    shop_config_text,
)

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "/api/profile-bulk-import-jobs"
PAUSE = ("--pause", "--no-snapshot")  # the child stops after its first batch, lock held


def setup_shop(url: str, sandbox: Sandbox, rows: int = 1_000, batch: int = 50):
    wh = open_warehouse(url)
    shop = make_shop(rows)
    load_shop(wh, shop)
    seed_sandbox(sandbox, shop)
    config = parse_config(shop_config_text(url, sandbox.url, batch=batch), "shop.yaml")
    for model in config.models.values():
        take_snapshot(wh, model, config.path)
    return wh, shop, config


def client(sandbox: Sandbox) -> KlaviyoClient:
    return KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.05)


def profiles_sent(sandbox: Sandbox) -> int:
    return sum(r.items for r in sandbox.state.requests if r.method == "POST" and r.path == IMPORTS)


def test_a_second_run_is_refused_while_the_first_holds_the_sync(
    every_warehouse_url, sandbox, tmp_path, capsys
):
    wh, shop, config = setup_shop(every_warehouse_url, sandbox)
    paused, resume = threading.Event(), threading.Event()
    reports: list[SyncReport] = []

    def pause(report: SyncReport, result: object) -> None:
        if not paused.is_set():
            paused.set()
            resume.wait(30)

    def first() -> None:
        with client(sandbox) as c:
            reports.append(run_sync(config, "profiles", wh, c, on_batch=pause))

    thread = threading.Thread(target=first)
    thread.start()
    assert paused.wait(30)
    sent = len(sandbox.state.requests)
    with client(sandbox) as c, pytest.raises(SyncLocked) as refused:
        run_sync(config, "profiles", wh, c)
    assert "sync 'profiles' is already running (another run in this process)" in str(refused.value)
    assert "this run did nothing" in str(refused.value)
    with pytest.raises(SyncLocked):
        plan_sync(config, "profiles", wh)  # a plan would rewrite the change set being read
    path = tmp_path / "shop.yaml"
    path.write_text(shop_config_text(every_warehouse_url, sandbox.url, batch=50))
    plan = ["--config", str(path), "plan", "--select", "profiles", "--output", "json"]
    capsys.readouterr()
    assert main(plan) == 1
    assert "is already running" in json.loads(capsys.readouterr().out)["error"]
    assert len(sandbox.state.requests) == sent  # the refused runs sent nothing
    with client(sandbox) as c:  # another sync is not held up
        assert run_sync(config, "optouts", wh, c).status == "success"
    resume.set()
    thread.join(60)

    assert reports[0].status == "success"
    assert sum(reports[0].delivered.values()) == len(shop.customers)
    assert profiles_sent(sandbox) == len(shop.customers)  # every row sent exactly once
    assert delivered_count(wh, "profiles") == len(shop.customers)
    assert ledger_entries(wh, "profiles") == []
    with client(sandbox) as c:
        assert run_sync(config, "profiles", wh, c).requests == 0  # the lock was released
    wh.dispose()


def test_racing_threads_send_each_row_once(every_warehouse_url, sandbox):
    wh, shop, config = setup_shop(every_warehouse_url, sandbox)
    gate = threading.Barrier(3)
    outcomes: list[str] = []

    def race() -> None:
        with client(sandbox) as c:
            gate.wait()
            try:
                outcomes.append(run_sync(config, "profiles", wh, c).status)
            except SyncLocked:
                outcomes.append("refused")

    threads = [threading.Thread(target=race) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["refused", "refused", "success"]
    assert profiles_sent(sandbox) == len(shop.customers)
    assert delivered_count(wh, "profiles") == len(shop.customers)
    wh.dispose()


def test_a_run_in_another_process_holds_the_sync_until_it_ends_or_dies(
    every_warehouse_url, sandbox, tmp_path
):
    """On PostgreSQL the advisory lock, on DuckDB the file lock; a SIGKILL releases either."""
    wh, shop, config = setup_shop(every_warehouse_url, sandbox)
    wh.dispose()
    path = tmp_path / "shop.yaml"
    path.write_text(shop_config_text(every_warehouse_url, sandbox.url, batch=50))
    child = subprocess.Popen(
        [sys.executable, "-m", "klaviyo_pipelines_tests.sync_child", str(path), "profiles", *PAUSE],
        cwd=REPO,
        env={**os.environ, "KLAVIYO_API_KEY": TEST_API_KEY},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "paused"  # one batch sent, lock held
        sent = profiles_sent(sandbox)
        assert sent == 50
        wh = open_warehouse(every_warehouse_url)
        with client(sandbox) as c, pytest.raises(SyncLocked) as refused:
            run_sync(config, "profiles", wh, c)
        holder = {
            "postgresql": "lock held by PostgreSQL backend",
            "mysql": "lock held by MySQL connection",
        }.get(wh.dialect, f"process {child.pid} holds")
        assert holder in str(refused.value)
        assert profiles_sent(sandbox) == sent
    finally:
        os.kill(child.pid, signal.SIGKILL)  # dies holding the lock, mid-run
        child.wait()
    with client(sandbox) as c:
        deadline = time.monotonic() + 10
        while True:  # PostgreSQL ends the dead session's backend within moments
            try:
                report = run_sync(config, "profiles", wh, c)
                break
            except SyncLocked:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    assert report.status == "success"
    assert sum(report.delivered.values()) == len(shop.customers) - sent  # the rest, not more
    assert profiles_sent(sandbox) == len(shop.customers)
    assert delivered_count(wh, "profiles") == len(shop.customers)
    wh.dispose()


def test_the_lock_can_be_waited_for_and_days_of_a_sync_run_side_by_side(every_warehouse_url):
    wh = open_warehouse(every_warehouse_url)
    held = threading.Event()

    def hold() -> None:
        with sync_lock(wh, "orders"):
            held.set()
            time.sleep(0.3)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    with pytest.raises(SyncLocked), sync_lock(wh, "orders"):
        pass
    started = time.monotonic()
    with sync_lock(wh, "orders", wait=5):
        waited = time.monotonic() - started
    thread.join()
    assert 0.1 < waited < 2

    with (
        sync_lock(wh, "orders", "2026-11-01"),
        sync_lock(wh, "orders", "2026-11-02"),
        pytest.raises(SyncLocked, match="sync 'orders' for partition '2026-11-01'"),
        sync_lock(wh, "orders", "2026-11-01"),
    ):
        pass
    wh.dispose()


def test_a_duckdb_file_another_process_holds_is_waited_for(tmp_path) -> None:
    """A sensor tick reading the file while a run writes (each its own process) must not fail
    either: DuckDB refuses a second process at once, so our connection waits its turn."""
    path = tmp_path / "warehouse.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
            "c.execute('CREATE TABLE t AS SELECT 42 AS x'); print('held', flush=True); "
            "time.sleep(1.5); c.close()",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        wh = Warehouse(f"duckdb:///{path}")
        started = time.monotonic()
        with wh.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT x FROM t").scalar() == 42
        waited = time.monotonic() - started
        wh.dispose()
    finally:
        holder.wait(timeout=30)
    assert 0.3 < waited < 30, f"waited {waited:.2f} s for the other process to let go"


def _another_process_opens(path: Path) -> bool:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; duckdb.connect(sys.argv[1]).close()",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0 or "lock" in probe.stderr, probe.stderr
    return probe.returncode == 0


def test_a_delivery_holding_the_duckdb_file_lets_it_go_to_wait_and_at_the_end(
    tmp_path, monkeypatch
) -> None:
    """A run keeps the file open between its transactions (cheaper ones), but others still get
    turns: when the run waits, after DUCKDB_HOLD_SECONDS, and for good when delivery ends."""
    path = tmp_path / "warehouse.duckdb"
    wh = Warehouse(f"duckdb:///{path}")

    def transaction() -> None:
        with wh.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t AS SELECT 1 AS x")

    transaction()
    assert _another_process_opens(path)  # no hold outside a delivery
    with wh.holding_file():
        transaction()
        assert not _another_process_opens(path)  # held between transactions
        wh.let_go()  # what the runner does before waiting for a batch
        assert _another_process_opens(path)
        transaction()
        assert not _another_process_opens(path)  # held again by the next transaction
        monkeypatch.setattr("klaviyo_pipelines.warehouse.engine.DUCKDB_HOLD_SECONDS", 0.0)
        transaction()  # held longer than DUCKDB_HOLD_SECONDS: let go when it ends
        assert _another_process_opens(path)
        monkeypatch.undo()
        transaction()
    assert _another_process_opens(path)
    wh.dispose()


def test_a_held_duckdb_file_is_checkpointed_when_let_go_not_every_16_mb(tmp_path) -> None:
    """A delivery commits state batch after batch while it holds the file: DuckDB's default
    checkpoint after each 16 MB of log came several times a hold (bench/delivery.py: 6 to 32%
    of a million-profile sync's rate); the file is checkpointed when it is let go."""
    path = tmp_path / "warehouse.duckdb"
    log = Path(f"{path}.wal")
    wh = Warehouse(f"duckdb:///{path}")
    with wh.holding_file():
        for _ in range(4):  # about 5.4 MB of log each
            with wh.engine.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (s VARCHAR)")
                conn.exec_driver_sql(
                    "INSERT INTO t SELECT repeat('x', 100) || i FROM range(50000) AS r(i)"
                )
        assert log.stat().st_size > 16 * 2**20
        wh.let_go()
        assert not log.exists()
    with wh.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 200_000
    wh.dispose()
