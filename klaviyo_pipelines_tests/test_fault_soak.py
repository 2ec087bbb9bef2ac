"""Fault soak: 20,000 rows through all six actions while the network and Klaviyo misbehave.

The sandbox fails requests at random over real HTTP: 5% answered 500/502/503/504, 2% held past
the client's timeout, 2% reset mid-request, 1% applied and then answered 503 (the client cannot
know it worked), plus bursts of 429s with Retry-After, some longer than the client's attempts.
Each sync is re-run until it succeeds (bounded); then Klaviyo must hold exactly what the
warehouse says, the delivery state must list every row once, and the ledger must be empty.
A second round changes rows and runs again under the same faults.

Default: 20,000 rows per warehouse, under a minute each. `KLAVIYO_PIPELINES_SOAK_ROWS` (and
`KLAVIYO_PIPELINES_SOAK_SEED`) run a larger or different soak.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import timedelta

from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
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

ROWS = int(os.environ.get("KLAVIYO_PIPELINES_SOAK_ROWS", "20000"))
SEED = int(os.environ.get("KLAVIYO_PIPELINES_SOAK_SEED", "20260"))
TIME_SCALE = 20.0  # rate windows and retry backoff 20x shorter; Retry-After is honoured as sent
RATES = {"status": 0.05, "timeout": 0.02, "reset": 0.02, "applied_status": 0.01}
MAX_ATTEMPTS = 4  # per request; a burst of 4 429s outlasts them and fails the run
WRITES = (
    ("POST", "/api/profile-bulk-import-jobs"),
    ("POST", "/api/event-bulk-create-jobs"),
    ("POST", "/api/profile-subscription-bulk-create-jobs"),
    ("POST", "/api/profile-subscription-bulk-delete-jobs"),
    ("DELETE", "/api/lists/"),
)
MAX_RUNS = 25  # per sync and round: each failed run commits what it confirmed, so this bounds


class Bursts:
    """Every `every` batches, queue a burst of 429s: alternately 2 (the client's retries absorb
    it) and MAX_ATTEMPTS (the run fails and the next run resends what was not confirmed)."""

    def __init__(self, sandbox: Sandbox, every: int = 15) -> None:
        self.sandbox, self.every, self.batches, self.queued = sandbox, every, 0, 0

    def __call__(self, report: SyncReport, result: object) -> None:
        self.batches += 1
        if self.batches % self.every == 0:
            self.queued += 1
            count = 2 if self.queued % 2 else MAX_ATTEMPTS
            self.sandbox.faults.add(Fault(kind="rate_limit", count=count, retry_after=0.05))


def run_until_success(config, wh, sandbox, bursts: Bursts) -> dict[str, int]:
    """Run every sync until it succeeds; return how many runs each took."""
    runs: Counter[str] = Counter()
    for model in config.models.values():
        take_snapshot(wh, model, config.path)
    with KlaviyoClient(
        TEST_API_KEY,
        base_url=sandbox.url,
        time_scale=TIME_SCALE,
        timeout=0.5,
        max_attempts=MAX_ATTEMPTS,
        max_backoff=2.0,
    ) as client:
        for sync in SYNCS:
            for _ in range(MAX_RUNS):
                runs[sync] += 1
                report = run_sync(config, sync, wh, client, on_batch=bursts)
                if report.status == "success":
                    break
                assert report.error_is_transient, report.error  # only faults may fail a run
            else:
                raise AssertionError(f"{sync} did not succeed in {MAX_RUNS} runs")
    return dict(runs)


def test_a_20000_row_sync_under_random_faults_ends_exactly_as_the_warehouse_says(
    every_warehouse_url, capsys
):
    started = time.monotonic()
    with Sandbox(api_key=TEST_API_KEY, time_scale=TIME_SCALE) as sandbox:
        wh = open_warehouse(every_warehouse_url)
        shop = make_shop(ROWS, seed=SEED)
        load_shop(wh, shop)
        seed_sandbox(sandbox, shop)
        config = parse_config(shop_config_text(every_warehouse_url, sandbox.url), "shop.yaml")
        for method, path in WRITES:  # each action's write is applied-but-failed at least once
            sandbox.faults.add(Fault(kind="applied_status", method=method, path_prefix=path))
        sandbox.faults.random(rates=RATES, seed=SEED, delay=1.0)
        bursts = Bursts(sandbox)

        first = run_until_success(config, wh, sandbox, bursts)
        first_counts = assert_exact(sandbox, wh, shop) | {"total": shop.rows}
        # The queued applied-but-failed writes all fired. (A 429 burst queued after the last
        # batch may rightly wait: no request came after it.)
        assert not [f for f in sandbox.faults.pending if f.kind == "applied_status"]

        # Round two: a tenth of the customers change, new views and orders arrive.
        for i in range(0, len(shop.customers), 10):
            customer = shop.customers[i]
            shop.customers[i] = (*customer[:3], customer[3] + " Jr", customer[4] + 1)
        n_views, n_orders = len(shop.page_views), len(shop.orders)
        shop.page_views += [
            (f"v{n_views + i:06d}", row[1], row[2] + "?again", row[3] + timedelta(hours=1))
            for i, row in enumerate(shop.page_views[: ROWS // 40])
        ]
        shop.orders += [
            (f"o{n_orders + i:06d}", row[1], row[2], row[3] + timedelta(hours=2), row[4])
            for i, row in enumerate(shop.orders[: ROWS // 100])
        ]
        load_shop(wh, shop)
        second = run_until_success(config, wh, sandbox, bursts)
        counts = assert_exact(sandbox, wh, shop)

        fired = dict(sandbox.faults.fired)
        requests = len(sandbox.state.requests)
        wh.dispose()
    elapsed = time.monotonic() - started
    assert all(fired.get(kind, 0) > 0 for kind in (*RATES, "rate_limit")), fired
    assert sum(first.values()) > len(SYNCS)  # some run failed on a burst and was run again
    with capsys.disabled():
        figures = {
            "warehouse": every_warehouse_url.split(":")[0],
            "rows": first_counts,
            "round_two": counts | {"total": shop.rows},
            "requests": requests,
            "faults": fired,
            "runs": {"first": first, "second": second},
            "seconds": round(elapsed, 1),
        }
        print("\nsoak:", json.dumps(figures))
