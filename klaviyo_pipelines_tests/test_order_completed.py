"""Order Completed end to end: orders (and line items) -> real HTTP to the sandbox -> events.

Tests that depend on warehouse types or state (JSON arrays, joins, decimals, timestamps,
reruns) run on DuckDB and PostgreSQL (`warehouse_url`); the rest on DuckDB only. Segment's behaviour (segment-klaviyo-actions.md §2.6) is kept
where it is right and its bugs are pinned as fixed: products copied into the order event,
random product unique ids, retries that duplicate product events.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.events import derived_unique_id
from klaviyo_pipelines.actions.order_completed import OrderCompleted, parse_products
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, plan_sync, run_sync
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.sandbox.state import Event
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

BULK = "/api/event-bulk-create-jobs"
SINGLE = "/api/events"
PLACED = datetime(2024, 6, 2, 9, 15, 42, 250000)
ORDERS = {
    "order_id": "INTEGER",
    "email": "VARCHAR",
    "external_id": "VARCHAR",
    "placed_at": "TIMESTAMP",
    "total": "DECIMAL(10,2)",
    "order_name": "VARCHAR",
    "products": "VARCHAR",
}
ITEMS = {
    "item_id": "INTEGER",
    "order_id": "INTEGER",
    "line_no": "INTEGER",
    "sku": "VARCHAR",
    "name": "VARCHAR",
    "price": "DECIMAL(10,2)",
}
MAPPING = (
    "mapping: {products: products, time: placed_at, value: total, "
    "properties: {name: order_name, total: total}}"
)


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    """The sandbox on fast time (rate windows of 1/60 s and 1 s): runs here follow each other
    within a minute, and on real time the client would spread the minute's remaining quota
    evenly over it, as it should against Klaviyo, making these tests wait."""
    with Sandbox(api_key=TEST_API_KEY, port=0, time_scale=60) as running:
        monkeypatch.setenv("KLAVIYO_API_KEY", TEST_API_KEY)
        monkeypatch.setenv("KLAVIYO_BASE_URL", running.url)
        yield running


def product(n: int) -> dict[str, Any]:
    return {"sku": f"SKU-{n}", "name": f"Product {n}", "value": 5.0}


def order(i: int, products: int | str = 2, **values: Any) -> dict[str, Any]:
    """An order row; `products` is how many products, or the column's text as is."""
    if isinstance(products, int):
        products = json.dumps([product(n) for n in range(1, products + 1)])
    base = {
        "order_id": i,
        "email": f"buyer{i}@example.com",
        "external_id": None,
        "placed_at": PLACED,
        "total": Decimal("12.50"),
        "order_name": f"Order #{i}",
        "products": products,
    }
    return {**base, **values}


def load(wh: Warehouse, table: str, columns: dict[str, str], rows: list[dict[str, Any]]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text(f"DROP TABLE IF EXISTS shop.{table}"))
        ddl = ", ".join(f"{name} {kind}" for name, kind in columns.items())
        conn.execute(sa.text(f"CREATE TABLE shop.{table} ({ddl})"))
        wh.bulk_insert(
            conn, f"shop.{table}", list(columns), [[r[c] for c in columns] for r in rows]
        )


def native_products_sql(url: str) -> str:
    """The products column as the warehouse's own array type: DuckDB LIST of STRUCT (a list of
    dicts in Python), PostgreSQL jsonb (a list)."""
    if url.startswith("duckdb"):
        cast = """from_json(products, '[{"sku":"VARCHAR","name":"VARCHAR","value":"DOUBLE"}]')"""
    else:
        cast = "CAST(products AS JSONB)"
    columns = ", ".join(c for c in ORDERS if c != "products")
    return f"select {columns}, {cast} as products from shop.orders"


def config_for(url: str, sandbox: Sandbox, syncs: dict[str, str]) -> Config:
    """`syncs`: name -> flow-style YAML of the sync's fields after `action` (model defaults
    to orders)."""
    body = "\n".join(
        f"  {name}: {{{'' if spec.startswith('model:') else 'model: orders, '}action: order_completed, "
        f"{spec}}}"
        for name, spec in syncs.items()
    )
    native = native_products_sql(url).replace('"', '\\"')
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  orders: {{sql: "select * from shop.orders", primary_key: order_id}}
  orders_native: {{sql: "{native}", primary_key: order_id}}
  order_items: {{sql: "select * from shop.order_items", primary_key: item_id}}
syncs:
{body}
""",
        "test.yaml",
    )


def sync(
    config: Config, wh: Warehouse, sandbox: Sandbox, name: str = "orders", **client_options: Any
) -> SyncReport:
    spec = config.syncs[name]
    for model in (spec.model, *spec.extra_models):
        take_snapshot(wh, config.models[model], config.path)
    options = {"max_backoff": 0.2, **client_options}
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, **options) as client:
        return run_sync(config, name, wh, client)


def posts(sandbox: Sandbox, path: str = BULK) -> list:
    return [r for r in sandbox.state.requests if r.method == "POST" and r.path == path]


def by_metric(sandbox: Sandbox, metric: str) -> dict[str, Event]:
    return {e.unique_id: e for e in sandbox.state.events if e.metric == metric}


def test_products_become_one_event_each_sent_together_with_their_order(warehouse_url, sandbox):
    """§2.6 flow, fixed: the order event does not carry the product list; a product event has
    the order's properties with the product's keys on top (its `value` stays a property), no
    top-level value, the order's time and profile, and the id `<order id>:<position>`. The
    products column may hold JSON text or the warehouse's own array type."""
    wh = Warehouse(warehouse_url)
    load(wh, "orders", ORDERS, [order(1, 0), order(2, 1), order(3, 3)])
    config = config_for(
        warehouse_url,
        sandbox,
        {
            "orders": MAPPING,
            "native": f"model: orders_native, {MAPPING}, settings: "
            "{event_name: Native Order, product_event_name: Native Product}",
        },
    )
    report = sync(config, wh, sandbox)
    assert report.status == "success", report.error
    assert report.delivered == {"added": 3}
    (request,) = posts(sandbox)
    assert (request.status, request.items) == (202, 3 + 4)  # 3 orders, 4 products, one request

    orders = by_metric(sandbox, "Order Completed")
    products = by_metric(sandbox, "Ordered Product")
    order_ids = {i: derived_unique_id("orders", str(i)) for i in (1, 2, 3)}
    assert set(orders) == set(order_ids.values())
    third = orders[order_ids[3]]
    assert third.properties == {"name": "Order #3", "total": 12.5}  # no product list
    assert third.value == 12.5 and third.time == PLACED.replace(microsecond=0, tzinfo=UTC)
    assert set(products) == {f"{order_ids[2]}:1", *(f"{order_ids[3]}:{n}" for n in (1, 2, 3))}
    second_product = products[f"{order_ids[3]}:2"]
    assert second_product.properties == {
        "name": "Product 2",  # the product's name wins over the order's
        "total": 12.5,
        "sku": "SKU-2",
        "value": 5.0,
    }
    assert second_product.value is None and second_product.time == third.time
    assert second_product.profile_id == third.profile_id

    assert sync(config, wh, sandbox, "native").status == "success"
    native_products = by_metric(sandbox, "Native Product")
    assert sorted(e.properties["sku"] for e in native_products.values()) == sorted(
        e.properties["sku"] for e in products.values()
    )
    assert len(by_metric(sandbox, "Native Order")) == 3

    sandbox.state.requests.clear()
    assert sync(config, wh, sandbox).requests == 0
    wh.dispose()


def test_line_items_come_from_a_joined_model_in_a_stable_order(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, "orders", ORDERS, [order(1, products=0), order(2, products=0)])
    items = [  # inserted out of line order: positions follow line_no
        {"item_id": 12, "order_id": 1, "line_no": 2, "sku": "B", "name": "Bolt", "price": 2},
        {"item_id": 11, "order_id": 1, "line_no": 1, "sku": "A", "name": "Axe", "price": 30},
        {"item_id": 21, "order_id": 9, "line_no": 1, "sku": "Z", "name": "Zip", "price": 1},
    ]
    load(wh, "order_items", ITEMS, items)
    spec = (
        "mapping: {time: placed_at, properties: {total: total}}, "
        "settings: {line_items: {model: order_items, order_key: order_id, order_by: line_no}, "
        "backfill: true}"
    )
    config = config_for(warehouse_url, sandbox, {"orders": spec})
    assert config.syncs["orders"].extra_models == ("order_items",)
    report = sync(config, wh, sandbox)
    assert report.status == "success" and report.delivered == {"added": 2}

    first = derived_unique_id("orders", "1")
    products = by_metric(sandbox, "Ordered Product")
    assert set(products) == {f"{first}:1", f"{first}:2"}  # order 2 has no line items
    assert products[f"{first}:1"].properties == {
        "total": 12.5,
        "item_id": 11,
        "order_id": 1,
        "line_no": 1,
        "sku": "A",
        "name": "Axe",
        "price": 30,
    }
    assert products[f"{first}:2"].properties["sku"] == "B"
    assert len(by_metric(sandbox, "Order Completed")) == 2
    assert all(e.backfill for e in sandbox.state.events)  # product events too

    broken = spec.replace("order_key: order_id", "order_key: orderid")
    with pytest.raises(ConfigError) as caught:
        sync(config_for(warehouse_url, sandbox, {"broken": broken}), wh, sandbox, "broken")
    assert caught.value.key == "syncs.broken.settings.line_items.order_key"
    unsnapshotted = spec.replace("model: order_items", "model: orders_native")
    with pytest.raises(ConfigError) as caught:
        plan_sync(config_for(warehouse_url, sandbox, {"early": unsnapshotted}), "early", wh)
    assert caught.value.key == "syncs.early.settings.line_items.model"
    assert "no snapshot" in caught.value.reason
    wh.dispose()


def test_an_orders_events_travel_in_one_request_and_requests_are_the_fewest(duckdb_url, sandbox):
    """An order is one bulk entry: 250 orders of 4 events fill 1,000 events exactly, and with a
    small batch_size no order is split across requests."""
    wh = Warehouse(duckdb_url)
    load(wh, "orders", ORDERS, [order(i, products=3) for i in range(300)])
    config = config_for(
        duckdb_url,
        sandbox,
        {"orders": MAPPING, "small": MAPPING + ", settings: {batch_size: 10}"},
    )
    assert sync(config, wh, sandbox).delivered == {"added": 300}
    assert [r.items for r in posts(sandbox)] == [1000, 200]

    load(wh, "orders", ORDERS, [order(i, products=3) for i in range(12)])
    sandbox.state.reset()
    assert sync(config, wh, sandbox, "small").delivered == {"added": 12}
    assert [r.items for r in posts(sandbox)] == [8] * 6  # 2 whole orders per request
    wh.dispose()


def test_retries_resend_whole_orders_and_never_duplicate_an_event(warehouse_url, sandbox):
    """Segment's retry re-sent product events under new random ids. Here a lost answer (the
    request was applied) or a dropped connection leaves the orders for the next run, which
    re-sends every event of them under the same ids: Klaviyo keeps each exactly once."""
    wh = Warehouse(warehouse_url)
    load(wh, "orders", ORDERS, [order(i, products=2) for i in range(20)])
    config = config_for(
        warehouse_url,
        sandbox,
        {
            "orders": MAPPING + ", settings: {batch_size: 30}",
            "single": MAPPING + ", settings: {batch: false}",
        },
    )
    sandbox.faults.add(Fault(kind="applied_status", status=503, count=2, path_prefix=BULK))
    failed = sync(config, wh, sandbox, max_attempts=2)
    assert failed.status == "failed" and failed.retryable == {"added": 10}
    assert len(sandbox.state.events) == 30  # the first request's 10 orders, stored once
    sandbox.faults.add(Fault(kind="timeout", delay=0.3, count=1, path_prefix=BULK))
    recovered = sync(config, wh, sandbox)
    assert recovered.status == "success" and recovered.delivered == {"added": 20}
    by_id = Counter(e.unique_id for e in sandbox.state.events)
    assert len(by_id) == 60 and set(by_id.values()) == {1}

    # Single mode: the order event goes through, its first product's answer is lost.
    sandbox.state.reset()
    sandbox.faults.random({"applied_status": 0.5}, seed=15, statuses=(503,), path_prefix=SINGLE)
    failed = sync(config, wh, sandbox, "single", max_attempts=1)
    sandbox.faults.clear()
    assert failed.status == "failed" and failed.retryable == {"added": 20}
    assert [e.metric for e in sandbox.state.events] == ["Order Completed", "Ordered Product"]
    recovered = sync(config, wh, sandbox, "single")
    assert recovered.status == "success" and recovered.delivered == {"added": 20}
    by_id = Counter(e.unique_id for e in sandbox.state.events)
    assert len(by_id) == 60 and set(by_id.values()) == {1}
    assert len(posts(sandbox, SINGLE)) == 2 + 60  # the failed order was re-sent whole
    wh.dispose()


def test_invalid_orders_are_rejected_with_reasons_and_the_rest_delivered(duckdb_url, sandbox):
    """§2.6 checks identifiers, phone and external_id; it had no email check, we do. Products
    that are not a JSON array of objects reject the order, never a part of it."""
    wh = Warehouse(duckdb_url)
    bad = {
        "1": order(1, email=None),
        "2": order(2, email="buyer at example.com"),
        "3": order(3, email=None, external_id="x" * 256),
        "4": order(4, products="[{"),
        "5": order(5, products='{"sku": "A"}'),
        "6": order(6, products='[{"sku": "A"}, 7]'),
        "7": order(7, products=json.dumps([{"sku": str(n)} for n in range(1000)])),
        "8": order(8, email="buyer8@mailer.invalid"),  # refused by Klaviyo
    }
    load(wh, "orders", ORDERS, [*bad.values(), *(order(i) for i in range(10, 15))])
    report = sync(config_for(duckdb_url, sandbox, {"orders": MAPPING}), wh, sandbox)
    assert report.status == "success"
    assert report.delivered == {"added": 5} and report.rejected == {"added": 8}
    assert not report.retryable
    ledger = {e.key: (e.field, e.reason) for e in ledger_entries(wh, "orders")}
    expected = {
        "1": (None, "no identifier"),
        "2": ("email", "not a valid email"),
        "3": ("external_id", "255"),
        "4": ("products", "not valid JSON"),
        "5": ("products", "must be a JSON array"),
        "6": ("products", "product 2 is not an object"),
        "7": ("products", "1,001 events"),
        "8": ("email", "Klaviyo: Invalid email address"),
    }
    assert set(ledger) == set(expected)
    for key, (field, words) in expected.items():
        assert ledger[key][0] == field and words in ledger[key][1], (key, ledger[key])
    assert {e.kind for e in ledger_entries(wh, "orders")} == {FailureKind.INVALID}
    assert len(sandbox.state.events) == 5 * 3
    wh.dispose()


def test_single_mode_posts_the_order_then_each_product(duckdb_url, sandbox):
    """§2.6: one POST /api/events for the order, then one per product, only once the order was
    accepted; an order Klaviyo refuses sends no product events."""
    wh = Warehouse(duckdb_url)
    rows = [order(1, products=2), order(2, products=3, email="b@mailer.invalid"), order(3, 1)]
    load(wh, "orders", ORDERS, rows)
    config = config_for(duckdb_url, sandbox, {"orders": MAPPING + ", settings: {batch: false}"})
    take_snapshot(wh, config.models["orders"], config.path)
    planned = plan_sync(config, "orders", wh, samples=1).payload_samples
    assert [b["data"]["attributes"]["unique_id"] for b in planned[0]] == [
        derived_unique_id("orders", "1") + suffix for suffix in ("", ":1", ":2")
    ]  # plan shows every request an order becomes
    report = sync(config, wh, sandbox)
    assert report.delivered == {"added": 2} and report.rejected == {"added": 1}
    assert [r.status for r in posts(sandbox, SINGLE)] == [202, 202, 202, 400, 202, 202]
    assert [(e.metric, e.unique_id) for e in sandbox.state.events] == [
        ("Order Completed", derived_unique_id("orders", "1")),
        ("Ordered Product", derived_unique_id("orders", "1") + ":1"),
        ("Ordered Product", derived_unique_id("orders", "1") + ":2"),
        ("Order Completed", derived_unique_id("orders", "3")),
        ("Ordered Product", derived_unique_id("orders", "3") + ":1"),
    ]
    wh.dispose()


def test_products_are_read_from_every_shape_a_warehouse_hands_over():
    objects = [{"sku": "A", "qty": 1}, {"sku": "B", "price": Decimal("2.50")}]
    expected = [{"sku": "A", "qty": 1}, {"sku": "B", "price": 2.5}]
    assert parse_products(json.dumps([{"sku": "A", "qty": 1}, {"sku": "B", "price": 2.5}])) == (
        expected
    )
    assert parse_products(objects) == expected  # jsonb, DuckDB STRUCT[]
    assert parse_products(tuple(objects)) == expected
    assert parse_products([json.dumps(o, default=float) for o in objects]) == expected  # JSON[]
    assert parse_products(None) == parse_products("") == parse_products("[]") == []
    for bad in ("[{", '{"sku": "A"}', "[1]", ["A"], 7):
        with pytest.raises(InvalidRow) as caught:
            parse_products(bad)
        assert caught.value.field == "products"


def test_config_is_checked_before_anything_is_sent(sandbox):
    def build(spec: str) -> OrderCompleted:
        config = parse_config(
            f"""
warehouse: {{url: "duckdb:///unused.duckdb"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  orders: {{sql: "select * from shop.orders", primary_key: order_id}}
  order_items: {{sql: "select * from shop.order_items", primary_key: item_id}}
syncs:
  orders: {{model: orders, action: order_completed, {spec}}}
""",
            "test.yaml",
        )
        return OrderCompleted(config.syncs["orders"], list(ORDERS), config.path)

    with pytest.raises(ConfigError, match=r"syncs\.orders\.on"):
        build("on: [deleted]")
    line_items = "line_items: {model: order_items, order_key: order_id}"
    cases = {
        f"mapping: {{products: products}}, settings: {{{line_items}}}": "settings.line_items",
        "settings: {line_items: {model: order_items}}": "settings.line_items.order_key",
        "settings: {line_items: {model: order_items, order_key: o, where: x}}": (
            "settings.line_items.where"
        ),
        "settings: {line_items: order_items}": "settings.line_items",
        f"settings: {{event_name: {'E' * 128}}}": "settings.event_name",
        "settings: {product_event_name: ''}": "settings.product_event_name",
        "mapping: {products: items}": "mapping.products",
        "mapping: {metric_name: order_name}": "mapping.metric_name",
    }
    for spec, key in cases.items():
        with pytest.raises(ConfigError) as caught:
            build(spec)
        assert caught.value.key == f"syncs.orders.{key}", spec
    action = build(f"settings: {{{line_items}, batch: false}}")
    assert action.columns == {"email", "external_id"}  # default identifier mappings
    assert (action.event_name, action.product_event_name) == ("Order Completed", "Ordered Product")
