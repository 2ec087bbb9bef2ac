"""Verify: read Klaviyo back and compare it, field by field, with what each sync delivered.

Every run records what Klaviyo confirmed, but Klaviyo and the warehouse drift apart for
reasons no run sees (an edit in Klaviyo's UI, a merged or deleted profile, a list emptied by
hand). Verification rebuilds each delivered row's payload from the delivery state (the row as
last delivered, `row_json`), looks its profile up by identifier (100 a request, through the
read endpoints only) and reports what differs. `repair` forgets the drifted rows' delivery,
so the next sync sends them again; without it nothing is written.

Upsert Profile is verified (profile fields, location, properties, membership of its list);
the other actions report their rows as not checked, with the reason.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from klaviyo_pipelines.actions.lookup import filter_expressions
from klaviyo_pipelines.actions.profile import InvalidRow
from klaviyo_pipelines.actions.registry import ChangeKind
from klaviyo_pipelines.config import Config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.klaviyo.endpoints import PROFILES
from klaviyo_pipelines.runner import check_sync
from klaviyo_pipelines.warehouse.changes import ChangeRow
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.state import state_table

VERIFIED_ACTIONS = frozenset({"upsert_profile"})
DEFAULT_SAMPLE = 1_000  # rows a sync's verification reads unless told otherwise
MAX_SAMPLES = 20
LOOKUP_BATCH = 100  # GET /api/profiles' largest page
IDENTIFIERS = ("email", "phone_number", "external_id")  # looked up in this order


@dataclass(frozen=True)
class Drift:
    """One difference: the row, its kind (missing, different, not_a_member), the field."""

    key: str
    kind: str
    field: str | None = None
    warehouse: Any = None
    klaviyo: Any = None


@dataclass
class VerifyReport:
    sync: str
    action: str
    delivered: int = 0  # rows in the delivery state
    checked: int = 0
    in_step: int = 0
    drifted: Counter[str] = field(default_factory=Counter)  # rows, by their first drift's kind
    unchecked: Counter[str] = field(default_factory=Counter)  # rows not checked, by reason
    samples: list[Drift] = field(default_factory=list)
    repaired: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sync": self.sync,
            "action": self.action,
            "delivered": self.delivered,
            "checked": self.checked,
            "in_step": self.in_step,
            "drifted": sum(self.drifted.values()),
            "drifted_by_kind": dict(self.drifted),
            "unchecked": dict(self.unchecked),
            "repaired": self.repaired,
            "samples": [
                {
                    "key": d.key,
                    "kind": d.kind,
                    "field": d.field,
                    "warehouse": d.warehouse,
                    "klaviyo": d.klaviyo,
                }
                for d in self.samples
            ],
        }


def verify_sync(
    config: Config,
    sync_name: str,
    wh: Warehouse,
    client: KlaviyoClient,
    *,
    sample: int | None = 1000,
    seed: int = 0,
    repair: bool = False,
) -> VerifyReport:
    """Compare up to `sample` delivered rows (None: all), chosen reproducibly by `seed`."""
    sync = config.syncs[sync_name]
    report = VerifyReport(sync=sync.name, action=sync.action)
    keys = _delivered_keys(wh, sync.name)
    report.delivered = len(keys)
    chosen = (
        keys if sample is None or sample >= len(keys) else random.Random(seed).sample(keys, sample)
    )
    if sync.action not in VERIFIED_ACTIONS:
        report.unchecked[f"{sync.action} cannot be verified yet"] = len(chosen)
        return report
    action = check_sync(config, sync_name, wh)
    members = _members(client, getattr(action, "list_id", None))
    drifted: list[str] = []
    for rows in _chunks(_delivered_rows(wh, sync.name, sorted(chosen)), LOOKUP_BATCH):
        expected = {}
        for key, values in rows:
            try:
                item = action.prepare(ChangeRow(key, ChangeKind.UPDATED, "", values))
            except InvalidRow as exc:
                report.unchecked[f"cannot rebuild its payload: {exc}"] += 1
                continue
            expected[key] = item.item["attributes"]
        found = _profiles(client, expected)
        for key, attributes in expected.items():
            profile = found.get(key)
            drifts = _compare(key, attributes, profile, members)
            report.checked += 1
            if drifts:
                drifted.append(key)
                report.drifted[drifts[0].kind] += 1
                room = MAX_SAMPLES - len(report.samples)
                report.samples += drifts[: max(0, room)]
            else:
                report.in_step += 1
    if repair and drifted:
        report.repaired = _forget_delivery(wh, sync.name, drifted)
    return report


def estimated_seconds(wh: Warehouse, sync: str) -> float:
    """How long looking up every delivered row takes within the profiles read quota."""
    lookups = math.ceil(len(_delivered_keys(wh, sync)) / LOOKUP_BATCH)
    return lookups / (PROFILES.steady_per_minute / 60)


def _delivered_keys(wh: Warehouse, sync: str) -> list[str]:
    with wh.connect("read the delivery state") as conn:
        if not wh.table_exists(conn, state_table(sync)):
            return []
        query = f"SELECT row_key FROM {wh.table(state_table(sync))} ORDER BY row_key"
        return list(conn.execute(sa.text(query)).scalars())


def _delivered_rows(wh: Warehouse, sync: str, keys: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(key, the row as last delivered) for `keys`, read 100 at a time by bound parameters."""
    table = wh.table(state_table(sync))
    for chunk in _chunks(keys, LOOKUP_BATCH):
        names = ", ".join(f":k{i}" for i in range(len(chunk)))
        query = sa.text(f"SELECT row_key, row_json FROM {table} WHERE row_key IN ({names})")
        with wh.connect("read the delivery state") as conn:
            rows = conn.execute(query, {f"k{i}": key for i, key in enumerate(chunk)}).all()
        for key, row_json in rows:
            yield key, json.loads(row_json) if row_json else {}


def _profiles(client: KlaviyoClient, expected: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """Each row's Klaviyo profile, found by its first identifier (email, phone, external id)."""
    by_field: dict[str, dict[str, str]] = {name: {} for name in IDENTIFIERS}
    for key, attributes in expected.items():
        for name in IDENTIFIERS:
            if attributes.get(name):
                by_field[name][_match(name, attributes[name])] = key
                break
    found: dict[str, dict] = {}
    for name, wanted in by_field.items():
        for expression in filter_expressions(name, sorted(wanted)):
            params = {"filter": expression, "page[size]": LOOKUP_BATCH}
            for profile in client.paginate("/api/profiles", params):
                value = (profile.get("attributes") or {}).get(name)
                if isinstance(value, str) and _match(name, value) in wanted:
                    found[wanted[_match(name, value)]] = profile
    return found


def _members(client: KlaviyoClient, list_id: str | None) -> set[str] | None:
    """The profile ids on the sync's list, or None when it adds to no list."""
    if not list_id or list_id.startswith("<"):  # `<the list named ...>`: not found yet
        return None
    path = f"/api/lists/{list_id}/relationships/profiles"
    return {str(member["id"]) for member in client.paginate(path, {"page[size]": LOOKUP_BATCH})}


def _compare(
    key: str, expected: dict[str, Any], profile: dict | None, members: set[str] | None
) -> list[Drift]:
    if profile is None:
        return [Drift(key, "missing")]
    actual = profile.get("attributes") or {}
    drifts = []
    for name, value in expected.items():
        if isinstance(value, dict):  # location, properties: each key the row set
            held = actual.get(name) or {}
            for sub, sub_value in value.items():
                if not _same(sub_value, held.get(sub)):
                    drifts.append(
                        Drift(key, "different", f"{name}.{sub}", sub_value, held.get(sub))
                    )
        elif not _same(value, actual.get(name)):
            drifts.append(Drift(key, "different", name, value, actual.get(name)))
    if members is not None and str(profile.get("id")) not in members:
        drifts.append(Drift(key, "not_a_member", "list"))
    return drifts


def _same(sent: Any, held: Any) -> bool:
    if isinstance(sent, str) and isinstance(held, str):
        return sent == held or (sent.lower() == held.lower() and "@" in sent)  # emails: any case
    if isinstance(sent, int | float) and isinstance(held, int | float):
        return math.isclose(sent, held, rel_tol=1e-9, abs_tol=1e-9)
    return json.dumps(sent, sort_keys=True, default=str) == json.dumps(
        held, sort_keys=True, default=str
    )


def _match(name: str, value: str) -> str:
    return value.lower() if name == "email" else value


def _forget_delivery(wh: Warehouse, sync: str, keys: Sequence[str]) -> int:
    """Delete the rows' delivery state: the next sync's change set has them as added."""
    table, forgotten = wh.table(state_table(sync)), 0
    with wh.begin("state write") as conn:
        for chunk in _chunks(keys, LOOKUP_BATCH):
            names = ", ".join(f":k{i}" for i in range(len(chunk)))
            result = conn.execute(
                sa.text(f"DELETE FROM {table} WHERE row_key IN ({names})"),
                {f"k{i}": key for i, key in enumerate(chunk)},
            )
            forgotten += result.rowcount
    return forgotten


def _chunks(items: Any, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
