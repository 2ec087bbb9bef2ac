"""Property tests of the row-to-payload builders: any row becomes a request Klaviyo accepts, or
is rejected with a field and a reason (InvalidRow), never an exception.

Hypothesis draws rows of every value a warehouse driver hands over (NULL, text of any script,
huge and NaN numbers, decimals, naive and aware datetimes from any time zone, dates, bytes,
nested JSON), plus values shaped like good identifiers so the accepting paths are explored too.
Each prepared row's request body is checked against Klaviyo's official schema, then run through
the sandbox's operation in-process (its per-row rules: identifiers, E.164, time window, ...).
"""

from __future__ import annotations

import json
import os
import string
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from klaviyo_pipelines.actions.base import Action
from klaviyo_pipelines.actions.factory import build_action
from klaviyo_pipelines.actions.lookup import Identifiers, lookup_requests
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.actions.values import dumps, dumps_row, iso_datetime, json_value
from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.sandbox.app import SandboxApp
from klaviyo_pipelines.sandbox.filters import parse_filter
from klaviyo_pipelines.sandbox.jobs import JobWorker
from klaviyo_pipelines.sandbox.messages import ApiRequest
from klaviyo_pipelines.sandbox.ratelimit import RateLimiter
from klaviyo_pipelines.sandbox.schemas import registry
from klaviyo_pipelines.sandbox.state import SandboxState
from klaviyo_pipelines.warehouse.changes import ChangeRow

KEY = "pk_property_tests"
NOW = datetime.now(UTC)
EXAMPLES = settings(
    max_examples=int(os.environ.get("KLAVIYO_PIPELINES_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ---- values a warehouse hands over -----------------------------------------------------------

text = st.text(max_size=40) | st.text(alphabet=string.printable, max_size=10)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers() | st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    text,
    st.binary(max_size=20),
    st.datetimes(timezones=st.none() | st.timezones()),
    st.dates(),
    st.times(),
    st.uuids(),
)
edges = st.sampled_from(  # values that overflow a naive conversion
    [
        Decimal("1E+5000"),
        Decimal("-1.5E+400"),
        Decimal("1E-500"),
        Decimal("sNaN"),
        datetime.min.replace(tzinfo=timezone(timedelta(hours=14))),
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-12))),
        "\u0000",
        "\ud7ff\ue000\U0010ffff",
        "x" * 120_000,
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)
anything = scalars | json_values | edges
emails = st.one_of(
    st.from_regex(
        r"[a-z0-9][a-z0-9._+-]{0,15}@[a-z0-9]{1,10}(\.[a-z0-9-]{1,8})?\.[a-z]{2,6}", fullmatch=True
    ),
    st.emails(),
    st.sampled_from(["Ann.Lee+tag@Example.co.uk", "no@tld", "a@b.c", " pad@example.com "]),
)
valid_phones = st.sampled_from(
    ["+15125550123", "(512) 555-0199", "+44 20 7183 8750", "+4930123456"]
)
phones = st.one_of(
    valid_phones,
    valid_phones,
    valid_phones,
    st.from_regex(r"\+?[0-9 ()-]{1,18}", fullmatch=True),
)
times = st.one_of(
    st.datetimes(
        min_value=datetime(1985, 1, 1), max_value=datetime(2028, 1, 1), timezones=st.timezones()
    ),
    st.just((NOW - timedelta(days=3)).isoformat()),
    st.dates(min_value=datetime(1980, 1, 1).date(), max_value=datetime(2030, 1, 1).date()),
)


numbers = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(-1e9, 1e9),
    st.decimals(-(10**6), 10**6, places=2),
    st.sampled_from(["12.50", " 3 ", "-0.0"]),
)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Plausible values 6 times in 10, NULL 2, anything at all 2 (one_of would weigh each
    branch of `anything` like `strategy`)."""
    return st.integers(0, 9).flatmap(
        lambda n: strategy if n < 6 else st.none() if n < 8 else anything
    )


def rows(columns: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    return st.fixed_dictionaries(columns)


# ---- the actions, as a sync configures them --------------------------------------------------

SYNCS = {
    "upsert_profile": (
        "{phone_number: phone, external_id: ext, first_name: first, location: {city: city, "
        "latitude: lat}, properties: {a: p1, b: p2}}",
        "{country_code: US}",
    ),
    "track_event": (
        "{phone_number: phone, external_id: ext, metric_name: metric, time: at, value: amount, "
        "value_currency: currency, unique_id: uid, properties: {a: p1, b: p2}}",
        "{country_code: US}",
    ),
    "order_completed": (
        "{phone_number: phone, external_id: ext, time: at, value: amount, products: products, "
        "properties: {a: p1, b: p2}}",
        "{value_currency: EUR}",
    ),
    "subscribe_profile": (
        "{phone_number: phone, list_id: list_ref, custom_source: source, "
        "historical_import: hist, consented_at: at}",
        "{country_code: US}",
    ),
    "unsubscribe_profile": ("{phone_number: phone, list_id: list_ref}", "{country_code: US}"),
}
COLUMNS = {
    "email": maybe(emails),
    "phone": maybe(phones),
    "ext": maybe(text),
    "first": anything,
    "city": anything,
    "lat": maybe(numbers),
    "p1": anything,
    "p2": anything,
    "metric": maybe(st.just("Viewed Page") | text),
    "at": maybe(times),
    "amount": maybe(numbers),
    "currency": maybe(st.sampled_from(["USD", "eur", "XX"])),
    "uid": maybe(text),
    "products": st.one_of(
        st.lists(st.dictionaries(text, json_values, max_size=3), max_size=3),
        st.lists(json_values, max_size=3).map(json.dumps),
        anything,
    ),
    "list_ref": st.none() | st.just("LIST01"),
    "source": maybe(st.just("web form") | text),
    "hist": maybe(st.sampled_from([True, False, "yes", "no"])),
}
OPERATIONS = {  # (batch mode, single mode) operation ids of the request bodies
    "upsert_profile": ("bulk_import_profiles", "create_profile"),
    "track_event": ("bulk_create_events", "create_event"),
    "order_completed": ("bulk_create_events", "create_event"),
    "subscribe_profile": ("bulk_subscribe_profiles", "bulk_subscribe_profiles"),
    "unsubscribe_profile": ("bulk_unsubscribe_profiles", "bulk_unsubscribe_profiles"),
}
PATHS = {
    "bulk_import_profiles": "/api/profile-bulk-import-jobs",
    "create_profile": "/api/profiles",
    "bulk_create_events": "/api/event-bulk-create-jobs",
    "create_event": "/api/events",
    "bulk_subscribe_profiles": "/api/profile-subscription-bulk-create-jobs",
    "bulk_unsubscribe_profiles": "/api/profile-subscription-bulk-delete-jobs",
}


def action_for(name: str, batch: bool) -> Action:
    mapping, settings_ = SYNCS[name]
    settings_ = settings_.rstrip("}") + ("" if batch else ", batch: false") + "}"
    config = parse_config(
        f"""
warehouse: {{url: "duckdb:///unused.duckdb"}}
klaviyo: {{api_key: "${{KLAVIYO_API_KEY}}"}}
models:
  rows: {{table: rows, primary_key: id}}
syncs:
  s: {{model: rows, action: {name}, mapping: {mapping}, settings: {settings_}}}
""",
        "props.yaml",
    )
    return build_action(config.syncs["s"], ["id", *COLUMNS], config.path)


class Klaviyo:
    """The sandbox's request pipeline in-process: schema, then the operation's own rules."""

    def __init__(self) -> None:
        self.state = SandboxState()
        self.app = SandboxApp(
            api_key=KEY,
            state=self.state,
            worker=JobWorker(),
            limiter=RateLimiter(),
            enforce_rate_limits=False,
        )
        self.state.create_list("List", list_id="LIST01")

    def send(self, operation: str, body: bytes) -> None:
        registry().validate(operation, json.loads(body))  # Klaviyo's official schema
        self.state.reset()
        self.state.create_list("List", list_id="LIST01")
        headers = {
            "authorization": f"Klaviyo-API-Key {KEY}",
            "revision": "2026-07-15",
            "content-type": "application/vnd.api+json",
        }
        response = self.app.handle(ApiRequest("POST", PATHS[operation], [], headers, body))
        assert response.status < 300, (response.status, response.document, body[:2000])


KLAVIYO = Klaviyo()


def check(action: Action, operation: str, values: dict[str, Any], kind: ChangeKind) -> None:
    if kind is ChangeKind.DELETED:  # a deleted row's values come back from its stored JSON
        values = json.loads(dumps(json_value(values)))
    row = ChangeRow(key="k1", kind=kind, row_hash="h", values={"id": "k1", **values})
    try:
        (row,) = action.enrich(None, [row])  # type: ignore[arg-type]
        item = action.prepare(row)
    except InvalidRow as exc:
        assert isinstance(exc.reason, str) and exc.reason.strip()
        assert exc.field is None or isinstance(exc.field, str)
        event(f"rejected: {exc.field}")  # --hypothesis-show-statistics shows the mix
        return
    event("accepted")
    body = action.request_body([item])
    if operation in ("create_event", "create_profile") and body.startswith(b"["):
        for single in json.loads(body):  # single mode: each POST /api/events body
            KLAVIYO.send(operation, json.dumps(single).encode())
    else:
        KLAVIYO.send(operation, body)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "single"])
@pytest.mark.parametrize("name", sorted(SYNCS))
def test_any_row_becomes_an_accepted_request_or_an_invalid_row(name: str, batch: bool) -> None:
    action = action_for(name, batch)
    operation = OPERATIONS[name][0 if batch else 1]
    kinds = [k for k in (ChangeKind.ADDED, ChangeKind.DELETED) if k in action.info.allowed_kinds]

    @EXAMPLES
    @given(values=rows(COLUMNS), kind=st.sampled_from(kinds))
    def prop(values: dict[str, Any], kind: ChangeKind) -> None:
        check(action, operation, values, kind)

    prop()


@EXAMPLES
@given(
    wanted=st.lists(
        st.fixed_dictionaries({"email": maybe(emails), "phone": maybe(phones), "ext": maybe(text)}),
        min_size=1,
        max_size=30,
    )
)
def test_remove_profile_rows_become_lookups_that_name_exactly_their_identifiers(wanted) -> None:
    """Whatever characters an identifier holds, its lookup filter parses to exactly it."""
    remove = _remove_action()
    identifiers: list[Identifiers] = []
    for n, values in enumerate(wanted):
        row = ChangeRow(key=f"k{n}", kind=ChangeKind.ADDED, row_hash="h", values=values)
        try:
            identifiers.append(Identifiers(**remove.prepare(row).item))
        except InvalidRow as exc:
            assert exc.reason
    declared = registry().operations["get_profiles"].filters
    found: dict[str, set[str]] = {}
    for field, params in lookup_requests(identifiers):
        (expr,) = parse_filter(params["filter"], declared)
        assert expr.op == "any" and expr.field == field
        found.setdefault(field, set()).update(expr.values)
    for field in ("email", "phone_number", "external_id"):
        assert found.get(field, set()) == {
            getattr(i, field) for i in identifiers if getattr(i, field) is not None
        }


def _remove_action() -> Action:
    config = parse_config(
        """
warehouse: {url: "duckdb:///unused.duckdb"}
klaviyo: {api_key: "${KLAVIYO_API_KEY}"}
models:
  rows: {table: rows, primary_key: id}
syncs:
  s: {model: rows, action: remove_profile, mapping: {phone_number: phone, external_id: ext},
      settings: {list_id: LIST01, country_code: US}}
""",
        "props.yaml",
    )
    return build_action(config.syncs["s"], ["id", "email", "phone", "ext"], config.path)


def test_phone_verdicts_are_cached_per_raw_value_and_country() -> None:
    """The cache of phone verdicts never lends one country's reading to another."""
    from klaviyo_pipelines.actions.profile import normalise_phone

    national = "(512) 555-0199"
    for _ in range(2):  # the second round is answered from the cache
        assert normalise_phone(national, "US") == "+15125550199"
        with pytest.raises(InvalidRow) as missing:
            normalise_phone(national, None)
        assert missing.value.field == "phone_number"
        assert "no country_code to read it with" in missing.value.reason
        assert normalise_phone(f" {national} ", "US") == "+15125550199"  # stripped first
        assert normalise_phone("+44 20 7183 8750", "US") == "+442071838750"  # '+': own country
        with pytest.raises(InvalidRow, match=r"cannot be converted to E\.164"):
            normalise_phone("+1 555 0100", "US")  # not a real number, cached or not


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(text, anything, max_size=6))
def test_a_rows_state_json_is_the_same_by_the_fast_path(values) -> None:
    """`dumps_row` (orjson with json_value as fallback) writes exactly what the general path does."""
    assert dumps_row(values) == dumps(json_value(values))


@settings(max_examples=2000, deadline=None)
@given(st.datetimes(timezones=st.none() | st.just(UTC)))
def test_a_timestamp_by_orjson_reads_as_isoformat_in_utc(when: datetime) -> None:
    """`iso_datetime` writes a naive or UTC datetime by orjson: the text `isoformat` gives,
    with Z for UTC, from year 1 to 9999, with and without microseconds."""
    expected = when.replace(tzinfo=None).isoformat() + "Z"
    assert iso_datetime(when) == expected
