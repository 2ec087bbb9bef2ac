"""Realistic demo data: an e-commerce warehouse with customers, VIPs, newsletter opt-ins,
product views, and a week of orders with line items, a few rows broken on purpose.

The broken rows show what the product does with bad input: each is rejected with its reason
(bad email, unusable phone, NULL or duplicated key, an address Klaviyo itself refuses), while
every good row is delivered. `simulate_a_day` then changes the warehouse the way a day of
business does, so the second sync shows only changes travelling, including rows that left a
model (unsubscribes, VIPs losing their status).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from klaviyo_pipelines.warehouse.engine import Warehouse

DEMO_LIST_ID = "VIPdem"  # the sandbox's VIP list, created with this id by the demo and `make ui`
DEMO_LIST_NAME = "VIP customers"
ORDER_DAYS = 7

FIRST = [
    "Ava",
    "Liam",
    "Maya",
    "Noah",
    "Zoe",
    "Ethan",
    "Iris",
    "Omar",
    "Lena",
    "Kai",
    "Sofía",
    "Jürgen",
]
LAST = [
    "Nguyen",
    "Smith",
    "García",
    "Okafor",
    "Kowalski",
    "Chen",
    "Müller",
    "Haddad",
    "Rossi",
    "Kim",
]
TIERS = ["bronze", "silver", "gold", "platinum"]
CITIES = [("Austin", "TX"), ("Portland", "OR"), ("Boston", "MA"), ("Denver", "CO"), ("Miami", "FL")]
PRODUCTS = [
    ("SKU-TEE-01", "Organic cotton tee", 28.0),
    ("SKU-HOOD-02", "Fleece hoodie", 64.0),
    ("SKU-CAP-03", "Canvas cap", 22.0),
    ("SKU-MUG-04", "Stoneware mug", 18.5),
    ("SKU-BAG-05", "Waxed tote bag", 45.0),
    ("SKU-SOCK-06", "Merino socks", 16.0),
    ("SKU-JKT-07", "Rain jacket", 129.0),
    ("SKU-BTL-08", "Steel bottle", 32.0),
]
TABLES: dict[str, dict[str, str]] = {
    "customers": {
        "customer_id": "VARCHAR",
        "email": "VARCHAR",
        "phone": "VARCHAR",
        "first_name": "VARCHAR",
        "last_name": "VARCHAR",
        "city": "VARCHAR",
        "region": "VARCHAR",
        "ltv": "DECIMAL(10, 2)",
        "loyalty_tier": "VARCHAR",
        "last_order_at": "TIMESTAMP",
    },
    "newsletter_optins": {"email": "VARCHAR", "phone": "VARCHAR", "opted_in_at": "TIMESTAMP"},
    "product_views": {
        "view_id": "VARCHAR",
        "customer_id": "VARCHAR",
        "email": "VARCHAR",
        "sku": "VARCHAR",
        "product_name": "VARCHAR",
        "price": "DECIMAL(10, 2)",
        "viewed_at": "TIMESTAMP",
    },
    "orders": {
        "order_id": "VARCHAR",
        "customer_id": "VARCHAR",
        "email": "VARCHAR",
        "placed_at": "TIMESTAMP",
        "total": "DECIMAL(10, 2)",
        "item_count": "INTEGER",
    },
    "audience_events": {  # Segment Engage's warehouse shape: one row per entry or exit
        "audience_key": "VARCHAR",
        "user_id": "VARCHAR",
        "email": "VARCHAR",
        "event": "VARCHAR",
        "received_at": "TIMESTAMP",
    },
    "order_items": {
        "line_id": "VARCHAR",
        "order_id": "VARCHAR",
        "sku": "VARCHAR",
        "product_name": "VARCHAR",
        "quantity": "INTEGER",
        "price": "DECIMAL(10, 2)",
    },
}


def customer_rows(count: int, seed: int = 7) -> list[tuple]:
    """`count` customers with 1% deliberately bad rows of each kind a warehouse really has."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1)
    rows = []
    for n in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        city, region = rng.choice(CITIES)
        rows.append(
            (
                f"C{n:06d}",
                f"{first.lower()}.{last.lower()}{n}@example.com".encode("ascii", "ignore").decode(),
                f"(512) 555-{n % 10_000:04d}" if rng.random() < 0.6 else None,
                first,
                last,
                city,
                region,
                round(rng.uniform(0, 2500), 2),
                rng.choice(TIERS),
                start + timedelta(minutes=rng.randint(0, 60 * 24 * 300)),
            )
        )
    # Broken on purpose, roughly 1% of rows in all.
    for i in range(0, count, 500):
        rows[i] = (rows[i][0], "not-an-email", *rows[i][2:])
    for i in range(100, count, 500):
        rows[i] = (rows[i][0], rows[i][1], "12", *rows[i][3:])
    for i in range(200, count, 500):
        rows[i] = (rows[i][0], rows[i][1].replace("example.com", "mailer.invalid"), *rows[i][2:])
    for i in range(300, count, 1000):
        rows[i] = (None, *rows[i][1:])
    for i in range(400, count, 1000):
        rows[i] = (rows[i - 1][0], *rows[i][1:])
    return rows


def newsletter_rows(customers: Sequence[tuple], rng: random.Random) -> list[tuple]:
    """About 40% of customers opted in to the newsletter (email, and SMS for some)."""
    rows = []
    for c in customers:
        if c[0] and "@" in c[1] and rng.random() < 0.4:
            rows.append((c[1], c[2] if c[2] != "12" else None, c[9]))
    return rows


def view_rows(customers: Sequence[tuple], rng: random.Random, today: date, n: int) -> list[tuple]:
    good = [c for c in customers if c[0] and "@example.com" in c[1]]
    rows = []
    for i in range(n):
        c = rng.choice(good)
        sku, name, price = rng.choice(PRODUCTS)
        when = datetime.combine(today, datetime.min.time()) - timedelta(
            minutes=rng.randint(1, 4320)
        )
        rows.append((f"V{today:%Y%m%d}-{i:05d}", c[0], c[1], sku, name, price, when))
    return rows


def order_rows(
    customers: Sequence[tuple], rng: random.Random, day: date, n: int
) -> tuple[list[tuple], list[tuple]]:
    """`n` orders placed on `day`, each with 1 to 4 line items."""
    good = [c for c in customers if c[0] and "@example.com" in c[1]]
    orders, items = [], []
    for i in range(n):
        c = rng.choice(good)
        order_id = f"O{day:%Y%m%d}-{i:04d}"
        lines = rng.sample(PRODUCTS, rng.randint(1, 4))
        total = 0.0
        for j, (sku, name, price) in enumerate(lines):
            quantity = rng.randint(1, 3)
            total += quantity * price
            items.append((f"{order_id}-{j}", order_id, sku, name, quantity, price))
        placed = datetime.combine(day, datetime.min.time()) + timedelta(
            minutes=rng.randint(0, 1439)
        )
        orders.append((order_id, c[0], c[1], placed, round(total, 2), len(lines)))
    return orders, items


def audience_event_rows(customers: Sequence[tuple], rng: random.Random) -> list[tuple]:
    """Engage's "cart_abandoners" audience: about 8% of customers entered, a third of them
    left again later (the latest event per member decides)."""
    good = [c for c in customers if c[0] and "@example.com" in c[1]]
    start = datetime(2026, 1, 1)
    rows = []
    for c in rng.sample(good, max(4, len(good) // 12)):
        entered = start + timedelta(minutes=rng.randint(0, 60 * 24 * 300))
        rows.append(("cart_abandoners", c[0], c[1], "Audience Entered", entered))
        if rng.random() < 0.33:
            left = entered + timedelta(hours=rng.randint(1, 72))
            rows.append(("cart_abandoners", c[0], c[1], "Audience Exited", left))
    return rows


def demo_days(today: date | None = None) -> list[str]:
    """The days of demo orders, oldest first: a week up to today (UTC)."""
    today = today or datetime.now(UTC).date()
    return [(today - timedelta(days=k)).isoformat() for k in range(ORDER_DAYS - 1, -1, -1)]


def create_demo_warehouse(url: str, state_schema: str, customers: int = 5000) -> int:
    """(Re)create the `analytics` tables and forget past deliveries; returns the customers."""
    rng = random.Random(11)
    today = datetime.now(UTC).date()
    people = customer_rows(customers)
    orders: list[tuple] = []
    items: list[tuple] = []
    for day in demo_days(today):
        o, i = order_rows(people, rng, date.fromisoformat(day), max(5, customers // 40))
        orders += o
        items += i
    data = {
        "customers": people,
        "newsletter_optins": newsletter_rows(people, rng),
        "product_views": view_rows(people, rng, today, max(10, customers // 3)),
        "orders": orders,
        "order_items": items,
        "audience_events": audience_event_rows(people, rng),
    }
    wh = Warehouse(url, state_schema)
    try:
        with wh.engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {wh.quote(state_schema)} CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS analytics"))
            for table, rows in data.items():
                _create(wh, conn, table, rows)
    finally:
        wh.dispose()
    return customers


def _create(wh: Warehouse, conn: Connection, table: str, rows: list[tuple]) -> None:
    columns = TABLES[table]
    conn.execute(sa.text(f"DROP TABLE IF EXISTS analytics.{table}"))
    listed = ", ".join(f"{name} {kind}" for name, kind in columns.items())
    conn.execute(sa.text(f"CREATE TABLE analytics.{table} ({listed})"))
    wh.bulk_insert(conn, f"analytics.{table}", list(columns), rows)


def simulate_a_day(url: str) -> dict[str, Any]:
    """A day of business: upgrades, VIPs downgraded, unsubscribes, new views and orders."""
    rng = random.Random(12)
    today = datetime.now(UTC).date()
    wh = Warehouse(url)
    try:
        with wh.engine.begin() as conn:
            upgraded = conn.execute(
                sa.text(
                    "UPDATE analytics.customers SET loyalty_tier = 'platinum', ltv = ltv + 100 "
                    "WHERE customer_id IN (SELECT customer_id FROM analytics.customers "
                    "WHERE loyalty_tier IN ('bronze', 'silver') AND customer_id IS NOT NULL "
                    "ORDER BY customer_id LIMIT 25)"
                )
            ).rowcount
            downgraded = conn.execute(
                sa.text(
                    "UPDATE analytics.customers SET loyalty_tier = 'bronze' "
                    "WHERE customer_id IN (SELECT customer_id FROM analytics.customers "
                    "WHERE loyalty_tier IN ('gold', 'platinum') AND customer_id IS NOT NULL "
                    "ORDER BY customer_id DESC LIMIT 10)"
                )
            ).rowcount
            unsubscribed = conn.execute(
                sa.text(
                    "DELETE FROM analytics.newsletter_optins WHERE email IN (SELECT email "
                    "FROM analytics.newsletter_optins ORDER BY email LIMIT 20)"
                )
            ).rowcount
            people = conn.execute(sa.text("SELECT * FROM analytics.customers")).all()
            people = [tuple(p) for p in people]
            views = view_rows(people, rng, today + timedelta(days=1), 50)
            wh.bulk_insert(conn, "analytics.product_views", list(TABLES["product_views"]), views)
            orders, items = order_rows(people, rng, today, 30)
            orders = [(f"{o[0]}-late", *o[1:]) for o in orders]
            items = [(f"{i[0]}-late", f"{i[1]}-late", *i[2:]) for i in items]
            wh.bulk_insert(conn, "analytics.orders", list(TABLES["orders"]), orders)
            wh.bulk_insert(conn, "analytics.order_items", list(TABLES["order_items"]), items)
            abandoners = _audience_moves(conn, rng)
            wh.bulk_insert(
                conn, "analytics.audience_events", list(TABLES["audience_events"]), abandoners
            )
    finally:
        wh.dispose()
    return {
        "upgraded to platinum": upgraded,
        "VIPs downgraded": downgraded,
        "newsletter unsubscribes": unsubscribed,
        "new product views": len(views),
        "new orders today": len(orders),
        "cart abandoners entering or leaving": len(abandoners),
    }


def _audience_moves(conn: Connection, rng: random.Random) -> list[tuple]:
    """A day of Engage: a few customers abandon a cart, a few current abandoners buy."""
    now = datetime.now(UTC).replace(tzinfo=None)
    current = conn.execute(
        sa.text(
            "SELECT user_id, email FROM analytics.audience_events e WHERE event = "
            "'Audience Entered' AND NOT EXISTS (SELECT 1 FROM analytics.audience_events x "
            "WHERE x.user_id = e.user_id AND x.received_at > e.received_at) ORDER BY user_id"
        )
    ).all()
    others = conn.execute(
        sa.text(
            "SELECT customer_id, email FROM analytics.customers WHERE email LIKE '%@example.com' "
            "AND customer_id NOT IN (SELECT user_id FROM analytics.audience_events) "
            "ORDER BY customer_id LIMIT 200"
        )
    ).all()
    leaving = rng.sample(current, min(3, len(current)))
    entering = rng.sample(others, min(5, len(others)))
    return [("cart_abandoners", u, e, "Audience Exited", now) for u, e in leaving] + [
        ("cart_abandoners", u, e, "Audience Entered", now) for u, e in entering
    ]


def seed_sandbox(sandbox: Any) -> None:
    """Create the demo's VIP list in a sandbox, with the id the demo config names."""
    if DEMO_LIST_ID not in sandbox.state.lists:
        sandbox.state.create_list(DEMO_LIST_NAME, list_id=DEMO_LIST_ID)
