"""`snapshot: direct`: change sets read an unpartitioned table model where it is, without a
copy, on every engine that runs here, with the same outcomes as a copied model: exact
changes, NULL and duplicated keys ledgered, and a run consistent with itself while the table
changes under it.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from klaviyo_pipelines.config import Config, ConfigError, parse_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, plan_sync, run_sync
from klaviyo_pipelines.sandbox import Sandbox
from klaviyo_pipelines.warehouse import changes
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import snapshot_table, take_snapshot
from klaviyo_pipelines.warehouse.state import (
    FailureKind,
    delivered_count,
    ensure_tables,
    ledger_entries,
)
from klaviyo_pipelines_tests.conftest import TEST_API_KEY, state_schema_for
from klaviyo_pipelines_tests.test_dialects import EXPERIMENTAL, understood, warehouse_for
from klaviyo_pipelines_tests.test_warehouses import (
    NEWSLETTER,
    customer,
    customers_table,
    load,
    model_schema,
    open_warehouse,
    profile_by_email,
)

SYNCS = """
syncs:
  profiles:
    model: customers
    action: upsert_profile
    mapping: {external_id: customer_id, phone_number: phone, location: {city: city}}
    settings: {list_id: NEWSLT, batch_size: 50}
  leavers:
    model: customers
    action: remove_profile
    on: [deleted]
    settings: {list_id: NEWSLT}
"""


def config_for(url: str, sandbox: Sandbox, snapshot: str | None = None) -> Config:
    """A `table:` model of the customers table: direct unless `snapshot` says otherwise."""
    setting = f", snapshot: {snapshot}" if snapshot else ""
    table = f"{model_schema(url)}.customers"
    return parse_config(
        f"""
warehouse: {{url: "{url}", state_schema: {state_schema_for(url)}}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{sandbox.url}"}}
models:
  customers: {{table: {table}, primary_key: customer_id{setting}}}
{SYNCS}""",
        "test.yaml",
    )


def run(config: Config, wh: Warehouse, sandbox: Sandbox, sync: str, **kwargs) -> SyncReport:  # type: ignore[no-untyped-def]
    take_snapshot(wh, config.models[config.syncs[sync].model], config.path)
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url, max_backoff=0.2) as client:
        return run_sync(config, sync, wh, client, **kwargs)


def has_copy(wh: Warehouse) -> bool:
    with wh.engine.connect() as conn:
        return wh.table_exists(conn, snapshot_table("customers"))


def shop(edits: dict[int, dict[str, object]], count: int = 3000) -> list[tuple]:
    bad = {i: "not-an-email" for i in range(count) if i % 100 == 7}
    return [customer(i, bad.get(i), **edits.get(i, {})) for i in range(count)]


def test_direct_first_sync_rerun_edits_adds_deletes_and_bad_keys(every_warehouse_url, sandbox):
    wh = open_warehouse(every_warehouse_url)
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    table = customers_table(every_warehouse_url)
    bad_keys = [customer(9001, customer_id=None), customer(9002, customer_id=None)]
    bad_keys += [customer(9003, customer_id="dup"), customer(9004, customer_id="dup")]
    load(wh, table, shop({}) + bad_keys)
    config = config_for(every_warehouse_url, sandbox)
    assert config.models["customers"].snapshot == "direct"

    first = run(config, wh, sandbox, "profiles")
    assert first.status == "success", first.error
    assert first.planned == {"added": 3000}
    assert sum(first.delivered.values()) == 2970
    assert sum(first.rejected.values()) == 30 and first.key_rejected == 4
    invalid = [e for e in ledger_entries(wh, "profiles") if e.kind is FailureKind.INVALID]
    assert {e.field for e in invalid if e.key.startswith("c")} == {"email"}
    keyed = {e.key: e.reason for e in invalid if not e.key.startswith("c")}
    assert set(keyed) == {"<NULL>", "dup"}
    assert keyed["dup"].startswith("2 rows of model 'customers' share customer_id 'dup'")
    assert delivered_count(wh, "profiles") == 2970
    assert not has_copy(wh)  # read where it is: no snapshot table
    assert run(config, wh, sandbox, "leavers").acknowledged == 3000

    again = run(config, wh, sandbox, "profiles")
    assert (again.status, again.requests, again.planned) == ("success", 0, {})
    assert again.held_invalid == 30 and again.key_rejected == 4

    # 10 edits (one a city set to NULL) -> exactly 10 updates. `load` drops the user's table
    # and makes it anew: nothing of ours depends on it (PostgreSQL would refuse otherwise).
    edits: dict[int, dict[str, object]] = {i: {"first_name": f"Ēdith{i}"} for i in range(20, 29)}
    edits[13] = {"city": None}
    load(wh, table, shop(edits) + bad_keys)
    third = run(config, wh, sandbox, "profiles")
    assert third.status == "success", third.error
    assert (third.planned, sum(third.delivered.values()), third.key_rejected) == (
        {"updated": 10},
        10,
        4,
    )
    assert profile_by_email(sandbox, "c21@shop.example").attributes["first_name"] == "Ēdith21"

    # 5 rows added, 4 deleted, the duplicate resolved (its one row added), a NULL key gone.
    rows = [r for r in shop(edits, 3005) if r[0] not in {"c00002", "c00003", "c00500", "c02999"}]
    load(wh, table, [*rows, bad_keys[0], customer(9003, customer_id="dup")])
    fourth = run(config, wh, sandbox, "profiles")
    assert fourth.planned == {"added": 6} and fourth.acknowledged == 4
    assert sum(fourth.delivered.values()) == 6 and fourth.key_rejected == 1
    keyed_now = {e.key for e in ledger_entries(wh, "profiles") if not e.key.startswith("c")}
    assert keyed_now == {"<NULL>"}
    assert profile_by_email(sandbox, "c9003@shop.example").attributes["external_id"] == "dup"
    leavers = run(config, wh, sandbox, "leavers")
    assert leavers.status == "success", leavers.error
    assert leavers.planned == {"deleted": 4} and sum(leavers.delivered.values()) == 4
    assert run(config, wh, sandbox, "profiles").requests == 0


def test_switching_between_copy_and_direct_sends_nothing(every_warehouse_url, sandbox):
    wh = open_warehouse(every_warehouse_url)
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    load(wh, customers_table(every_warehouse_url), shop({}, 300))
    copy = config_for(every_warehouse_url, sandbox, snapshot="copy")
    assert sum(run(copy, wh, sandbox, "profiles").delivered.values()) == 297
    assert has_copy(wh)

    direct = config_for(every_warehouse_url, sandbox)
    switched = run(direct, wh, sandbox, "profiles")
    assert (switched.requests, switched.planned, switched.held_invalid) == (0, {}, 3)
    assert not has_copy(wh)  # the copy left by `copy` is dropped, so nothing reads it
    assert run(copy, wh, sandbox, "profiles").requests == 0


def test_a_table_edited_between_the_change_set_and_the_delivery(every_warehouse_url, sandbox):
    """The run sends the rows it hashed; the next run finds exactly what changed meanwhile."""
    wh = open_warehouse(every_warehouse_url)
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    table = customers_table(every_warehouse_url)
    load(wh, table, [customer(i) for i in range(200)])
    config = config_for(every_warehouse_url, sandbox)
    late = range(190, 200)  # the last keys: in the last batch, sent after the edit

    def edit_once(report: SyncReport, batch: object) -> None:
        if edited:
            return
        edited.append(True)
        with wh.engine.begin() as conn:
            for i in late:
                conn.execute(
                    table.update()
                    .where(table.c.customer_id == f"c{i:05d}")
                    .values(first_name=f"Late{i}")
                )
            conn.execute(table.delete().where(table.c.customer_id.in_(["c00198", "c00199"])))
            conn.execute(
                table.insert().values(dict(zip(table.c.keys(), customer(197), strict=True)))
            )
            conn.execute(
                table.insert().values(dict(zip(table.c.keys(), customer(500), strict=True)))
            )

    edited: list[bool] = []
    first = run(config, wh, sandbox, "profiles", on_batch=edit_once)
    assert edited and first.status == "success", first.error
    assert (first.planned, sum(first.delivered.values())) == ({"added": 200}, 200)
    # sent as hashed: the edit reached no profile
    for i in (190, 198, 199):
        assert profile_by_email(sandbox, f"c{i}@shop.example").attributes["first_name"] == (
            f"Näme{i}"
        )

    second = run(config, wh, sandbox, "profiles")
    assert second.status == "success", second.error
    # c00190..c00196 edited; c00197 now duplicated; c00198-9 deleted; c00500 added
    assert second.planned == {"updated": 7, "added": 1}
    assert second.acknowledged == 2 and second.key_rejected == 2
    assert profile_by_email(sandbox, "c190@shop.example").attributes["first_name"] == "Late190"
    third = run(config, wh, sandbox, "profiles")
    assert (third.requests, third.planned) == (0, {})


def test_plan_and_the_key_check_of_a_direct_model_write_no_copy(every_warehouse_url, sandbox):
    wh = open_warehouse(every_warehouse_url)
    rows = [customer(i) for i in range(50)] + [customer(60, customer_id=None)]
    rows += [customer(61, customer_id="c00001")]
    load(wh, customers_table(every_warehouse_url), rows)
    config = config_for(every_warehouse_url, sandbox)
    stats = take_snapshot(wh, config.models["customers"], config.path)
    assert (stats.rows, stats.null_keys, stats.duplicate_keys, stats.duplicate_rows) == (
        52,
        1,
        1,
        2,
    )
    report = plan_sync(config, "profiles", wh)
    assert report.planned == {"added": 49} and report.key_rejected == 3
    assert delivered_count(wh, "profiles") == 0 and not has_copy(wh)
    assert plan_sync(config, "profiles", wh).planned == {"added": 49}  # nothing recorded


def test_the_snapshot_asset_of_a_direct_model_checks_keys_and_names_the_table(
    duckdb_url, sandbox, monkeypatch
):
    import dagster as dg

    from klaviyo_pipelines.dagster_defs.execution import materialize_syncs
    from klaviyo_pipelines.dagster_defs.translator import snapshot_key

    wh = open_warehouse(duckdb_url)
    sandbox.state.create_list("Newsletter", list_id=NEWSLETTER)
    rows = [customer(i) for i in range(20)] + [customer(30, customer_id="c00003")]
    load(wh, customers_table(duckdb_url), rows)
    config = config_for(duckdb_url, sandbox)
    instance = dg.DagsterInstance.ephemeral()
    reports = materialize_syncs(config, ["profiles"], instance=instance)
    assert reports["profiles"]["status"] == "success"
    key = snapshot_key("customers")
    metadata = instance.get_latest_materialization_event(key).asset_materialization.metadata
    assert metadata["dagster/row_count"].value == 21
    assert metadata["dagster/table_name"].value == "shop.customers"
    assert metadata["warehouse/snapshot"].value == "direct"
    assert metadata["warehouse/duplicate_keys"].value == 1
    assert [c.name for c in metadata["dagster/column_schema"].value.columns][:2] == [
        "customer_id",
        "email",
    ]
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(key, "primary_key_unique_and_not_null")]
    )
    # the check ran and did not pass: the duplicated key (a warning; the sync went on)
    assert check[dg.AssetCheckKey(key, "primary_key_unique_and_not_null")].status.value == "FAILED"
    assert not has_copy(wh)


BASE = """
models:
  customers: {table: shop.customers, primary_key: id%s}
  items: {table: shop.items, primary_key: line_id%s}
  lines: {sql: "select * from shop.items", primary_key: line_id}
syncs:
  orders:
    model: customers
    action: order_completed
    mapping: {email: email}
    settings: {line_items: {model: items, order_key: order_id}}
"""


def modes(customers: str = "", items: str = "") -> dict[str, str]:
    config = parse_config(BASE % (customers, items), "shop.yaml")
    return {name: model.snapshot for name, model in config.models.items()}


def test_direct_is_the_default_for_unpartitioned_tables_only():
    # a model read as line items page by page keeps its copy; a query is copied
    assert modes() == {"customers": "direct", "items": "copy", "lines": "copy"}
    assert modes(customers=", snapshot: copy")["customers"] == "copy"
    partitioned = ", partition: {column: at, start: 2026-01-01}"
    assert modes(customers=partitioned)["customers"] == "copy"
    assert modes(customers=", audience: {column: a}")["customers"] == "copy"


@pytest.mark.parametrize(
    ("customers", "items", "key", "says"),
    [
        (
            ", snapshot: direct, partition: {column: at, start: 2026-01-01}",
            "",
            "customers",
            "a partitioned",
        ),
        (", snapshot: direct, audience: {column: a}", "", "customers", "a partitioned or audience"),
        ("", ", snapshot: direct", "items", "sync 'orders' reads this model page by page"),
        (", snapshot: view", "", "customers", "must be copy or direct, got 'view'"),
    ],
)
def test_direct_where_it_cannot_be_is_a_config_error(customers, items, key, says):
    with pytest.raises(ConfigError) as raised:
        parse_config(BASE % (customers, items), "shop.yaml")
    assert raised.value.path == "shop.yaml" and raised.value.key == f"models.{key}.snapshot"
    assert says in str(raised.value)


@pytest.mark.parametrize("engine", EXPERIMENTAL)
def test_direct_change_set_statements_parse_for_every_engine(engine, monkeypatch):
    wh, recorder = warehouse_for(engine, monkeypatch)
    monkeypatch.setattr(wh, "columns_of_query", lambda *_args: ["id", "email"])
    config = parse_config(BASE % ("", ""), "shop.yaml")
    changes.compute_change_set(
        wh,
        config.syncs["orders"],
        ["email"],
        "f" * 16,
        model=config.models["customers"],
    )
    joined = "\n".join(recorder.statements)
    assert "kp_keys" in joined and "snapshot__" not in joined
    for statement in recorder.statements:
        understood(statement, engine)


def test_nothing_of_ours_depends_on_the_users_table_in_postgresql(postgres_url, sandbox):
    """A direct model creates no view: the user's DROP TABLE (no CASCADE) goes through."""
    wh = open_warehouse(postgres_url)
    table = customers_table(postgres_url)
    load(wh, table, [customer(i) for i in range(5)])
    config = config_for(postgres_url, sandbox)
    ensure_tables(wh, "profiles")
    take_snapshot(wh, config.models["customers"], config.path)
    plan_sync(config, "profiles", wh)
    with wh.engine.begin() as conn:
        dependents = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
                "WHERE d.refobjid = 'shop.customers'::regclass"
            )
        ).scalar()
        assert dependents == 0
        conn.execute(sa.text("DROP TABLE shop.customers"))
