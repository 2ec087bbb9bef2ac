"""A request Klaviyo refuses for its own sake (a header, a query parameter) fails the run at
once and blames no row: no halving, nothing ledgered invalid, every row sent by the next run.

The sandbox refuses the requests the way Klaviyo does, over real HTTP: an impossible
`revision` header (400, `source.parameter: revision`), and a 400/422 naming a query parameter.
"""

from __future__ import annotations

import json

import pytest

from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.sandbox.errors import ApiError
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import FailureKind, ledger_entries
from klaviyo_pipelines_tests.test_upsert_profile_sync import config_for, customers, load, sync

ROWS = 300
BATCH = 50


def assert_refused_then_all_delivered(wh: Warehouse, sandbox: Sandbox, config, report, name):
    """The failed run sent one request and rejected nothing; the next delivers every row."""
    assert report.status == "failed", report.summary()
    assert name in (report.error or "") and "not a row" in (report.error or "")
    assert len(sandbox.state.requests) == 1, [(r.method, r.path) for r in sandbox.state.requests]
    assert report.requests == 1 and sum(report.rejected.values()) == 0
    entries = ledger_entries(wh, "profiles")
    assert not [e for e in entries if e.kind is FailureKind.INVALID]
    assert {e.kind for e in entries} == {FailureKind.TRANSIENT} and len(entries) == BATCH

    again = sync(config, wh, sandbox)
    assert again.status == "success", again.error
    assert again.held_invalid == 0 and sum(again.delivered.values()) == ROWS
    assert len(sandbox.state.profiles) == ROWS
    assert ledger_entries(wh, "profiles") == []


def test_a_refused_revision_header_fails_the_run_and_rejects_no_row(warehouse_url, sandbox):
    wh = Warehouse(warehouse_url)
    load(wh, customers(ROWS))
    config = config_for(warehouse_url, sandbox, settings=f"{{batch_size: {BATCH}}}")

    report = sync(config, wh, sandbox, revision="2026-02-30")  # the form passes, the date not
    assert_refused_then_all_delivered(wh, sandbox, config, report, "revision")
    wh.dispose()


@pytest.mark.parametrize("status", [400, 422])
def test_a_refused_query_parameter_fails_the_run_and_rejects_no_row(warehouse_url, sandbox, status):
    wh = Warehouse(warehouse_url)
    load(wh, customers(ROWS))
    config = config_for(warehouse_url, sandbox, settings=f"{{batch_size: {BATCH}}}")
    detail = "'bogus' is not a valid field for the resource 'profile'."
    refusal = ApiError.single(status, "invalid", detail, parameter="additional-fields[profile]")
    body = json.dumps(refusal.document())
    sandbox.faults.add(Fault(kind="status", status=status, body=body, method="POST"))

    report = sync(config, wh, sandbox)
    assert_refused_then_all_delivered(wh, sandbox, config, report, "additional-fields[profile]")
    wh.dispose()
