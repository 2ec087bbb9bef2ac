"""An open job's packed rows come back as they went in, whatever their text holds."""

from __future__ import annotations

import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from klaviyo_pipelines.actions.base import Prepared
from klaviyo_pipelines.actions.open_job import OpenJob
from klaviyo_pipelines.actions.values import dumps_row
from klaviyo_pipelines.warehouse.changes import ChangeKind, ChangeRow

IDENTIFIERS = ("email", "phone_number", "external_id")


def prepared(key: str, kind: ChangeKind, values: dict, attributes: dict, partition=None):
    row = ChangeRow(key, kind, f"hash-{key}", values, partition)
    return Prepared(row=row, item={"type": "profile", "attributes": attributes}, body=b"{}")


@pytest.mark.parametrize("compressed", [False, True])
def test_rows_round_trip_with_newlines_unicode_big_numbers_and_missing_identifiers(
    compressed: bool,
) -> None:
    items = [
        prepared(
            "line\nbreak",
            ChangeKind.ADDED,
            {"note": "a\nb\r\n", "ltv": Decimal("12.50"), "at": datetime(2024, 1, 2, tzinfo=UTC)},
            {"email": "a@example.com", "first_name": "not kept"},
        ),
        prepared(
            "ünï",
            ChangeKind.UPDATED,
            {"big": 2**70, "name": "Zoë 🛍", "nothing": None},
            {"phone_number": "+15125550100", "external_id": "ünï"},
            partition="vip",
        ),
        prepared("gone", ChangeKind.DELETED, {}, {"external_id": "gone"}),
    ]
    job = OpenJob("J1", items, IDENTIFIERS)
    if compressed:
        job.compress()
    assert len(job) == 3 and job.job_id == "J1"
    rows = job.rows()
    for item, back, named in zip(items, rows, job.identifiers(), strict=True):
        assert back.row.key == item.row.key and back.row.kind is item.row.kind
        assert back.row.row_hash == item.row.row_hash
        assert back.row.partition == item.row.partition
        assert back.row.values_json == dumps_row(item.row.values).decode()
        kept = {k: v for k, v in item.item["attributes"].items() if k in IDENTIFIERS}
        assert named == kept
    assert OpenJob("J2", [], IDENTIFIERS).rows() == []
    assert OpenJob("J2", [], IDENTIFIERS).identifiers() == []


def test_an_open_job_holds_its_rows_compressed() -> None:
    """Open jobs pile up while Klaviyo is slow (up to 1,000,000 rows): each row must stay small
    once the job is compressed, as the thread awaiting a slow job does."""
    items = [
        prepared(
            f"customer-{i}",
            ChangeKind.ADDED,
            {
                "email": f"customer{i}@example.com",
                "first_name": "Zoë",
                "city": "Austin",
                "ltv": Decimal(f"{i}.25"),
                "signed_up": datetime(2024, 1, 1 + i % 28, tzinfo=UTC),
            },
            {"email": f"customer{i}@example.com", "external_id": f"customer-{i}"},
        )
        for i in range(5_000)
    ]
    tracemalloc.start()
    try:
        job = OpenJob("J3", items, IDENTIFIERS)
        job.compress()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    uncompressed = sum(len(dumps_row(item.row.values)) + len(item.row.key) + 60 for item in items)
    assert held < uncompressed / 3, (held, uncompressed)
    assert held / len(items) < 100  # bytes a row while the job is open
    assert len(job.rows()) == len(items) == len(job)
