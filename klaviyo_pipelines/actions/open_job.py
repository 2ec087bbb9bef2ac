"""A bulk job Klaviyo accepted and has not finished, with its rows packed until it does.

Why: an open job's rows are kept until Klaviyo says what became of each, and at 25,000
profiles/s with jobs that take half a minute that is most of a million rows. As objects (the
row, its values, its mapped item and request bytes) a row takes about 2.5 KB; packed, it is
its state JSON plus its key, hash and identifiers as JSON (0.42 KB on the bench's shop rows),
in one buffer per job, freed whole when the job settles. Jobs pile up when Klaviyo is slow
(1,000,000 rows at the cap), so a job still open after two seconds is compressed
(`compress`, zstd at level 1: 0.07 KB a row), 70 MB at the cap instead of 420. zstd works
outside the GIL, but its CPU (0.9 µs a row to compress and uncompress) is spent only
on jobs that stay open, not on those a quick Klaviyo ends (and the job list shows ended)
within them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import zstandard

from klaviyo_pipelines.actions.base import Prepared
from klaviyo_pipelines.actions.registry import KIND_BY_NAME
from klaviyo_pipelines.actions.values import dumps, dumps_row, own_size
from klaviyo_pipelines.warehouse.changes import ChangeRow

_NO_VALUES: dict[str, Any] = {}  # every unpacked row's `values` (never written to)
_NO_ITEM: dict[str, Any] = {}  # and its `item`
# zstd's level 1: 6x smaller on shop rows (70 bytes a row), 0.7 µs a row to compress and 0.24
# to uncompress; zlib's fastest level took 2.0 and 0.75 for 85 bytes, level 3 of zstd gains 2%
# for 1.5x the time.
_LEVEL = 1


class OpenJob:
    """The job's id and its rows, packed as lines of compact JSON (which never holds a raw
    newline), compressed together once `compress` is called: every row's `[key, hash, kind,
    partition]` as one list, every row's identifiers as another, then one line per row of its
    values. The two lists are written and read by one orjson call each, not one per row."""

    def __init__(self, job_id: str, items: Sequence[Prepared], identifiers: Sequence[str]):
        self.job_id = job_id
        self._identifiers = tuple(identifiers)
        self._count = len(items)
        rows = [item.row for item in items]
        # A kind is a StrEnum, which orjson writes as its text (`.value` would cost 0.1 µs).
        heads = [(row.key, row.row_hash, row.kind, row.partition) for row in rows]
        named = [[*map(item.item["attributes"].get, self._identifiers)] for item in items]
        lines = [dumps(heads), dumps(named)]
        lines += [dumps_row(row.values) for row in rows]
        self._packed = b"\n".join(lines)
        self._compressed = False

    def __len__(self) -> int:
        return self._count

    def compress(self) -> None:
        """Hold the rows compressed while the job is open (called by the thread awaiting it)."""
        if not self._compressed:
            # A compressor per call: one is not safe to share between the job threads. Its
            # result keeps the worst case's allocation (the input's size).
            compressed = zstandard.ZstdCompressor(level=_LEVEL).compress(self._packed)
            self._packed, self._compressed = own_size(compressed), True

    def _lines(self) -> bytes:
        if self._compressed:
            return zstandard.ZstdDecompressor().decompress(self._packed)
        return self._packed

    def rows(self) -> list[Prepared]:
        """The rows in the order sent, `values` as the state's JSON (`values_json`); `item`
        is left empty (`identifiers` tells what an import error without a pointer needs)."""
        if not self._count:
            return []
        heads, _, *values = self._lines().split(b"\n")
        return [
            Prepared(
                ChangeRow(
                    key, KIND_BY_NAME[kind], row_hash, _NO_VALUES, partition, None, line.decode()
                ),
                _NO_ITEM,
                b"",
            )
            for (key, row_hash, kind, partition), line in zip(
                orjson.loads(heads), values, strict=True
            )
        ]

    def identifiers(self) -> list[dict[str, Any]]:
        """Each row's identifiers that it has (by which an import error is matched to its
        row), in the order sent; read only when Klaviyo reports import errors."""
        if not self._count:
            return []
        named = self._lines().split(b"\n", 2)[1]
        return [
            {name: value for name, value in zip(self._identifiers, row, strict=True) if value}
            for row in orjson.loads(named)
        ]
