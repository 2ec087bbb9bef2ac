"""Crash safety: the sync process is killed with SIGKILL at random points, then run again.

The sandbox is served by this test process; the syncs run in a child process (the small entry
`sync_child.py`, and once the real `klaviyo-pipelines sync` command) that is killed either
right after the sandbox received its k-th request (so the request is applied but its answer
never arrives) or after a random delay (snapshot, change set, a commit, ...). After the kills a
last run completes, and Klaviyo, the delivery state and the ledger must be exactly what the
warehouse says: nothing lost, nothing doubled.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.shop import (
    SYNCS,
    assert_exact,
    load_shop,
    make_shop,
    open_warehouse,
    seed_sandbox,
    shop_config_text,
)

REPO = Path(__file__).resolve().parents[1]
ROWS = 6_000
KILLS = 6
CHILD_TIMEOUT = 120.0


def child_env(sandbox: Sandbox) -> dict[str, str]:
    env = {**os.environ, "KLAVIYO_API_KEY": TEST_API_KEY, "KLAVIYO_BASE_URL": sandbox.url}
    env.pop("DAGSTER_HOME", None)
    return env


def start_child(
    config: Path, sandbox: Sandbox, cli: bool, syncs: list[str] | None = None
) -> subprocess.Popen:
    """The CLI runs every sync through Dagster; the small entry runs `syncs` in that order."""
    if cli:
        command = [sys.executable, "-m", "klaviyo_pipelines.cli", "--config", str(config), "sync"]
        command += ["--output", "json"]
    else:
        command = [sys.executable, "-m", "klaviyo_pipelines_tests.sync_child", str(config)]
        command += syncs or list(SYNCS)
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=child_env(sandbox),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(child: subprocess.Popen, sandbox: Sandbox, requests: int | None, delay: float) -> str:
    """SIGKILL the child once the sandbox got `requests` more requests, or after `delay` s.
    Returns where the kill landed, or "finished" if the run ended first."""
    start = len(sandbox.state.requests)
    deadline = time.monotonic() + (CHILD_TIMEOUT if requests is not None else delay)
    while child.poll() is None:
        received = len(sandbox.state.requests) - start
        if (requests is not None and received >= requests) or time.monotonic() >= deadline:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            last = sandbox.state.requests[-1] if sandbox.state.requests else None
            return f"after {received} requests (last {last.method} {last.path})" if last else "0"
        time.sleep(0.002)
    out, err = child.communicate()
    assert child.returncode == 0, out + err[-3000:]  # a run that ended must have succeeded
    return "finished"


def test_sigkill_at_random_points_then_a_rerun_ends_exactly_as_the_warehouse_says(
    every_warehouse_url, tmp_path, capsys
):
    rng = random.Random(int(os.environ.get("KLAVIYO_PIPELINES_CRASH_SEED", "5")))
    with Sandbox(api_key=TEST_API_KEY, time_scale=20.0) as sandbox:
        shop = make_shop(ROWS, seed=11)
        wh = open_warehouse(every_warehouse_url)
        load_shop(wh, shop)
        wh.dispose()  # DuckDB: the children need the file
        seed_sandbox(sandbox, shop)
        config = tmp_path / "shop.yaml"
        config.write_text(shop_config_text(every_warehouse_url, sandbox.url, batch=20))

        landed = []
        for n in range(KILLS):
            by_time = n in (2, 4)  # the others die just after a request reached Klaviyo
            order = rng.sample(SYNCS, len(SYNCS))  # so the kills land in every action
            child = start_child(config, sandbox, cli=n == 1, syncs=order)
            where = kill_when(
                child,
                sandbox,
                requests=None if by_time else rng.randint(2, 40),
                delay=rng.uniform(1.0, 2.0),
            )
            landed.append(where)
        child = start_child(config, sandbox, cli=False)
        out, err = child.communicate(timeout=CHILD_TIMEOUT)
        assert child.returncode == 0, out + err[-3000:]
        wh = open_warehouse(every_warehouse_url)
        counts = assert_exact(sandbox, wh, shop)
        wh.dispose()
        requests = len(sandbox.state.requests)
    assert sum(where != "finished" for where in landed) >= KILLS - 1, landed
    with capsys.disabled():
        print(
            f"\ncrash ({every_warehouse_url.split(':')[0]}): kills {landed}; {requests} requests; {counts}"
        )
