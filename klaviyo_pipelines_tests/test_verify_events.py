"""verify for Track Event and Order Completed: Klaviyo's API cannot find an event by its
unique_id, so each day's count per metric is compared with the delivered rows'. An event
deleted in the sandbox behind the project's back is found as its day's shortfall; --repair plus
the next sync restores exactly the delivered events (Klaviyo drops the resent ones it has)."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.events import derived_unique_id
from klaviyo_pipelines.config import Config, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.errors import PermanentError
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.sandbox_runs import sync, verify

DAY1, DAY2 = datetime(2024, 5, 1, 9, 30), datetime(2024, 5, 2, 23, 59, 59)


def config_for(url: str, sandbox: Sandbox) -> Config:
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  views: {{sql: "select * from shop.views", primary_key: view_id}}
  orders: {{sql: "select * from shop.orders", primary_key: order_id}}
syncs:
  views:
    model: views
    action: track_event
    mapping: {{email: email, time: viewed_at, properties: {{sku: sku}}}}
    settings: {{metric_name: Viewed Product}}
  views_undated:
    model: views
    action: track_event
    mapping: {{email: email, properties: {{sku: sku}}}}
    settings: {{metric_name: Viewed Now}}
  orders:
    model: orders
    action: order_completed
    mapping: {{email: email, time: placed_at, value: total, products: products}}
""",
        "test.yaml",
    )


def load_views(wh: Warehouse) -> None:
    rows = [
        (f"v{i:02d}", f"viewer{i % 4}@example.com", DAY1 if i < 6 else DAY2, f"SKU-{i}")
        for i in range(10)
    ]
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.views"))
        conn.execute(
            sa.text(
                "CREATE TABLE shop.views (view_id VARCHAR, email VARCHAR, viewed_at TIMESTAMP, "
                "sku VARCHAR)"
            )
        )
        wh.bulk_insert(conn, "shop.views", ["view_id", "email", "viewed_at", "sku"], rows)


def load_orders(wh: Warehouse) -> None:
    products = json.dumps([{"sku": "A", "price": 5}, {"sku": "B", "price": 7}])
    rows = [(f"o{i}", f"buyer{i}@example.com", DAY1, 12, products) for i in range(3)]
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text("DROP TABLE IF EXISTS shop.orders"))
        conn.execute(
            sa.text(
                "CREATE TABLE shop.orders (order_id VARCHAR, email VARCHAR, placed_at TIMESTAMP, "
                "total INTEGER, products VARCHAR)"
            )
        )
        columns = ["order_id", "email", "placed_at", "total", "products"]
        wh.bulk_insert(conn, "shop.orders", columns, rows)


def unique_ids(sandbox: Sandbox, metric: str) -> list[str]:
    return sorted(e.unique_id or "" for e in sandbox.state.events if e.metric == metric)


def test_a_deleted_event_is_its_days_shortfall_and_repair_restores_it(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load_views(wh)
    config = config_for(warehouse_url, sandbox)
    assert sync(config, wh, sandbox, "views").status == "success"
    namespace = config.syncs["views"].identity
    delivered = sorted(derived_unique_id(namespace, f"v{i:02d}") for i in range(10))
    assert unique_ids(sandbox, "Viewed Product") == delivered

    clean = verify(config, wh, sandbox, "views")
    assert (clean.delivered, clean.checked, clean.in_step) == (10, 10, 10)
    assert not clean.drifted and not clean.samples

    state = sandbox.state
    assert state.delete_events("Viewed Product", [derived_unique_id(namespace, "v03")]) == 1
    reads = len(state.requests)
    found = verify(config, wh, sandbox, "views")
    assert found.drifted == {"missing": 1} and (found.checked, found.in_step) == (10, 9)
    (short,) = found.samples
    assert (short.key, short.kind, short.field) == (
        "Viewed Product on 2024-05-01",
        "missing",
        "count",
    )
    assert (short.warehouse, short.klaviyo) == (6, 5)
    assert all(r.method == "GET" for r in state.requests[reads:])  # read quotas only
    assert {r.endpoint for r in state.requests[reads:]} == {"metrics", "events_read"}

    repaired = verify(config, wh, sandbox, "views", repair=True)
    assert repaired.repaired == 6  # the short day's rows: which one lacks its event is unknown
    again = sync(config, wh, sandbox, "views")
    assert again.planned == {"added": 6} and sum(again.delivered.values()) == 6
    assert unique_ids(sandbox, "Viewed Product") == delivered  # exact: the 5 resent were dropped
    after = verify(config, wh, sandbox, "views")
    assert (after.checked, after.in_step, sum(after.drifted.values())) == (10, 10, 0)


def test_order_completed_counts_the_order_and_its_product_events(duckdb_url, sandbox):
    wh = Warehouse(duckdb_url)
    load_orders(wh)
    config = config_for(duckdb_url, sandbox)
    assert sync(config, wh, sandbox, "orders").status == "success"
    assert len(sandbox.state.events) == 9
    assert sum(verify(config, wh, sandbox, "orders").drifted.values()) == 0

    order = derived_unique_id(config.syncs["orders"].identity, "o1")
    assert sandbox.state.delete_events("Ordered Product", [f"{order}:2"]) == 1
    found = verify(config, wh, sandbox, "orders")
    assert found.drifted == {"missing": 1} and (found.checked, found.in_step) == (3, 2)
    assert [(d.key, d.warehouse, d.klaviyo) for d in found.samples] == [
        ("Ordered Product on 2024-05-01", 6, 5)
    ]
    assert verify(config, wh, sandbox, "orders", repair=True).repaired == 3
    assert sync(config, wh, sandbox, "orders").status == "success"
    assert len(unique_ids(sandbox, "Ordered Product")) == 6
    assert sum(verify(config, wh, sandbox, "orders").drifted.values()) == 0


def test_events_without_a_time_count_on_the_day_they_were_delivered(duckdb_url, sandbox):
    wh = Warehouse(duckdb_url)
    load_views(wh)
    config = config_for(duckdb_url, sandbox)
    assert sync(config, wh, sandbox, "views_undated").status == "success"
    clean = verify(config, wh, sandbox, "views_undated")
    assert (clean.checked, clean.in_step, sum(clean.drifted.values())) == (10, 10, 0)


def test_the_sandbox_reads_events_as_klaviyo_does(duckdb_url, sandbox):
    """No unique_id filter (Klaviyo has none), page sizes within 1 to 1,000, metric ids."""
    wh = Warehouse(duckdb_url)
    load_views(wh)
    config = config_for(duckdb_url, sandbox)
    assert sync(config, wh, sandbox, "views").status == "success"
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_attempts=1) as client:
        (metric,) = client.paginate("/api/metrics")
        assert metric["attributes"]["name"] == "Viewed Product"
        query = {"filter": f'equals(metric_id,"{metric["id"]}")', "page[size]": 4}
        pages = list(client.paginate("/api/events", query))
        assert len(pages) == 10 and {e["type"] for e in pages} == {"event"}
        assert all("unique_id" not in e["attributes"] for e in pages)
        for bad in ({"filter": 'equals(unique_id,"x")'}, {"page[size]": 1001}):
            with pytest.raises(PermanentError) as refused:
                client.get("/api/events", bad)
            assert refused.value.status == 400
