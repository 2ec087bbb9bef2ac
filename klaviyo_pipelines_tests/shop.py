"""A shop warehouse with one sync per action, and the exact state Klaviyo must end in.

Shared by the fault soak, the crash test and the concurrency tests: `load_shop` writes the
tables, `seed_sandbox` prepares the account (a VIP list, and a churn list with members),
`SHOP_CONFIG` holds the six syncs, and `assert_exact` compares the sandbox, the delivery state
and the ledger with what the warehouse says, row by row.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from klaviyo_pipelines.actions.events import derived_unique_id
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.sandbox.state import SandboxState
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import ledger_entries, state_table
from klaviyo_pipelines_tests.conftest import state_schema_for

VIP_LIST = "VIPLST"
CHURN_LIST = "CHURNL"
SYNCS = ("profiles", "views", "orders", "optins", "optouts", "churn")

SHOP_CONFIG = """
warehouse: {{url: "{url}", state_schema: {state_schema}}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base_url}"}}
models:
  customers: {{sql: "select * from {shop}.customers", primary_key: customer_id}}
  page_views: {{sql: "select * from {shop}.page_views", primary_key: view_id}}
  orders: {{sql: "select * from {shop}.orders", primary_key: order_id}}
  optins: {{sql: "select * from {shop}.optins", primary_key: optin_id}}
  optouts: {{sql: "select * from {shop}.optouts", primary_key: optout_id}}
  churned: {{sql: "select * from {shop}.churned", primary_key: churn_id}}
syncs:
  profiles:
    model: customers
    action: upsert_profile
    mapping: {{external_id: customer_id, phone_number: phone, properties: {{ltv: ltv}}}}
    settings: {{list_id: {vip}, batch_size: {batch}}}
  views:
    model: page_views
    action: track_event
    mapping: {{time: viewed_at, properties: {{url: url}}}}
    settings: {{metric_name: Viewed Page, batch_size: {batch}}}
  orders:
    model: orders
    action: order_completed
    mapping: {{time: placed_at, value: total, products: products}}
    settings: {{value_currency: USD, batch_size: {batch}}}
  optins:
    model: optins
    action: subscribe_profile
    settings: {{batch_size: {batch}}}
  optouts:
    model: optouts
    action: unsubscribe_profile
    settings: {{batch_size: {small_batch}}}
  churn:
    model: churned
    action: remove_profile
    settings: {{list_id: {churn}, batch_size: {batch}}}
"""


def shop_config_text(url: str, base_url: str, batch: int = 100) -> str:
    return SHOP_CONFIG.format(
        url=url,
        state_schema=state_schema_for(url),
        shop=shop_schema(url),
        base_url=base_url,
        vip=VIP_LIST,
        churn=CHURN_LIST,
        batch=batch,
        small_batch=min(batch, 100),
    )


@dataclass
class Shop:
    """The rows loaded, by table, as the expected outcome is computed from them."""

    customers: list[tuple] = field(default_factory=list)
    page_views: list[tuple] = field(default_factory=list)
    orders: list[tuple] = field(default_factory=list)
    optins: list[tuple] = field(default_factory=list)
    optouts: list[tuple] = field(default_factory=list)
    churned: list[tuple] = field(default_factory=list)
    churn_stays: list[str] = field(default_factory=list)  # churn-list emails that stay members

    @property
    def rows(self) -> int:
        return sum(
            len(t)
            for t in (
                self.customers,
                self.page_views,
                self.orders,
                self.optins,
                self.optouts,
                self.churned,
            )
        )

    def keys(self, sync: str) -> set[str]:
        table = {
            "profiles": self.customers,
            "views": self.page_views,
            "orders": self.orders,
            "optins": self.optins,
            "optouts": self.optouts,
            "churn": self.churned,
        }[sync]
        return {row[0] for row in table}


_TEXT, _NUMBER, _TIME = sa.String(255), sa.Float, sa.DateTime
TABLES = {  # SQLAlchemy types: each engine spells them its own way (MySQL wants lengths)
    "customers": {
        "customer_id": _TEXT,
        "email": _TEXT,
        "phone": _TEXT,
        "first_name": _TEXT,
        "ltv": _NUMBER,
    },
    "page_views": {"view_id": _TEXT, "email": _TEXT, "url": _TEXT, "viewed_at": _TIME},
    "orders": {
        "order_id": _TEXT,
        "email": _TEXT,
        "total": _NUMBER,
        "placed_at": _TIME,
        "products": sa.Text,
    },
    "optins": {"optin_id": _TEXT, "email": _TEXT},
    "optouts": {"optout_id": _TEXT, "email": _TEXT},
    "churned": {"churn_id": _TEXT, "email": _TEXT},
}


def shop_schema(url: str) -> str:
    """Where the shop's tables live: `shop`, or the test's own database on MySQL."""
    return sa.engine.make_url(url).database if url.startswith("mysql") else "shop"


def open_warehouse(url: str) -> Warehouse:
    """The warehouse as a test's config names it (its own state schema on MySQL)."""
    return Warehouse(url, state_schema_for(url))


def make_shop(rows: int = 20_000, seed: int = 7) -> Shop:
    """About `rows` rows over the six tables, in the proportions a shop has them."""
    rng = random.Random(seed)
    n = {
        "customers": rows * 40 // 100,
        "page_views": rows * 25 // 100,
        "orders": rows * 10 // 100,
        "optins": rows * 12 // 100,
        "optouts": rows * 5 // 100,
    }
    n["churned"] = rows - sum(n.values())
    shop = Shop()
    base = datetime(2026, 3, 1, 8, 0, 0)
    for i in range(n["customers"]):
        phone = f"+1512555{i % 10_000:04d}" if i % 3 == 0 and i < 10_000 else None
        shop.customers.append(
            (f"c{i:06d}", f"c{i}@shop.example", phone, f"Näme{i}", round(i * 1.25, 2))
        )
    for i in range(n["page_views"]):
        who = rng.randrange(n["customers"])
        shop.page_views.append(
            (
                f"v{i:06d}",
                f"c{who}@shop.example",
                f"/p/{rng.randrange(500)}",
                base + timedelta(seconds=37 * i),
            )
        )
    for i in range(n["orders"]):
        who = rng.randrange(n["customers"])
        products = [
            {"sku": f"SKU-{rng.randrange(200)}", "price": rng.randrange(100, 9_000) / 100}
            for _ in range(rng.randrange(0, 4))
        ]
        total = round(sum(p["price"] for p in products), 2)
        shop.orders.append(
            (
                f"o{i:06d}",
                f"c{who}@shop.example",
                total,
                base + timedelta(minutes=11 * i),
                json.dumps(products),
            )
        )
    shop.optins = [(f"s{i:06d}", f"in{i}@optin.example") for i in range(n["optins"])]
    shop.optouts = [(f"u{i:06d}", f"out{i}@optout.example") for i in range(n["optouts"])]
    shop.churned = [(f"x{i:06d}", f"gone{i}@churn.example") for i in range(n["churned"])]
    shop.churn_stays = [f"stay{i}@churn.example" for i in range(max(1, n["churned"] // 4))]
    return shop


def load_shop(wh: Warehouse, shop: Shop) -> None:
    schema = shop_schema(wh.url)
    with wh.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        for name, columns in TABLES.items():
            table = sa.Table(
                name,
                sa.MetaData(),
                *(sa.Column(column, type_) for column, type_ in columns.items()),
                schema=schema,
            )
            table.drop(conn, checkfirst=True)
            table.create(conn)
            wh.bulk_insert(conn, f"{schema}.{name}", list(columns), getattr(shop, name))


def seed_sandbox(sandbox: Sandbox, shop: Shop) -> None:
    """The lists the syncs name, and the churn list's members before any sync runs."""
    state = sandbox.state
    state.create_list("VIP", list_id=VIP_LIST)
    state.create_list("Churn", list_id=CHURN_LIST)
    members = [row[1] for row in shop.churned] + shop.churn_stays
    ids = [state.create_profile({"email": email}).id for email in members]
    state.add_members(CHURN_LIST, ids)


def assert_exact(
    sandbox: Sandbox, wh: Warehouse, shop: Shop, syncs: tuple[str, ...] = SYNCS
) -> dict[str, int]:
    """Klaviyo holds exactly what the warehouse says for `syncs`, each sync's state lists
    exactly its rows once, and no ledger entry is left. Returns the counts compared."""
    counts: dict[str, int] = {}
    with sandbox.state.lock:
        for sync in syncs:
            counts[sync] = CHECKS[sync](sandbox.state, shop)
    for sync in syncs:
        with wh.engine.connect() as conn:
            keys = conn.execute(sa.text(f"SELECT row_key FROM {wh.table(state_table(sync))}"))
            recorded = Counter(row[0] for row in keys)
        assert set(recorded) == shop.keys(sync), sync
        assert max(recorded.values()) == 1, sync
        assert ledger_entries(wh, sync) == [], (sync, ledger_entries(wh, sync)[:3])
    return counts


def _domain_count(state: SandboxState, domain: str) -> int:
    return sum(1 for p in state.profiles.values() if (p.email or "").endswith("@" + domain))


def _check_profiles(state: SandboxState, shop: Shop) -> int:
    """Every customer once, with its fields, and in the VIP list; nobody else in it."""
    vip: set[str] = set()
    for customer_id, email, phone, first_name, ltv in shop.customers:
        profile = state.find_profile(email=email)
        assert profile is not None, f"customer {customer_id} missing"
        attributes = profile.attributes
        assert attributes["external_id"] == customer_id
        assert attributes["first_name"] == first_name
        assert attributes["phone_number"] == phone
        assert attributes["properties"]["ltv"] == ltv
        vip.add(profile.id)
    assert _domain_count(state, "shop.example") == len(shop.customers)
    assert state.list_members(VIP_LIST) == vip
    return len(vip)


def _no_event_twice(state: SandboxState) -> None:
    events = Counter((e.profile_id, e.metric, e.unique_id) for e in state.events)
    assert max(events.values(), default=1) == 1, "an event was counted twice"


def _check_views(state: SandboxState, shop: Shop) -> int:
    """Each view exactly once (by unique_id), on its customer's profile, with its properties."""
    _no_event_twice(state)
    email_of = {p.id: p.email for p in state.profiles.values()}
    views = {e.unique_id: e for e in state.events if e.metric == "Viewed Page"}
    expected = {derived_unique_id("views", row[0]): row for row in shop.page_views}
    assert views.keys() == expected.keys()
    for unique_id, (_, email, url, _) in expected.items():
        assert email_of[views[unique_id].profile_id] == email
        assert views[unique_id].properties == {"url": url}
    return len(views)


def _check_orders(state: SandboxState, shop: Shop) -> int:
    """Each order's event and each of its product events exactly once."""
    _no_event_twice(state)
    orders = {e.unique_id for e in state.events if e.metric == "Order Completed"}
    products = {e.unique_id for e in state.events if e.metric == "Ordered Product"}
    order_ids = {derived_unique_id("orders", row[0]): row for row in shop.orders}
    assert orders == order_ids.keys()
    assert products == {
        f"{unique_id}:{n}"
        for unique_id, row in order_ids.items()
        for n in range(1, len(json.loads(row[4])) + 1)
    }
    return len(orders) + len(products)


def _check_consent(state: SandboxState, rows: list[tuple], domain: str, consent: str) -> int:
    """Every row's profile has the consent; no other profile of its domain exists."""
    for key, email in rows:
        profile = state.find_profile(email=email)
        assert profile is not None, f"{key} missing"
        assert state.consent(profile.id, "email.marketing") == consent, key
    assert _domain_count(state, domain) == len(rows)
    return len(rows)


def _check_churn(state: SandboxState, shop: Shop) -> int:
    """Exactly the rows' profiles left the churn list; the others stayed."""
    stays = {state.find_profile(email=email).id for email in shop.churn_stays}
    assert state.list_members(CHURN_LIST) == stays
    return len(shop.churned)


CHECKS: dict[str, Callable[[SandboxState, Shop], int]] = {
    "profiles": _check_profiles,
    "views": _check_views,
    "orders": _check_orders,
    "optins": lambda state, shop: _check_consent(state, shop.optins, "optin.example", "SUBSCRIBED"),
    "optouts": lambda state, shop: _check_consent(
        state, shop.optouts, "optout.example", "UNSUBSCRIBED"
    ),
    "churn": _check_churn,
}
