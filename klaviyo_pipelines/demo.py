"""Realistic demo data: thousands of e-commerce customers, a few of them broken on purpose.

The broken rows show what the product does with bad input: each is rejected with its reason
(bad email, unusable phone, NULL or duplicated key, an address Klaviyo itself refuses), while
every good row is delivered.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import sqlalchemy as sa

from klaviyo_pipelines.warehouse.engine import Warehouse

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
COLUMNS = (
    "customer_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "city",
    "region",
    "ltv",
    "loyalty_tier",
    "last_order_at",
)


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


def create_demo_warehouse(url: str, state_schema: str, customers: int = 5000) -> int:
    """(Re)create `analytics.customers` and forget past deliveries; returns the row count."""
    wh = Warehouse(url, state_schema)
    try:
        with wh.engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {wh.quote(state_schema)} CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS analytics"))
            conn.execute(sa.text("DROP TABLE IF EXISTS analytics.customers"))
            conn.execute(
                sa.text(
                    "CREATE TABLE analytics.customers (customer_id VARCHAR, email VARCHAR, "
                    "phone VARCHAR, first_name VARCHAR, last_name VARCHAR, city VARCHAR, "
                    "region VARCHAR, ltv DECIMAL(10, 2), loyalty_tier VARCHAR, "
                    "last_order_at TIMESTAMP)"
                )
            )
            wh.bulk_insert(conn, "analytics.customers", COLUMNS, customer_rows(customers))
    finally:
        wh.dispose()
    return customers


def change_some_customers(url: str, count: int = 25) -> int:
    """Move `count` customers up a loyalty tier, as a day of real orders would."""
    wh = Warehouse(url)
    try:
        with wh.engine.begin() as conn:
            result = conn.execute(
                sa.text(
                    "UPDATE analytics.customers SET loyalty_tier = 'platinum', ltv = ltv + 100 "
                    "WHERE customer_id IN (SELECT customer_id FROM analytics.customers "
                    "WHERE loyalty_tier <> 'platinum' AND customer_id IS NOT NULL "
                    "ORDER BY customer_id LIMIT :n)"
                ),
                {"n": count},
            )
            return result.rowcount
    finally:
        wh.dispose()
