"""The API key is masked in all text from Klaviyo, however the JSON spells it: an error body
holding it `\\u`-escaped decodes to the key, which must reach no exception, ledger reason,
`--output json` sample or Dagster event.

The sandbox answers over real HTTP with a body naming the key escaped (fault injection's
`body`), the way a proxy or an echoing validation error could.
"""

from __future__ import annotations

import json
import pickle

import dagster as dg
import pytest

from klaviyo_pipelines.cli import main
from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.dagster_defs.execution import materialize_syncs
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.errors import PermanentError
from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.sandbox.errors import error_object
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import ledger_entries
from klaviyo_pipelines_tests.conftest import TEST_API_KEY
from klaviyo_pipelines_tests.test_secrets import event_log
from klaviyo_pipelines_tests.test_upsert_profile_sync import customers, load

ESCAPED = TEST_API_KEY.replace("t", "\\u0074")  # pk_\u0074es\u0074_...: JSON for the key
FULLY_ESCAPED = "".join(f"\\u{ord(c):04x}" for c in TEST_API_KEY)
MASK = "********"
BULK = "/api/profile-bulk-import-jobs"


def leaks(texts: list[str]) -> list[str]:
    """The texts holding the key, in any spelling the tests send."""
    return [t for t in texts if TEST_API_KEY in t or ESCAPED in t or FULLY_ESCAPED in t]


def refusal(status: int, echo: str, *, everywhere: bool = False, parameter: bool = False) -> str:
    """A JSON:API error body naming the key in its detail (and every other field if asked),
    written as raw JSON text so that the escape reaches the wire as sent."""
    marker = "KEY_HERE"
    error = error_object(
        status,
        marker if everywhere else "invalid",
        f"the value {marker} is not allowed",
        title=f"Refused {marker}" if everywhere else None,
        pointer=f"/data/{marker}" if everywhere else None,
        parameter=marker if everywhere or parameter else None,
        meta={"echo": marker, "nested": [{marker: marker}]} if everywhere else None,
    )
    return json.dumps({"errors": [error]}).replace(marker, echo)


@pytest.mark.parametrize(
    "echo", [ESCAPED, FULLY_ESCAPED, TEST_API_KEY], ids=["escaped", "all_escaped", "raw"]
)
def test_an_escaped_key_in_an_error_body_is_masked_in_every_field(sandbox, echo):
    sandbox.faults.add(Fault(kind="status", status=400, body=refusal(400, echo, everywhere=True)))
    with (
        KlaviyoClient(TEST_API_KEY, base_url=sandbox.url) as client,
        pytest.raises(PermanentError) as caught,
    ):
        client.post("/api/profiles", json={"data": {}})
    error = caught.value
    (detail,) = error.errors
    assert detail.detail == f"the value {MASK} is not allowed"
    assert detail.code == detail.parameter == MASK and detail.title == f"Refused {MASK}"
    assert detail.pointer == f"/data/{MASK}"
    assert detail.meta == {"echo": MASK, "nested": [{MASK: MASK}]}
    assert not leaks([str(error), repr(error), repr(error.errors), str(pickle.dumps(error))])


def test_the_key_echoed_in_a_success_document_is_masked(sandbox):
    profile = {"email": "echo@example.com", "properties": {"note": f"key {TEST_API_KEY}"}}
    with KlaviyoClient(TEST_API_KEY, base_url=sandbox.url) as client:
        doc = client.post(
            "/api/profiles", json={"data": {"type": "profile", "attributes": profile}}
        )
    assert doc["data"]["attributes"]["properties"]["note"] == f"key {MASK}"
    assert not leaks([json.dumps(doc)])


CONFIG = """
warehouse: {{url: "{url}"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}", base_url: "{base}", max_attempts: 1}}
models:
  customers: {{sql: "select * from shop.customers", primary_key: customer_id}}
syncs:
  in_dagster: {{model: customers, action: upsert_profile, settings: {{batch_size: 4}}}}
  in_the_cli: {{model: customers, action: upsert_profile, settings: {{batch_size: 4}}}}
  refused: {{model: customers, action: upsert_profile, settings: {{batch_size: 4}}}}
"""


def test_an_escaped_key_reaches_no_report_ledger_or_event(
    warehouse_url, sandbox: Sandbox, tmp_path, capsys
):
    wh = Warehouse(warehouse_url)
    load(wh, customers(8))
    path = tmp_path / "klaviyo_pipelines.yaml"
    path.write_text(CONFIG.format(url=warehouse_url, base=sandbox.url))
    config = parse_config(path.read_text(), str(path))
    instance = dg.DagsterInstance.ephemeral()

    # Refusals that could be about a row: halved down to each row, each rejected with the text.
    rows_refused = Fault(
        kind="status", status=400, count=None, path_prefix=BULK, body=refusal(400, ESCAPED)
    )
    sandbox.faults.add(rows_refused)
    in_dagster = materialize_syncs(config, ["in_dagster"], instance=instance)["in_dagster"]
    assert in_dagster["status"] == "success" and in_dagster["rejected"] == 8
    assert main(["--config", str(path), "sync", "--select", "in_the_cli", "--output", "json"]) == 0
    out, err = capsys.readouterr()
    in_the_cli = json.loads(out)
    # A refusal of the request itself (a parameter): the run fails with Klaviyo's text.
    sandbox.faults.clear()
    body = refusal(400, ESCAPED, parameter=True)
    sandbox.faults.add(Fault(kind="status", status=400, count=None, path_prefix=BULK, body=body))
    refused = materialize_syncs(config, ["refused"], instance=instance)["refused"]
    assert refused["status"] == "failed" and MASK in refused["error"]

    reasons = [e.reason for sync in ("in_dagster", "in_the_cli") for e in ledger_entries(wh, sync)]
    assert len(reasons) == 16 and all(MASK in reason for reason in reasons)
    samples = json.dumps(in_dagster["samples"]) + json.dumps(in_the_cli)
    assert MASK in samples
    texts = [*reasons, samples, json.dumps(refused), out, err, *event_log(instance)]
    assert not leaks(texts)
    wh.dispose()
