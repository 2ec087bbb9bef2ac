"""verify for Subscribe / Unsubscribe Profile: after a real sync, consent flipped in the sandbox
behind the project's back (a flow unsubscribing someone, a profile deleted) is found per
channel; --repair plus the next sync restores the consent the warehouse says."""

from __future__ import annotations

import sqlalchemy as sa

from klaviyo_pipelines.config import Config, parse_config
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.sandbox.state import Subscription, utcnow
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines_tests.sandbox_runs import sync, verify


def config_for(url: str, sandbox: Sandbox, unsubscribe_on: str = "[added]") -> Config:
    return parse_config(
        f"""
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  optins: {{sql: "select * from shop.optins", primary_key: person_id}}
  optouts: {{sql: "select * from shop.optouts", primary_key: person_id}}
syncs:
  subscribe:
    model: optins
    action: subscribe_profile
    on: [added]
    mapping: {{email: email, phone_number: phone}}
  unsubscribe:
    model: optouts
    action: unsubscribe_profile
    on: {unsubscribe_on}
    mapping: {{email: email}}
""",
        "test.yaml",
    )


def load(wh: Warehouse, table: str, rows: list[tuple]) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS shop"))
        conn.execute(sa.text(f"DROP TABLE IF EXISTS shop.{table}"))
        conn.execute(
            sa.text(f"CREATE TABLE shop.{table} (person_id VARCHAR, email VARCHAR, phone VARCHAR)")
        )
        wh.bulk_insert(conn, f"shop.{table}", ["person_id", "email", "phone"], rows)


def flip(sandbox: Sandbox, email: str, channel: str, consent: str) -> None:
    """What a flow or an unsubscribe link does in Klaviyo, unseen by any sync."""
    profile = sandbox.state.find_profile(email=email)
    sandbox.state.set_consent(Subscription(profile.id, channel, consent, utcnow()))


def people(n: int) -> list[tuple]:
    return [(f"p{i:03d}", f"person{i}@example.com", f"+1512555{i:04d}") for i in range(n)]


def test_flipped_consent_is_found_per_channel_and_repair_restores_it(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, "optins", people(12))
    config = config_for(warehouse_url, sandbox)
    assert sync(config, wh, sandbox, "subscribe").status == "success"

    clean = verify(config, wh, sandbox, "subscribe", sample=None)
    assert (clean.delivered, clean.checked, clean.in_step) == (12, 12, 12)
    assert not clean.drifted and not clean.samples

    flip(sandbox, "person2@example.com", "email.marketing", "UNSUBSCRIBED")
    flip(sandbox, "person5@example.com", "sms.marketing", "UNSUBSCRIBED")
    state = sandbox.state
    state.delete_profile(state.find_profile(email="person8@example.com").id)
    reads = len(state.requests)

    found = verify(config, wh, sandbox, "subscribe", sample=None)
    assert found.drifted == {"consent_changed": 2, "missing": 1}
    assert (found.checked, found.in_step, found.repaired) == (12, 9, 0)
    by_key = {d.key: d for d in found.samples}
    email, sms = by_key["p002"], by_key["p005"]
    assert (email.kind, email.field, email.warehouse, email.klaviyo) == (
        "consent_changed",
        "email.marketing",
        "SUBSCRIBED",
        "UNSUBSCRIBED",
    )
    assert (sms.field, sms.klaviyo) == ("sms.marketing", "UNSUBSCRIBED")
    assert by_key["p008"].kind == "missing"
    assert all(r.method == "GET" for r in state.requests[reads:])  # nothing written
    assert state.consent(state.find_profile(email="person2@example.com").id, "email.marketing") == (
        "UNSUBSCRIBED"
    )

    repaired = verify(config, wh, sandbox, "subscribe", sample=None, repair=True)
    assert repaired.repaired == 3
    again = sync(config, wh, sandbox, "subscribe")
    assert again.planned == {"added": 3} and sum(again.delivered.values()) == 3
    after = verify(config, wh, sandbox, "subscribe", sample=None)
    assert (after.checked, after.in_step, sum(after.drifted.values())) == (12, 12, 0)
    for i in range(12):  # exact equality: every person's both channels as the warehouse says
        profile = state.find_profile(email=f"person{i}@example.com")
        assert state.consent(profile.id, "email.marketing") == "SUBSCRIBED"
        assert state.consent(profile.id, "sms.marketing") == "SUBSCRIBED"


def test_unsubscribe_is_verified_when_it_sends_added_rows_and_says_why_not_otherwise(
    duckdb_url, sandbox
):
    wh = Warehouse(duckdb_url)
    load(wh, "optouts", people(5))
    config = config_for(duckdb_url, sandbox)
    assert sync(config, wh, sandbox, "unsubscribe").status == "success"
    assert sum(verify(config, wh, sandbox, "unsubscribe").drifted.values()) == 0

    flip(sandbox, "person1@example.com", "email.marketing", "SUBSCRIBED")
    found = verify(config, wh, sandbox, "unsubscribe")
    assert found.drifted == {"consent_changed": 1} and found.in_step == 4
    assert (found.samples[0].key, found.samples[0].klaviyo) == ("p001", "SUBSCRIBED")

    on_deleted = config_for(duckdb_url, sandbox, unsubscribe_on="[deleted]")
    skipped = verify(on_deleted, wh, sandbox, "unsubscribe")
    assert (skipped.checked, sum(skipped.unchecked.values())) == (0, 5)
    assert "acts on deleted rows only" in next(iter(skipped.unchecked))
