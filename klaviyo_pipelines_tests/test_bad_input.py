"""Bad and awkward input: each bad row rejected on its own, every odd value serialised right,
and no value from the warehouse or the config ever becoming SQL text or a Klaviyo filter.

Rows come from real DuckDB and PostgreSQL columns of each type (NaN and Infinity doubles,
decimals, naive and aware timestamps, dates, bytes, nested JSON, long and non-ASCII text) and go
over real HTTP to the sandbox, which checks every body against Klaviyo's schema.
"""

from __future__ import annotations

import base64

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.actions.events import derived_unique_id
from klaviyo_pipelines.config import ConfigError, parse_config
from klaviyo_pipelines.dagster_defs.metadata import sync_metadata
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY

COLUMNS = ["id", "email", "phone", "ext", "name", "score", "amount", "seen_at", "seen_tz"]
COLUMNS += ["born", "blob", "attrs"]
TYPED = {  # the warehouse's own types, made by the model's SQL from text
    "duckdb": {
        "score": "CAST(score AS DOUBLE)",
        "amount": "CAST(amount AS DECIMAL(12, 2))",
        "seen_at": "CAST(seen_at AS TIMESTAMP)",
        "seen_tz": "CAST(seen_tz AS TIMESTAMPTZ)",
        "born": "CAST(born AS DATE)",
        "blob": "encode(blob)",
        "attrs": """from_json(attrs, '{"tier": "VARCHAR", "tags": ["VARCHAR"]}')""",
    },
    "postgresql": {
        "score": "CAST(score AS DOUBLE PRECISION)",
        "amount": "CAST(amount AS NUMERIC(12, 2))",
        "seen_at": "CAST(seen_at AS TIMESTAMP)",
        "seen_tz": "CAST(seen_tz AS TIMESTAMPTZ)",
        "born": "CAST(born AS DATE)",
        "blob": "convert_to(blob, 'UTF8')",
        "attrs": "CAST(attrs AS JSONB)",
    },
}
NON_ASCII = "Zoë 李小龙 مرحبا 🎉 \u00a0tab\tend"
LONG = "ł" * 30_000  # 60 KB of UTF-8 in one field: long, but within Klaviyo's 100 KB
ATTRS = '{"tier": "gold", "tags": ["a", "ü"]}'
GOOD = {
    "score": "NaN",
    "amount": "12.50",
    "seen_at": "2024-01-02 03:04:05",
    "seen_tz": "2024-01-02 03:04:05+02:00",
    "born": "2024-01-02",
    "blob": "héllo",
    "attrs": ATTRS,
}
# What Klaviyo must receive for GOOD, whatever the warehouse.
EXPECTED = {
    "score": None,
    "amount": 12.5,
    "seen_at": "2024-01-02T03:04:05Z",
    "seen_tz": "2024-01-02T01:04:05Z",
    "born": "2024-01-02",
    "blob": base64.b64encode("héllo".encode()).decode(),
    "attrs": {"tier": "gold", "tags": ["a", "ü"]},
}


def person(key, email=None, phone=None, ext=None, name=None, **values) -> tuple:
    typed = {**GOOD, **values}
    return (key, email, phone, ext, name, *(typed[c] for c in COLUMNS[5:]))


ROWS = [
    person("good-nan", "nan@example.com", name=NON_ASCII),
    person("good-inf", "inf@example.com", "+442071838750", name=LONG, score="Infinity"),
    person("good-neg", "neg@example.com", ext="ext-1", score="-Infinity", amount="3.00"),
    person("no-id", name="Nobody"),
    person("bad-email", "not an email", name="A"),
    person("bad-phone", "p@example.com", "12"),
    person("long-ext", "x@example.com", ext="e" * 300),
    person("huge", "huge@example.com", name="x" * 120_000),
    person(None, "nullkey@example.com"),
    person("dup", "dup1@example.com"),
    person("dup", "dup2@example.com"),
]
CONFIG = """
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base}"}}
models:
  people: {{sql: "{sql}", primary_key: id}}
syncs:
  profiles:
    model: people
    action: upsert_profile
    mapping:
      phone_number: phone
      external_id: ext
      first_name: name
      properties: {{{properties}}}
  events:
    model: people
    action: track_event
    mapping:
      phone_number: phone
      external_id: ext
      time: seen_tz
      properties: {{{properties}}}
    settings: {{metric_name: Odd Values}}
"""


def load(wh: Warehouse) -> None:
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS weird"))
        conn.execute(sa.text("DROP TABLE IF EXISTS weird.people"))
        columns = ", ".join(f"{c} VARCHAR" for c in COLUMNS)
        conn.execute(sa.text(f"CREATE TABLE weird.people ({columns})"))
        wh.bulk_insert(conn, "weird.people", COLUMNS, ROWS)


def config_for(url: str, sandbox: Sandbox):
    dialect = "duckdb" if url.startswith("duckdb") else "postgresql"
    listed = ", ".join(TYPED[dialect].get(c, c) + f" AS {c}" for c in COLUMNS)
    sql = f"select {listed} from weird.people".replace('"', '\\"')
    properties = ", ".join(f"{c}: {c}" for c in EXPECTED)
    text = CONFIG.format(url=url, base=sandbox.url, sql=sql, properties=properties)
    return parse_config(text, "weird.yaml")


def sync(config, wh: Warehouse, sandbox: Sandbox, name: str) -> SyncReport:
    take_snapshot(wh, config.models["people"], config.path)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.05) as client:
        return run_sync(config, name, wh, client)


REJECTED = {  # key -> (field, words of the reason)
    "no-id": (None, "no identifier"),
    "bad-email": ("email", "not a valid email address"),
    "bad-phone": ("phone_number", "cannot be converted to E.164"),
    "long-ext": ("external_id", "is 300 characters; Klaviyo allows 255"),
    "<NULL>": ("id", "have a NULL id; they are not sent"),
    "dup": ("id", "share id 'dup'"),
}


def test_bad_rows_are_rejected_alone_and_odd_values_arrive_as_json(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh)
    config = config_for(warehouse_url, sandbox)

    report = sync(config, wh, sandbox, "profiles")
    assert report.status == "success", report.error
    assert sum(report.delivered.values()) == 3
    rejected = {**REJECTED, "huge": (None, "Klaviyo accepts at most 102,400")}
    ledger = {e.key: e for e in ledger_entries(wh, "profiles")}
    assert ledger.keys() == rejected.keys()
    for key, (field, words) in rejected.items():
        assert ledger[key].field == field and words in ledger[key].reason, ledger[key]
        assert ledger[key].kind is FailureKind.INVALID
    failures = sync_metadata(report)["klaviyo/failures"].value.records
    shown = {r.data["key"]: (r.data["field"], r.data["reason"]) for r in failures}
    assert shown.keys() == rejected.keys()  # the run's metadata names each row too
    assert all(shown[k][0] == (f or "") and w in shown[k][1] for k, (f, w) in rejected.items())

    nan = sandbox.state.find_profile(email="nan@example.com").attributes
    assert nan["first_name"] == NON_ASCII
    assert nan["properties"] == {k: v for k, v in EXPECTED.items() if k != "score"}  # NaN: null,
    inf = sandbox.state.find_profile(email="inf@example.com").attributes  # omitted by default
    assert inf["first_name"] == LONG and inf["phone_number"] == "+442071838750"
    assert "score" not in inf["properties"]
    neg = sandbox.state.find_profile(email="neg@example.com").attributes
    assert neg["external_id"] == "ext-1"
    assert "score" not in neg["properties"] and neg["properties"]["amount"] == 3

    events = sync(config, wh, sandbox, "events")
    assert events.status == "success", events.error
    # "huge" is a valid event: only a single string over 100 KB is refused
    assert sum(events.delivered.values()) == 4
    assert {e.key for e in ledger_entries(wh, "events")} == REJECTED.keys()
    by_id = {e.unique_id: e for e in sandbox.state.events}
    event = by_id[derived_unique_id("events", "good-nan")]
    assert event.properties == EXPECTED
    assert event.time.isoformat() == "2024-01-02T01:04:05+00:00"
    assert len(by_id) == 4
    wh.dispose()


HOSTILE = "'); DROP TABLE weird.people; --"
INJECTION = 'x"]),equals(external_id,"victim'  # would widen a naively formatted filter


def test_hostile_values_never_reach_sql_text_or_a_klaviyo_filter(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    statements: list[str] = []
    sa.event.listen(
        wh.engine, "before_cursor_execute", lambda *args: statements.append(args[2]), retval=False
    )
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS weird"))
        conn.execute(sa.text("DROP TABLE IF EXISTS weird.people"))
        conn.execute(sa.text("CREATE TABLE weird.people (id VARCHAR, email VARCHAR, ext VARCHAR)"))
        wh.bulk_insert(
            conn,
            "weird.people",
            ["id", "email", "ext"],
            [(HOSTILE, "h@example.com", INJECTION), ("plain", "p@example.com", HOSTILE)],
        )
    members = [
        sandbox.state.create_profile({"external_id": ext}).id for ext in (INJECTION, "victim")
    ]
    churn = sandbox.state.create_list("Churn")
    sandbox.state.add_members(churn.id, members)
    text = f"""
warehouse: {{url: "{warehouse_url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  people: {{table: weird.people, primary_key: id}}
syncs:
  upsert: {{model: people, action: upsert_profile, mapping: {{external_id: ext}}}}
  remove: {{model: people, action: remove_profile, mapping: {{external_id: ext}},
           settings: {{list_id: {churn.id}}}}}
"""
    config = parse_config(text, "hostile.yaml")
    statements.clear()
    take_snapshot(wh, config.models["people"], config.path)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url) as client:
        assert run_sync(config, "remove", wh, client).status == "success"
        assert run_sync(config, "upsert", wh, client).status == "success"

    assert statements and not [s for s in statements if "DROP TABLE weird" in s or "victim" in s]
    with wh.engine.connect() as conn:  # the table is still there, both rows intact
        assert conn.execute(sa.text("SELECT count(*) FROM weird.people")).scalar() == 2
    # the filter matched the hostile external_id literally, not the victim
    assert sandbox.state.list_members(churn.id) == {members[1]}
    hostile = sandbox.state.find_profile(email="h@example.com")
    assert hostile.attributes["external_id"] == INJECTION
    assert sandbox.state.find_profile(email="p@example.com").attributes["external_id"] == HOSTILE
    wh.dispose()


BASE = """
warehouse: {url: "duckdb:///x.duckdb", state_schema: klaviyo_sync}
klaviyo: {api_key: "${KLAVIYO_API_KEY}"}
models:
  people: {table: weird.people, primary_key: id}
syncs:
  profiles: {model: people, action: upsert_profile}
"""


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("profiles:", '"profiles; DROP TABLE x":', "syncs.profiles; DROP TABLE x"),
        ("  people:", '  "people\\"--":', 'models.people"--'),
        ("state_schema: klaviyo_sync", 'state_schema: "s; --"', "warehouse.state_schema"),
        ("table: weird.people", 'table: "weird.people; DROP TABLE y"', "models.people.table"),
        ("table: weird.people", 'table: "weird.\\"p\\""', "models.people.table"),
    ],
)
def test_names_that_are_not_safe_sql_identifiers_are_refused(old, new, key):
    text = BASE.replace(old, new)
    if old == "  people:":
        text = text.replace("model: people", 'model: "people\\"--"')
    with pytest.raises(ConfigError) as error:
        parse_config(text, "names.yaml")
    assert error.value.key == key and "not a valid name" in error.value.reason
