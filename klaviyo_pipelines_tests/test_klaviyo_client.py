"""KlaviyoClient against the sandbox over real HTTP (no mocks): headers, retries, typed errors,
pacing, pagination, and that the API key never leaks."""

from __future__ import annotations

import gc
import logging
import pickle
import time
import traceback
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from klaviyo_pipelines.klaviyo.client import KlaviyoClient, Secret
from klaviyo_pipelines.klaviyo.errors import (
    ApiErrorDetail,
    AuthError,
    ConflictError,
    KlaviyoError,
    PermanentError,
    RateLimitedError,
    TransientError,
    error_for_status,
    parse_error_details,
)
from klaviyo_pipelines.sandbox import Fault, Sandbox

API_KEY = "pk_test_5ecret_DO_NOT_LEAK_1234567890"
MEDIA = "application/vnd.api+json"


@pytest.fixture(scope="module")
def server() -> Iterator[Sandbox]:
    sb = Sandbox(api_key=API_KEY, port=0, time_scale=1.0, enforce_rate_limits=True).start()
    yield sb
    sb.stop()


@pytest.fixture()
def sb(server: Sandbox) -> Sandbox:
    server.reset()
    return server


def make_client(sb: Sandbox, **overrides: Any) -> KlaviyoClient:
    options: dict[str, Any] = {
        "base_url": sb.url,
        "timeout": 2.0,
        "max_attempts": 4,
        "max_backoff": 0.02,
        "max_retry_after": 5.0,
        "time_scale": sb.limiter.time_scale,
    }
    options.update(overrides)
    return KlaviyoClient(options.pop("api_key", API_KEY), **options)


@pytest.fixture()
def client(sb: Sandbox) -> Iterator[KlaviyoClient]:
    with make_client(sb) as c:
        yield c


def profile_body(email: str, **attrs: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": {"email": email, **attrs}}}


def statuses(sb: Sandbox, path: str | None = None) -> list[int]:
    return [r.status for r in sb.state.requests if path is None or r.path == path]


# ---- headers and success paths ------------------------------------------------------------


def test_sends_auth_revision_and_media_type_headers(sb: Sandbox, client: KlaviyoClient) -> None:
    response = client.request("POST", "/api/profiles", json=profile_body("a@example.com"))
    assert response.status_code == 201  # the sandbox checked key, revision and Content-Type
    sent = response.request.headers
    assert sent["Authorization"] == f"Klaviyo-API-Key {API_KEY}"
    assert sent["revision"] == "2026-07-15"
    assert sent["Accept"] == MEDIA
    assert sent["Content-Type"] == MEDIA
    assert sent["User-Agent"].startswith("klaviyo-pipelines/")
    assert statuses(sb) == [201]


def test_revision_header_is_the_configured_one(sb: Sandbox) -> None:
    with make_client(sb, revision="2026-13-45") as c, pytest.raises(PermanentError) as info:
        c.get("/api/profiles")
    assert info.value.status == 400
    assert info.value.errors[0].parameter == "revision"


def test_content_bytes_are_sent_verbatim(sb: Sandbox, client: KlaviyoClient) -> None:
    raw = b'{"data":{"type":"profile","attributes":{"email":"raw@example.com"}}}'
    doc = client.post("/api/profiles", content=raw)
    assert doc is not None and doc["data"]["attributes"]["email"] == "raw@example.com"
    assert sb.state.requests[-1].bytes == len(raw)


def test_a_request_and_its_body_are_freed_when_used_not_at_the_next_collection(
    client: KlaviyoClient,
) -> None:
    """httpx's response and stream refer to each other; the client breaks that cycle, so a
    bulk import's megabytes of body do not wait for a garbage collection."""

    def responses() -> int:
        return sum(isinstance(o, httpx.Response) for o in gc.get_objects())

    gc.collect()
    before = responses()
    gc.disable()
    try:
        for n in range(5):
            client.post("/api/profiles", profile_body(f"freed{n}@example.com"))
            client.get("/api/profiles", {"filter": f'equals(email,"freed{n}@example.com")'})
        alive = responses() - before
    finally:
        gc.enable()
    assert alive == 0


def test_post_returns_none_for_202_and_delete_for_204(sb: Sandbox, client: KlaviyoClient) -> None:
    event = {
        "data": {
            "type": "event",
            "attributes": {
                "properties": {"sku": "A1"},
                "metric": {"data": {"type": "metric", "attributes": {"name": "Ordered"}}},
                "profile": {"data": {"type": "profile", "attributes": {"email": "e@example.com"}}},
                "unique_id": "order-1",
            },
        }
    }
    assert client.post("/api/events", event) is None
    list_id = client.post("/api/lists", {"data": {"type": "list", "attributes": {"name": "L"}}})
    assert list_id is not None
    profile = client.post("/api/profiles", profile_body("m@example.com"))
    assert profile is not None
    path = f"/api/lists/{list_id['data']['id']}/relationships/profiles"
    members = {"data": [{"type": "profile", "id": profile["data"]["id"]}]}
    assert client.post(path, members) is None
    assert client.delete(path, members) is None
    assert statuses(sb) == [202, 201, 201, 204, 204]


def test_patch_returns_the_document(client: KlaviyoClient) -> None:
    created = client.post("/api/profiles", profile_body("p@example.com"))
    assert created is not None
    pid = created["data"]["id"]
    body = {"data": {"type": "profile", "id": pid, "attributes": {"first_name": "Ada"}}}
    assert client.patch(f"/api/profiles/{pid}", body)["data"]["attributes"]["first_name"] == "Ada"


# ---- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 524])
def test_5xx_then_success_is_retried_and_counted(
    sb: Sandbox, client: KlaviyoClient, status: int
) -> None:
    sb.faults.add(Fault(kind="status", status=status, count=2, method="POST"))
    doc = client.post("/api/profiles", profile_body("r@example.com"))
    assert doc is not None and doc["data"]["id"]
    assert statuses(sb) == [status, status, 201]
    stats = client.stats
    assert (stats.requests, stats.retries, stats.transient_errors) == (3, 2, 2)
    assert stats.rate_limited == 0


def test_post_applied_then_5xx_is_retried_safely_as_upsert(
    sb: Sandbox, client: KlaviyoClient
) -> None:
    """Klaviyo applied the write but answered 503; retrying the upsert changes nothing."""
    sb.faults.add(Fault(kind="applied_status", status=503, count=1, path_prefix="/api/profile-"))
    doc = client.post("/api/profile-import", profile_body("u@example.com"))
    assert doc is not None
    assert statuses(sb) == [503, 200]  # the retry found the profile the first attempt created
    assert len(sb.state.profiles) == 1


def test_timeout_is_retried(sb: Sandbox) -> None:
    sb.faults.add(Fault(kind="timeout", delay=1.0, count=1))
    with make_client(sb, timeout=0.2) as c:
        started = time.monotonic()
        assert c.get("/api/profiles")["data"] == []
        assert time.monotonic() - started < 1.0
        assert (c.stats.requests, c.stats.retries, c.stats.transient_errors) == (2, 1, 1)


def test_connection_reset_is_retried(sb: Sandbox, client: KlaviyoClient) -> None:
    sb.faults.add(Fault(kind="reset", count=2))
    assert client.post("/api/profiles", profile_body("x@example.com")) is not None
    assert statuses(sb) == [0, 0, 201]
    assert client.stats.transient_errors == 2


def test_server_closing_without_answer_is_retried(sb: Sandbox) -> None:
    """A hung request the server drops before our timeout: a remote protocol error."""
    sb.faults.add(Fault(kind="timeout", delay=0.05, count=1))
    with make_client(sb, timeout=2.0) as c:
        assert c.get("/api/profiles")["data"] == []
        assert c.stats.retries == 1


def test_429_retry_after_is_honoured(sb: Sandbox, client: KlaviyoClient) -> None:
    sb.faults.add(Fault(kind="rate_limit", retry_after=1, count=1))
    started = time.monotonic()
    assert client.post("/api/profiles", profile_body("t@example.com")) is not None
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0  # Retry-After: 1, not the 0.02 s backoff
    throttled, created = sb.state.requests
    assert (throttled.status, created.status) == (429, 201)
    assert created.at - throttled.at >= 0.95
    stats = client.stats
    assert (stats.rate_limited, stats.retries, stats.transient_errors) == (1, 1, 0)
    assert stats.waited_seconds >= 1.0


def test_fractional_retry_after_from_a_fast_sandbox() -> None:
    """At time scale 10 the sandbox sends `Retry-After: 0.300` (real seconds)."""
    with Sandbox(api_key=API_KEY, port=0, time_scale=10.0).start() as fast:
        fast.faults.add(Fault(kind="rate_limit", retry_after=0.3, count=1))
        with make_client(fast, time_scale=10.0) as c:
            started = time.monotonic()
            c.get("/api/profiles")
            assert 0.3 <= time.monotonic() - started < 1.0


def test_real_throttling_from_another_integration_is_absorbed() -> None:
    """Two clients with separate limiters share one account: the second meets a real 429."""
    with Sandbox(api_key=API_KEY, port=0, time_scale=10.0).start() as fast:
        with (
            make_client(fast, time_scale=10.0) as first,
            make_client(fast, time_scale=10.0) as second,
        ):
            first.get("/api/accounts")  # accounts: 1 per second (0.1 s at scale 10)
            second.get("/api/accounts")
        assert statuses(fast) == [200, 429, 200]
        assert second.stats.rate_limited == 1
        gap = fast.state.requests[2].at - fast.state.requests[0].at
        assert gap >= 0.09  # waited for the server's burst window, no retry storm


def test_pacing_keeps_a_single_client_under_the_limits() -> None:
    """Accounts allow 1/s: the client waits on its own instead of collecting 429s.

    Time runs 4x fast (250 ms windows): faster scales leave a few ms of margin, which thread
    scheduling on a loaded CI machine can eat, and the test would measure the machine."""
    with Sandbox(api_key=API_KEY, port=0, time_scale=4.0).start() as fast:
        with make_client(fast, time_scale=4.0) as c:
            started = time.monotonic()
            for _ in range(5):
                c.get("/api/accounts")
            assert time.monotonic() - started >= 1.0
            assert c.stats.rate_limited == 0
            assert c.stats.waited_seconds >= 0.9
        assert statuses(fast) == [200] * 5


# ---- permanent errors -----------------------------------------------------------------------


def test_401_raises_auth_error_without_retry(sb: Sandbox) -> None:
    wrong = "pk_wrong_key_ABCDEFGHIJ"
    with make_client(sb, api_key=wrong) as c, pytest.raises(AuthError) as info:
        c.get("/api/profiles")
    err = info.value
    assert err.status == 401 and err.attempts == 1
    assert "API key" in str(err) and "missing or invalid" in str(err)
    assert wrong not in str(err) and wrong not in repr(err)
    assert statuses(sb) == [401]
    assert c.stats.requests == 1 and c.stats.retries == 0


def test_403_names_the_missing_scope_without_retry() -> None:
    with Sandbox(api_key=API_KEY, port=0, scopes=["profiles:read"]).start() as scoped:
        with make_client(scoped) as c, pytest.raises(AuthError) as info:
            c.post("/api/profiles", profile_body("s@example.com"))
        assert info.value.status == 403
        assert info.value.missing_scopes == ("profiles:write",)
        assert "lacks the scope profiles:write" in str(info.value)
        assert statuses(scoped) == [403]


def test_409_gives_conflict_error_with_duplicate_profile_id(
    sb: Sandbox, client: KlaviyoClient
) -> None:
    first = client.post("/api/profiles", profile_body("dup@example.com"))
    assert first is not None
    with pytest.raises(ConflictError) as info:
        client.post("/api/profiles", profile_body("dup@example.com"))
    assert info.value.duplicate_profile_id == first["data"]["id"]
    assert info.value.code == "duplicate_profile"
    assert statuses(sb) == [201, 409]


def test_400_is_permanent_with_pointer_and_not_retried(sb: Sandbox, client: KlaviyoClient) -> None:
    bad = {"data": {"type": "profile", "attributes": {"email": 42}}}
    with pytest.raises(PermanentError) as info:
        client.post("/api/profiles", bad)
    err = info.value
    assert not isinstance(err, TransientError)
    assert err.status == 400 and err.errors[0].pointer
    assert str(err).startswith("POST /api/profiles -> 400 ")
    assert f"(at {err.errors[0].pointer})" in str(err)
    assert statuses(sb) == [400]


# ---- retries exhausted --------------------------------------------------------------------


def test_5xx_exhausted_raises_transient_error_in_bounded_time(
    sb: Sandbox, client: KlaviyoClient
) -> None:
    sb.faults.add(Fault(kind="status", status=503, count=None))
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        client.get("/api/profiles", params={"filter": 'equals(email,"q@example.com")'})
    assert time.monotonic() - started < 1.0
    err = info.value
    assert err.attempts == 4 and err.status == 503
    assert "(after 4 attempts)" in str(err)
    assert "q@example.com" not in str(err)  # no query string in messages
    assert statuses(sb) == [503] * 4


def test_html_502_body_is_reported_readably(sb: Sandbox) -> None:
    sb.faults.add(Fault(kind="status", status=502, count=None, body="<html>Bad gateway</html>"))
    with make_client(sb, max_attempts=2) as c, pytest.raises(TransientError) as info:
        c.get("/api/profiles")
    assert "<html>Bad gateway</html>" in str(info.value)


def test_reset_exhausted_raises_transient_error(sb: Sandbox) -> None:
    sb.faults.add(Fault(kind="reset", count=None))
    with make_client(sb, max_attempts=3) as c, pytest.raises(TransientError) as info:
        c.get("/api/profiles")
    assert info.value.attempts == 3 and info.value.status is None
    assert "connection error" in str(info.value)


def test_429_exhausted_raises_rate_limited_error(sb: Sandbox) -> None:
    sb.faults.add(Fault(kind="rate_limit", retry_after=1, count=None))
    with make_client(sb, max_attempts=2, max_retry_after=0.1) as c:
        started = time.monotonic()
        with pytest.raises(RateLimitedError) as info:
            c.get("/api/profiles")
        assert time.monotonic() - started < 0.8  # Retry-After capped by max_retry_after
    assert info.value.retry_after == 1.0 and info.value.attempts == 2
    assert c.stats.rate_limited == 2


# ---- pagination ------------------------------------------------------------------------------


def test_paginate_follows_links_next_across_pages(sb: Sandbox, client: KlaviyoClient) -> None:
    emails = {f"page{i}@example.com" for i in range(45)}
    for email in sorted(emails):
        client.post("/api/profiles", profile_body(email))
    seen = list(client.paginate("/api/profiles", {"page[size]": 20}))
    assert {p["attributes"]["email"] for p in seen} == emails
    assert len({p["id"] for p in seen}) == 45
    assert [r.path for r in sb.state.requests if r.method == "GET"] == ["/api/profiles"] * 3


def test_full_urls_must_stay_on_the_api_host(sb: Sandbox, client: KlaviyoClient) -> None:
    with pytest.raises(ValueError, match="refusing to send the API key"):
        client.get("https://evil.example.com/api/profiles")
    assert sb.state.requests == []


# ---- secrets ------------------------------------------------------------------------------


def test_api_key_never_appears_in_repr_errors_or_logs(
    sb: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "klaviyo_pipelines"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    raised: list[KlaviyoError] = []
    with make_client(sb, max_attempts=2, timeout=0.2, max_retry_after=0.05) as c:
        assert API_KEY not in repr(c) and API_KEY not in str(c)
        assert API_KEY not in repr(vars(c))
        assert repr(Secret(API_KEY)) == "Secret('********')"
        c.post("/api/profiles", profile_body("k@example.com"))  # a success, logged by httpx
        sb.faults.add(Fault(kind="status", status=503, count=2))
        sb.faults.add(Fault(kind="reset", count=2))
        sb.faults.add(Fault(kind="timeout", delay=0.5, count=2))
        sb.faults.add(Fault(kind="rate_limit", retry_after=0.01, count=2))
        for _ in range(4):
            with pytest.raises(TransientError) as info:
                c.get("/api/profiles")
            raised.append(info.value)
        for bad in (profile_body("k@example.com"), {"data": {"type": "profile"}}):
            with pytest.raises(PermanentError) as perm:
                c.post("/api/profiles", bad)
            raised.append(perm.value)
    with make_client(sb, api_key=API_KEY[::-1]) as wrong, pytest.raises(AuthError) as auth:
        wrong.get("/api/profiles")
    raised.append(auth.value)

    assert len(raised) == 7
    for err in raised:
        text = "".join(traceback.format_exception(err))
        for shown in (str(err), repr(err), repr(err.args), text, repr(err.__cause__)):
            assert API_KEY not in shown and API_KEY[::-1] not in shown
    assert caplog.records, "expected httpx/httpcore debug logs"
    assert any(r.name.startswith("httpcore") for r in caplog.records)
    assert API_KEY not in caplog.text and API_KEY[::-1] not in caplog.text
    assert "Klaviyo-API-Key" not in caplog.text
    assert all(r.exc_text is None or API_KEY not in r.exc_text for r in caplog.records)


def test_rejects_blank_or_malformed_keys_without_echoing_them() -> None:
    with pytest.raises(ValueError, match="empty"):
        KlaviyoClient("  ")
    with pytest.raises(ValueError) as info:
        KlaviyoClient("pk_abc\ndef")
    assert "pk_abc" not in str(info.value)


def test_verify_is_on_by_default() -> None:
    with KlaviyoClient(API_KEY) as c:
        assert c.base_url == "https://a.klaviyo.com"
        # httpx keeps the SSL context on the transport's connection pool.
        pool = c._http._transport._pool  # type: ignore[attr-defined]
        assert pool._ssl_context.verify_mode.name == "CERT_REQUIRED"


# ---- error parsing (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'{"errors": "oops"}', b'{"errors": [null, 3]}', None],
)
def test_error_bodies_that_are_not_json_api_never_break_parsing(body: bytes | None) -> None:
    details = parse_error_details(body, 502)
    err = error_for_status(502, method="get", path="/api/x?filter=secret", errors=details)
    assert isinstance(err, TransientError)
    assert str(err).startswith("GET /api/x -> 502")
    assert "filter" not in str(err)


def test_error_fields_are_optional_and_errors_pickle() -> None:
    body = b'{"errors":[{"status":"409","meta":{"duplicate_profile_id":"01P"}},{"code":"x"}]}'
    details = parse_error_details(body)
    assert details[0] == ApiErrorDetail(status=409, meta={"duplicate_profile_id": "01P"})
    err = error_for_status(409, method="POST", path="/api/profiles", errors=details)
    assert isinstance(err, ConflictError) and err.duplicate_profile_id == "01P"
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is ConflictError and str(copy) == str(err)
    assert copy.duplicate_profile_id == "01P"
