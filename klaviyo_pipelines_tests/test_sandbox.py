"""The Klaviyo sandbox, exercised over real HTTP with httpx (no mocks)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from klaviyo_pipelines.sandbox import Fault, Sandbox
from klaviyo_pipelines.sandbox.ids import UlidGenerator

API_KEY = "pk_sandbox_test"
HEADERS = {
    "Authorization": f"Klaviyo-API-Key {API_KEY}",
    "revision": "2026-07-15",
    "Content-Type": "application/vnd.api+json",
    "Accept": "application/vnd.api+json",
}

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(api_key=API_KEY, port=0) as sb:
        yield sb


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, headers=HEADERS, timeout=10) as c:
        yield c


def _profile(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": attributes}}


def _bulk(rows: list[dict[str, Any]], list_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "profile-bulk-import-job",
        "attributes": {"profiles": {"data": rows}},
    }
    if list_id:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return {"data": data}


def _row(**attributes: Any) -> dict[str, Any]:
    return {"type": "profile", "attributes": attributes}


def _error(response: httpx.Response) -> dict[str, Any]:
    return response.json()["errors"][0]


def _create_list(client: httpx.Client, name: str) -> str:
    response = client.post(
        "/api/lists", json={"data": {"type": "list", "attributes": {"name": name}}}
    )
    assert response.status_code == 201, response.text
    return response.json()["data"]["id"]


# ---- conventions: auth, scopes, revision, media type ---------------------------------------


def test_wrong_or_missing_key_is_401_and_key_never_echoed(sandbox: Sandbox) -> None:
    for auth in (None, "Klaviyo-API-Key pk_wrong", f"Bearer {API_KEY}"):
        headers = {k: v for k, v in HEADERS.items() if k != "Authorization"}
        if auth:
            headers["Authorization"] = auth
        response = httpx.get(f"{sandbox.url}/api/accounts", headers=headers)
        assert response.status_code == 401
        assert _error(response)["code"] == "not_authenticated"
        assert API_KEY not in response.text
    assert API_KEY not in repr(sandbox)


def test_missing_scope_is_403_naming_the_scope() -> None:
    with Sandbox(api_key=API_KEY, scopes={"profiles:write"}) as sb:
        client = httpx.Client(base_url=sb.url, headers=HEADERS)
        assert client.get("/api/profiles").status_code == 200  # write implies read
        response = client.post(
            "/api/lists", json={"data": {"type": "list", "attributes": {"name": "X"}}}
        )
        assert response.status_code == 403
        error = _error(response)
        assert error["code"] == "permission_denied"
        assert "lists:write" in error["detail"]
        assert sb.state.lists == {}


@pytest.mark.parametrize("revision", [None, "", "2026/07/15", "2026-13-40", "latest"])
def test_revision_header_is_required_and_checked(sandbox: Sandbox, revision: str | None) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "revision"}
    if revision is not None:
        headers["revision"] = revision
    response = httpx.get(f"{sandbox.url}/api/profiles", headers=headers)
    assert response.status_code == 400
    assert _error(response)["source"] == {"parameter": "revision"}


def test_revision_with_suffix_and_plain_json_are_accepted(client: httpx.Client) -> None:
    response = client.post(
        "/api/profiles",
        content=json.dumps(_profile(email="suffix@example.com")),
        headers={"revision": "2026-07-15.pre", "Content-Type": "application/json"},
    )
    assert response.status_code == 201


def test_other_media_types_are_415(client: httpx.Client) -> None:
    response = client.post(
        "/api/profiles", content=b"email=a@example.com", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415


def test_unknown_path_404_and_wrong_method_405(client: httpx.Client) -> None:
    assert client.get("/api/nope").status_code == 404
    assert client.put("/api/profiles", json={}).status_code == 405


def test_non_loopback_hosts_are_refused() -> None:
    for host in ("0.0.0.0", "10.1.2.3", "example.com", "::"):
        with pytest.raises(ValueError):
            Sandbox(host=host)
    with Sandbox(host="localhost") as sb:
        assert sb.url.startswith("http://127.0.0.1:")


def test_run_forever_prints_url_but_never_the_key() -> None:
    secret = "pk_do_not_print_me"
    code = (
        "from klaviyo_pipelines.sandbox.server import run_forever\n"
        f"run_forever(port=0, api_key={secret!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = line.split("listening on ", 1)[1].split()[0]
        response = httpx.get(
            f"{url}/api/accounts", headers={**HEADERS, "Authorization": f"Klaviyo-API-Key {secret}"}
        )
        assert response.status_code == 200
        httpx.get(f"{url}/api/accounts?filter={secret}", headers=HEADERS)  # a 401, quietly
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert secret not in line + out + err
    assert err == ""


def test_stop_closes_keep_alive_connections(sandbox: Sandbox, client: httpx.Client) -> None:
    assert client.get("/api/accounts").status_code == 200
    sandbox.stop()
    with pytest.raises(httpx.TransportError):
        client.get("/api/accounts")


# ---- validation -----------------------------------------------------------------------------


def test_schema_errors_are_400_with_pointers(client: httpx.Client) -> None:
    response = client.post("/api/profiles", json=_profile(email=42))
    assert response.status_code == 400
    error = _error(response)
    assert set(error) >= {"id", "status", "code", "title", "detail", "source"}
    assert error["status"] == 400
    assert error["code"] == "invalid"
    assert error["source"]["pointer"] == "/data/attributes/email"

    response = client.post("/api/profiles", json={"data": {"type": "profile"}})
    assert _error(response)["source"]["pointer"] == "/data/attributes"

    response = client.post(
        "/api/profiles", json={"data": {"type": "profiles", "attributes": {"email": "a@b.co"}}}
    )
    assert _error(response)["source"]["pointer"] == "/data/type"

    response = client.post("/api/profiles", content=b"{not json")
    assert response.status_code == 400
    assert _error(response)["code"] == "parse_error"


@pytest.mark.parametrize(
    ("attributes", "pointer", "detail"),
    [
        ({"email": "not-an-email"}, "/data/attributes/email", "Invalid email address"),
        ({"email": "someone@example.invalid"}, "/data/attributes/email", "Invalid email address"),
        ({"phone_number": "555-0100"}, "/data/attributes/phone_number", "Invalid phone number"),
        ({"phone_number": "+15555550123"}, "/data/attributes/phone_number", "Invalid phone"),
        ({"external_id": "x" * 256}, "/data/attributes/external_id", "255"),
        ({"first_name": "Nobody"}, "/data/attributes", "identifier"),
    ],
)
def test_klaviyo_server_side_profile_rules(
    client: httpx.Client, attributes: dict[str, Any], pointer: str, detail: str
) -> None:
    for path in ("/api/profiles", "/api/profile-import"):
        response = client.post(path, json=_profile(**attributes))
        assert response.status_code == 400, response.text
        assert _error(response)["source"]["pointer"] == pointer
        assert detail in _error(response)["detail"]


# ---- profiles ---------------------------------------------------------------------------------


def test_create_profile_conflict_is_409_duplicate_profile(
    client: httpx.Client, sandbox: Sandbox
) -> None:
    first = client.post("/api/profiles", json=_profile(email="dup@example.com"))
    assert first.status_code == 201
    profile_id = first.json()["data"]["id"]
    assert len(profile_id) == 26 and profile_id.isupper()

    again = client.post(
        "/api/profiles", json=_profile(email="DUP@example.com", external_id="new-1")
    )
    assert again.status_code == 409
    body = again.json()
    error = body["errors"][0]
    assert error["status"] == 409
    assert error["code"] == "duplicate_profile"
    assert error["title"] == "Conflict."
    assert error["detail"] == "A profile already exists with one of these identifiers."
    assert error["source"] == {"pointer": "/data/attributes"}
    assert error["meta"] == {"duplicate_profile_id": profile_id}
    assert len(sandbox.state.profiles) == 1


def test_patch_profile_null_clears_omitted_kept_properties_merge(
    client: httpx.Client, sandbox: Sandbox
) -> None:
    created = client.post(
        "/api/profiles",
        json=_profile(
            email="p@example.com", first_name="Ann", last_name="Lee", properties={"a": 1, "b": 2}
        ),
    ).json()["data"]
    pid = created["id"]
    patch = {
        "data": {
            "type": "profile",
            "id": pid,
            "attributes": {"last_name": None, "properties": {"b": 3, "c": 4}},
        }
    }
    response = client.patch(f"/api/profiles/{pid}", json=patch)
    assert response.status_code == 200
    attrs = sandbox.state.profiles[pid].attributes
    assert attrs["first_name"] == "Ann"
    assert attrs["last_name"] is None
    assert attrs["properties"] == {"a": 1, "b": 3, "c": 4}

    mismatch = client.patch("/api/profiles/01NOTAREALPROFILEID0000000", json=patch)
    assert mismatch.status_code == 400
    assert _error(mismatch)["source"] == {"pointer": "/data/id"}
    patch["data"]["id"] = "01NOTAREALPROFILEID0000000"
    missing = client.patch("/api/profiles/01NOTAREALPROFILEID0000000", json=patch)
    assert missing.status_code == 404

    other = client.post("/api/profiles", json=_profile(email="other@example.com")).json()["data"]
    clash = {"data": {"type": "profile", "id": pid, "attributes": {"email": "other@example.com"}}}
    response = client.patch(f"/api/profiles/{pid}", json=clash)
    assert response.status_code == 409
    assert _error(response)["meta"]["duplicate_profile_id"] == other["id"]


def test_profile_import_upserts_by_identifier(client: httpx.Client, sandbox: Sandbox) -> None:
    created = client.post(
        "/api/profile-import", json=_profile(email="u@example.com", properties={"tier": "gold"})
    )
    assert created.status_code == 201
    updated = client.post(
        "/api/profile-import",
        json=_profile(email="u@example.com", phone_number="+13239169023", properties={"n": 1}),
    )
    assert updated.status_code == 200
    assert updated.json()["data"]["id"] == created.json()["data"]["id"]
    profile = sandbox.state.find_profile(phone_number="+13239169023")
    assert profile is not None
    assert profile.attributes["properties"] == {"tier": "gold", "n": 1}
    assert sandbox.state.find_profile(email="U@EXAMPLE.COM") is profile


def test_get_profiles_filters_and_paginates_with_full_url_links(
    client: httpx.Client, sandbox: Sandbox
) -> None:
    emails = [f"page{i:02d}@example.com" for i in range(45)]
    rows = [_row(email=e, external_id=f"ext-{i}") for i, e in enumerate(emails)]
    assert client.post("/api/profile-bulk-import-jobs", json=_bulk(rows)).status_code == 202
    assert sandbox.wait_for_jobs()
    client.post("/api/profiles", json=_profile(email="outsider@example.com"))

    wanted = [*emails, "nobody@example.com"]
    params = {"filter": f"any(email,{json.dumps(wanted)})", "page[size]": "20"}
    response = client.get("/api/profiles", params=params)
    seen: list[str] = []
    sizes = []
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        sizes.append(len(body["data"]))
        seen += [p["attributes"]["email"] for p in body["data"]]
        next_url = body["links"]["next"]
        if not next_url:
            break
        assert next_url.startswith(sandbox.url + "/api/profiles?")
        response = client.get(next_url)
    assert sizes == [20, 20, 5]
    assert sorted(seen) == sorted(emails)

    single = client.get("/api/profiles", params={"filter": "equals(external_id,'ext-7')"})
    assert [p["attributes"]["email"] for p in single.json()["data"]] == [emails[7]]
    both = client.get(
        "/api/profiles",
        params={"filter": f'equals(email,"{emails[3]}"),equals(external_id,"ext-4")'},
    )
    assert both.json()["data"] == []
    assert len(client.get("/api/profiles").json()["data"]) == 20  # default page size

    for bad in ("equals(first_name,'x')", "any(email,'a@b.co')", "equals(email,a@b.co)", "eq("):
        response = client.get("/api/profiles", params={"filter": bad})
        assert response.status_code == 400, bad
        assert _error(response)["source"] == {"parameter": "filter"}
    for size in ("0", "101", "ten"):
        assert client.get("/api/profiles", params={"page[size]": size}).status_code == 400
    assert client.get("/api/profiles", params={"page[cursor]": "garbage"}).status_code == 400


# ---- bulk import ------------------------------------------------------------------------------


def test_bulk_import_job_lifecycle_and_import_errors() -> None:
    # Polling shares the bulk-import bucket (10/s); this test polls faster than that on purpose.
    with Sandbox(api_key=API_KEY, job_delay=0.3, enforce_rate_limits=False) as sb:
        client = httpx.Client(base_url=sb.url, headers=HEADERS)
        list_id = _create_list(client, "Imported")
        sb.reject_profile = lambda attrs: (
            "Blocked by test" if attrs.get("last_name") == "X" else None
        )
        rows = [
            _row(email="ok0@example.com", first_name="A"),
            _row(email="typo@example.invalid"),
            _row(email="ok2@example.com", phone_number="+13239169023"),
            _row(email="ok3@example.com", phone_number="12345"),
            _row(first_name="no identifier"),
            _row(email="ok5@example.com", properties={"blob": "x" * (101 * 1024)}),
            _row(email="ok6@example.com", last_name="X"),
            _row(email="ok0@example.com", last_name="Again"),
            {"type": "profile", "id": "01NOSUCHPROFILE00000000000", "attributes": {}},
        ]
        response = client.post("/api/profile-bulk-import-jobs", json=_bulk(rows, list_id))
        assert response.status_code == 202
        job = response.json()["data"]
        assert job["type"] == "profile-bulk-import-job"
        assert job["attributes"]["status"] == "queued"
        assert job["attributes"]["total_count"] == len(rows)

        statuses = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            attrs = client.get(f"/api/profile-bulk-import-jobs/{job['id']}").json()["data"][
                "attributes"
            ]
            if not statuses or statuses[-1] != attrs["status"]:
                statuses.append(attrs["status"])
            if attrs["status"] == "complete":
                break
            time.sleep(0.05)
        assert statuses == ["queued", "processing", "complete"]
        assert attrs["completed_count"] == 3
        assert attrs["failed_count"] == 6
        assert attrs["started_at"] and attrs["completed_at"]

        errors: list[dict[str, Any]] = []
        url: str | None = f"/api/profile-bulk-import-jobs/{job['id']}/import-errors?page[size]=4"
        while url:
            page = client.get(url).json()
            errors += page["data"]
            url = page["links"]["next"]
        by_row = {int(e["attributes"]["source"]["pointer"].rsplit("/", 1)[1]): e for e in errors}
        assert sorted(by_row) == [1, 3, 4, 5, 6, 8]
        assert all(e["type"] == "import-error" for e in errors)
        assert all(
            e["attributes"]["source"]["pointer"].startswith("/data/attributes/profiles/data/")
            for e in errors
        )
        assert by_row[1]["attributes"]["detail"] == "Invalid email address"
        assert by_row[1]["attributes"]["original_payload"] == rows[1]
        assert "phone" in by_row[3]["attributes"]["detail"].lower()
        assert "100KB" in by_row[5]["attributes"]["detail"]
        assert by_row[6]["attributes"]["detail"] == "Blocked by test"
        assert by_row[8]["attributes"]["code"] == "not_found"

        imported = client.get(f"/api/profile-bulk-import-jobs/{job['id']}/profiles").json()
        assert {p["attributes"]["email"] for p in imported["data"]} == {
            "ok0@example.com",
            "ok2@example.com",
        }
        ok0 = sb.state.find_profile(email="ok0@example.com")
        assert ok0 is not None
        assert ok0.attributes["first_name"] == "A" and ok0.attributes["last_name"] == "Again"
        assert len(sb.state.list_members(list_id)) == 2
        assert sb.state.jobs[job["id"]].status == "complete"


def test_bulk_import_limits(client: httpx.Client, sandbox: Sandbox) -> None:
    too_many = [_row(email=f"m{i}@example.com") for i in range(10_001)]
    response = client.post("/api/profile-bulk-import-jobs", json=_bulk(too_many))
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"] == "/data/attributes/profiles/data"

    too_big = [_row(email=f"b{i}@example.com", properties={"p": "y" * 60_000}) for i in range(90)]
    response = client.post("/api/profile-bulk-import-jobs", json=_bulk(too_big))
    assert response.status_code == 413
    assert sandbox.state.jobs == {}

    unknown_list = client.post("/api/profile-bulk-import-jobs", json=_bulk(too_many[:1], "NoLst1"))
    assert unknown_list.status_code == 404

    records = [r for r in sandbox.state.requests if r.operation == "bulk_import_profiles"]
    assert [r.status for r in records] == [400, 413, 404]
    assert records[0].items == 10_001


# ---- lists ------------------------------------------------------------------------------------


def test_lists_create_find_add_remove(client: httpx.Client, sandbox: Sandbox) -> None:
    list_id = _create_list(client, "Newsletter")
    _create_list(client, "Other")
    assert len(list_id) == 6 and list_id.isalnum()

    found = client.get("/api/lists", params={"filter": 'equals(name,["Newsletter"])'}).json()
    assert [item["id"] for item in found["data"]] == [list_id]
    either = client.get("/api/lists", params={"filter": "any(name,['Newsletter','Other'])"})
    assert len(either.json()["data"]) == 2
    assert (
        client.get("/api/lists", params={"filter": 'equals(name,"Newsletter")'}).status_code == 400
    )
    assert client.get("/api/lists", params={"page[size]": "11"}).status_code == 400
    assert client.get(f"/api/lists/{list_id}").json()["data"]["attributes"]["name"] == "Newsletter"
    assert client.get("/api/lists/zzzzzz").status_code == 404

    ids = [
        client.post("/api/profiles", json=_profile(email=f"l{i}@example.com")).json()["data"]["id"]
        for i in range(3)
    ]
    members = {"data": [{"type": "profile", "id": pid} for pid in ids]}
    assert (
        client.post(f"/api/lists/{list_id}/relationships/profiles", json=members).status_code == 204
    )
    assert sandbox.state.list_members(list_id) == set(ids)
    remove = {"data": [{"type": "profile", "id": ids[0]}]}
    response = client.request("DELETE", f"/api/lists/{list_id}/relationships/profiles", json=remove)
    assert response.status_code == 204
    assert sandbox.state.list_members(list_id) == set(ids[1:])

    listed = client.get(f"/api/lists/{list_id}/relationships/profiles").json()["data"]
    assert {item["id"] for item in listed} == set(ids[1:])
    assert client.post("/api/lists/nolist/relationships/profiles", json=members).status_code == 404
    bogus = {"data": [{"type": "profile", "id": "01NOSUCHPROFILE00000000000"}]}
    response = client.post(f"/api/lists/{list_id}/relationships/profiles", json=bogus)
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"] == "/data/0/id"
    too_many = {"data": [{"type": "profile", "id": ids[0]}] * 1001}
    response = client.post(f"/api/lists/{list_id}/relationships/profiles", json=too_many)
    assert response.status_code == 400


# ---- rate limits ------------------------------------------------------------------------------


def test_rate_limit_headers_and_integer_retry_after(client: httpx.Client) -> None:
    ok = client.get("/api/accounts")  # accounts: burst 1/s, steady 15/m
    assert ok.status_code == 200
    assert ok.headers["RateLimit-Limit"] == "15"
    assert ok.headers["RateLimit-Remaining"] == "14"
    assert 0 < int(ok.headers["RateLimit-Reset"]) <= 60
    throttled = client.get("/api/accounts")
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"
    assert "RateLimit-Limit" not in throttled.headers
    error = _error(throttled)
    assert error["code"] == "throttled"
    assert error["title"] == "Request was throttled."
    assert error["detail"] == "Request was throttled. Expected available in 1 second."


def test_rate_limits_run_faster_with_time_scale() -> None:
    with Sandbox(api_key=API_KEY, time_scale=10) as sb:  # windows: 1 s -> 0.1 s, 60 s -> 6 s
        client = httpx.Client(base_url=sb.url, headers=HEADERS)
        statuses = []
        for _ in range(15):  # accounts: burst 1/s, steady 15/m
            response = client.get("/api/accounts")
            if response.status_code == 429:
                retry_after = float(response.headers["Retry-After"])
                assert 0 < retry_after <= 0.1
                time.sleep(retry_after)
                response = client.get("/api/accounts")
            statuses.append(response.status_code)
            assert 0 <= float(response.headers["RateLimit-Reset"]) <= 6.0
            time.sleep(0.101)
        assert statuses == [200] * 15
        steady = client.get("/api/accounts")  # the 16th inside the 6 s steady window
        assert steady.status_code == 429
        retry_after = steady.headers["Retry-After"]
        assert "." in retry_after and 1.0 < float(retry_after) <= 6.0
        assert _error(steady)["detail"].endswith(f"in {retry_after} seconds.")


def test_rate_limits_can_be_disabled() -> None:
    with Sandbox(api_key=API_KEY, enforce_rate_limits=False) as sb:
        client = httpx.Client(base_url=sb.url, headers=HEADERS)
        responses = [client.get("/api/accounts") for _ in range(20)]
        assert {r.status_code for r in responses} == {200}
        assert "RateLimit-Limit" not in responses[0].headers


# ---- faults -----------------------------------------------------------------------------------


def test_status_fault_is_not_applied_and_counts_down(
    client: httpx.Client, sandbox: Sandbox
) -> None:
    sandbox.faults.add(
        Fault(kind="status", status=503, count=2, method="POST", path_prefix="/api/lists")
    )
    body = {"data": {"type": "list", "attributes": {"name": "F"}}}
    assert client.get("/api/lists").status_code == 200  # method does not match
    assert [client.post("/api/lists", json=body).status_code for _ in range(3)] == [503, 503, 201]
    assert len(sandbox.state.lists) == 1
    posts = [r for r in sandbox.state.requests if r.method == "POST"]
    assert [(r.status, r.fault) for r in posts] == [(503, "status"), (503, "status"), (201, None)]


def test_applied_status_fault_applies_then_fails(client: httpx.Client, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(kind="applied_status", status=500, path_prefix="/api/profile-import"))
    response = client.post("/api/profile-import", json=_profile(email="applied@example.com"))
    assert response.status_code == 500
    assert sandbox.state.find_profile(email="applied@example.com") is not None


def test_timeout_fault_holds_then_drops(client: httpx.Client, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(kind="timeout", delay=1.0, path_prefix="/api/profiles"))
    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/profiles", json=_profile(email="slow@example.com"), timeout=0.2)
    assert sandbox.state.profiles == {}
    assert client.post("/api/profiles", json=_profile(email="slow@example.com")).status_code == 201


def test_reset_fault_surfaces_as_transport_error(client: httpx.Client, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(kind="reset", method="POST"))
    with pytest.raises(httpx.TransportError):
        client.post("/api/profiles", json=_profile(email="reset@example.com"))
    assert sandbox.state.profiles == {}
    assert sandbox.state.requests[-1].fault == "reset"
    assert client.post("/api/profiles", json=_profile(email="reset@example.com")).status_code == 201


def test_rate_limit_fault(client: httpx.Client, sandbox: Sandbox) -> None:
    sandbox.faults.add(Fault(kind="rate_limit", retry_after=3))
    response = client.get("/api/profiles")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert _error(response)["code"] == "throttled"
    assert client.get("/api/profiles").status_code == 200


def test_random_faults_are_reproducible_by_seed() -> None:
    def run(seed: int) -> list[int]:
        with Sandbox(api_key=API_KEY, enforce_rate_limits=False) as sb:
            sb.faults.random(rates={"status": 0.3, "applied_status": 0.1}, seed=seed)
            client = httpx.Client(base_url=sb.url, headers=HEADERS)
            return [client.get("/api/profiles").status_code for _ in range(60)]

    first, second = run(7), run(7)
    assert first == second
    assert {500, 502, 503, 504} & set(first)
    assert 200 in first


# ---- phase 2: events and consent --------------------------------------------------------------


def _event(email: str, metric: str = "Placed Order", **attributes: Any) -> dict[str, Any]:
    return {
        "type": "event",
        "attributes": {
            "properties": {"total": 10},
            "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
            **attributes,
        },
    }


def test_create_event_dedupes_by_unique_id(client: httpx.Client, sandbox: Sandbox) -> None:
    event = _event("e@example.com", unique_id="order-1")
    event["attributes"]["profile"] = {
        "data": {"type": "profile", "attributes": {"email": "e@example.com"}}
    }
    for _ in range(2):
        response = client.post("/api/events", json={"data": event})
        assert response.status_code == 202
        assert response.content == b""
    assert len(sandbox.state.events) == 1
    assert (
        sandbox.state.events[0].profile_id == sandbox.state.find_profile(email="e@example.com").id
    )


def test_bulk_events_duplicate_unique_id_fails_whole_request(
    client: httpx.Client, sandbox: Sandbox
) -> None:
    def body(events: list[dict[str, Any]]) -> dict[str, Any]:
        entry = {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": "b@example.com"}}},
                "events": {"data": events},
            },
        }
        return {
            "data": {
                "type": "event-bulk-create-job",
                "attributes": {"events-bulk-create": {"data": [entry]}},
            }
        }

    duplicate = body([_event("b", unique_id="u1"), _event("b", unique_id="u1")])
    response = client.post("/api/event-bulk-create-jobs", json=duplicate)
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"].endswith("/events/data/1/attributes/unique_id")
    assert sandbox.state.events == []

    ok = body(
        [
            _event("b", unique_id="u1"),
            _event("b", unique_id="u2"),
            _event("b", "Other", unique_id="u1"),
        ]
    )
    assert client.post("/api/event-bulk-create-jobs", json=ok).status_code == 202
    assert client.post("/api/event-bulk-create-jobs", json=ok).status_code == 202  # replay
    assert len(sandbox.state.events) == 3

    too_many = body([_event("b", unique_id=f"n{i}") for i in range(1001)])
    assert client.post("/api/event-bulk-create-jobs", json=too_many).status_code == 400


def test_bulk_subscribe_and_unsubscribe_record_consent(
    client: httpx.Client, sandbox: Sandbox
) -> None:
    list_id = _create_list(client, "Marketing")

    def job(kind: str, subscriptions: dict[str, Any], **extra: Any) -> dict[str, Any]:
        profile = {
            "type": "profile",
            "attributes": {
                "email": "c@example.com",
                "phone_number": "+13239169023",
                "subscriptions": subscriptions,
            },
        }
        return {
            "data": {
                "type": kind,
                "attributes": {"profiles": {"data": [profile]}, **extra},
                "relationships": {"list": {"data": {"type": "list", "id": list_id}}},
            }
        }

    subscribe = job(
        "profile-subscription-bulk-create-job",
        {
            "email": {"marketing": {"consent": "SUBSCRIBED"}},
            "sms": {"marketing": {"consent": "SUBSCRIBED"}},
        },
    )
    assert (
        client.post("/api/profile-subscription-bulk-create-jobs", json=subscribe).status_code == 202
    )
    profile = sandbox.state.find_profile(email="c@example.com")
    assert profile is not None
    assert sandbox.state.consent(profile.id, "email.marketing") == "SUBSCRIBED"
    assert sandbox.state.consent(profile.id, "sms.marketing") == "SUBSCRIBED"
    assert profile.id in sandbox.state.list_members(list_id)

    backdated = job(
        "profile-subscription-bulk-create-job",
        {"email": {"marketing": {"consent": "SUBSCRIBED", "consented_at": "2024-01-01T00:00:00Z"}}},
    )
    response = client.post("/api/profile-subscription-bulk-create-jobs", json=backdated)
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"].endswith("/marketing/consented_at")

    unsubscribe = job(
        "profile-subscription-bulk-delete-job",
        {"email": {"marketing": {"consent": "UNSUBSCRIBED"}}},
    )
    assert (
        client.post("/api/profile-subscription-bulk-delete-jobs", json=unsubscribe).status_code
        == 202
    )
    assert sandbox.state.consent(profile.id, "email.marketing") == "UNSUBSCRIBED"
    assert sandbox.state.consent(profile.id, "sms.marketing") == "SUBSCRIBED"
    assert profile.id not in sandbox.state.list_members(list_id)

    over = job(
        "profile-subscription-bulk-delete-job",
        {"email": {"marketing": {"consent": "UNSUBSCRIBED"}}},
    )
    over["data"]["attributes"]["profiles"]["data"] *= 101
    assert client.post("/api/profile-subscription-bulk-delete-jobs", json=over).status_code == 400


def test_request_log_counts_items_and_bytes(client: httpx.Client, sandbox: Sandbox) -> None:
    rows = [_row(email=f"r{i}@example.com") for i in range(7)]
    client.post("/api/profile-bulk-import-jobs", json=_bulk(rows))
    client.get("/api/profiles")
    bulk, read = sandbox.state.requests[-2:]
    assert (bulk.method, bulk.path, bulk.status, bulk.endpoint) == (
        "POST",
        "/api/profile-bulk-import-jobs",
        202,
        "profile_bulk_import",
    )
    assert bulk.items == 7 and bulk.bytes > 0
    assert (read.status, read.endpoint, read.items) == (200, "profiles", 0)
    sandbox.state.reset()
    assert sandbox.state.requests == [] and sandbox.state.profiles == {}


def test_null_optional_fields_are_valid_over_http(client: httpx.Client) -> None:
    event = _event("n@example.com", time=None, value=None, unique_id=None)
    event["attributes"]["profile"] = {
        "data": {"type": "profile", "id": None, "attributes": {"email": "n@example.com"}}
    }
    assert client.post("/api/events", json={"data": event}).status_code == 202
    bad_time = _event("n@example.com", time="yesterday")
    bad_time["attributes"]["profile"] = event["attributes"]["profile"]
    response = client.post("/api/events", json={"data": bad_time})
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"] == "/data/attributes/time"


def test_fast_validator_agrees_with_jsonschema() -> None:
    """The compiled happy-path checker must never accept what jsonschema rejects (or vice versa)."""
    from klaviyo_pipelines.sandbox.schemas import registry

    base = {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {
                "profiles": {
                    "data": [
                        {
                            "type": "profile",
                            "id": None,
                            "attributes": {
                                "email": "a@b.co",
                                "location": {"latitude": 1.5, "city": None},
                                "properties": {"a": 1},
                            },
                            "meta": {"patch_properties": {"unset": ["x"]}},
                        }
                    ]
                }
            },
            "relationships": {"lists": {"data": [{"type": "list", "id": "abc"}]}},
        }
    }
    junk: list[Any] = [None, True, 0, 1.5, "x", "2024-01-01T00:00:00", [], {}, [1], {"a": 1}]
    validator = registry()._validators["bulk_import_profiles"]

    def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        yield prefix
        if isinstance(node, dict | list):
            for key, child in node.items() if isinstance(node, dict) else enumerate(node):
                yield from paths(child, (*prefix, key))

    all_paths = [p for p in paths(base) if p]
    rng = random.Random(3)
    for _ in range(1500):
        body = json.loads(json.dumps(base))
        target = rng.choice(all_paths)
        parent = body
        for key in target[:-1]:
            parent = parent[key]
        parent[target[-1]] = rng.choice(junk)
        assert validator.fast(body) == validator.full.is_valid(body), (target, body)


def test_ulids_are_crockford_time_ordered_and_strictly_increasing() -> None:
    generator = UlidGenerator()
    before_ms = int(time.time() * 1000)
    ids = [generator.new() for _ in range(20_000)]  # many share a millisecond
    after_ms = int(time.time() * 1000)
    assert all(len(i) == 26 and set(i) <= set(CROCKFORD) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    value = 0
    for char in ids[0]:
        value = value * 32 + CROCKFORD.index(char)
    assert before_ms <= value >> 80 <= after_ms  # the first 48 bits are the millisecond
