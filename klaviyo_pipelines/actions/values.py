"""Warehouse values to JSON: every type a driver hands us becomes what Klaviyo expects.

Decimals become numbers, datetimes ISO-8601 UTC, bytes base64, NaN and infinities null.
Every row's payload passes through here, so the common types (text, numbers, naive
timestamps) take a dispatch on their exact type before the general `isinstance` checks, and
serialising is orjson's (about 10x the standard library's speed).
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import orjson

_MAX_INT_DIGITS = 300  # longer integral decimals go as doubles (null beyond a double's range)
# Levels of arrays and objects a value may have. Real properties have a handful; 64 keeps the
# walk below (about three Python frames a level) far under the interpreter's recursion limit
# of 1,000, whatever stack the caller runs on (Dagster's is a hundred frames deep), and the
# payload under orjson's own limit of 254 levels. A deeper value is refused, its row rejected.
MAX_DEPTH = 64


class TooDeeplyNested(ValueError):
    """A value with more than MAX_DEPTH levels of arrays and objects; the caller names the
    row and column."""

    def __init__(self) -> None:
        super().__init__(f"is nested deeper than {MAX_DEPTH} levels of arrays and objects")


def json_value(value: Any) -> Any:
    """A JSON-safe equivalent of a warehouse value (None for NULL, NaN and infinities).
    Raises TooDeeplyNested for a value nested deeper than MAX_DEPTH.

    The flat types are converted here rather than in `_value`: one call fewer for each of
    the dozen values of every row."""
    kind = type(value)
    if kind in _AS_IS:
        return value
    convert = _BY_TYPE.get(kind)
    return convert(value) if convert else _value(value, MAX_DEPTH)


def _value(value: Any, room: int) -> Any:
    """`json_value` with `room` levels of nesting left."""
    kind = type(value)
    if kind in _AS_IS:
        return value
    if kind in _NESTED:
        return _NESTED[kind](value, room)
    convert = _BY_TYPE.get(kind)
    return convert(value) if convert else _by_isinstance(value, room)


def _float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _decimal(value: Decimal) -> int | float | None:
    if not value.is_finite():
        return None
    if -_MAX_INT_DIGITS < value.adjusted() < _MAX_INT_DIGITS:
        # Exact fraction, then int / int, which Python rounds correctly like float(value)
        # does, at half the cost of float(value)'s trip through text.
        numerator, denominator = value.as_integer_ratio()
        return numerator if denominator == 1 else numerator / denominator
    if value == value.to_integral_value() and value.adjusted() < _MAX_INT_DIGITS:
        return int(value)
    number = float(value)  # beyond a double's range: infinite, so null like Infinity
    return number if math.isfinite(number) else None


def _bytes(value: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(bytes(value)).decode("ascii")


def _dict(value: dict[Any, Any], room: int) -> dict[str, Any]:
    if room <= 0:
        raise TooDeeplyNested
    return {str(k): _value(v, room - 1) for k, v in value.items()}


def _list(value: Any, room: int) -> list[Any]:
    if room <= 0:
        raise TooDeeplyNested
    return [_value(v, room - 1) for v in value]


def _by_isinstance(value: Any, room: int) -> Any:
    """Subclasses of the types above (an IntEnum, a pandas Timestamp), numpy scalars, others."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Decimal):
        return _decimal(value)
    if isinstance(value, datetime):
        return iso_datetime(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return _bytes(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return _dict(value, room)
    if isinstance(value, list | tuple | set | frozenset):
        return _list(value, room)
    if hasattr(value, "item"):  # numpy and pandas scalars
        return _value(value.item(), room)
    return str(value)


def iso_datetime(value: datetime) -> str:
    """ISO-8601 in UTC; a naive datetime is taken to be UTC already, as warehouses store it.

    A plain datetime, naive or in UTC (a timestamp column's value), is written by orjson:
    0.65 µs a call instead of 1.5, the same text (a test compares them), and a row's
    timestamps pass here twice, for its payload and for its state."""
    if type(value) is datetime and (value.tzinfo is None or value.tzinfo is UTC):
        return orjson.dumps(value, option=_UTC_TEXT)[1:-1].decode()
    if value.tzinfo is None:
        return value.isoformat() + "Z"
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError:  # year 1 east of UTC, year 9999 west of it: keep the offset
            return value.isoformat()
    return value.isoformat().replace("+00:00", "Z")


_UTC_TEXT = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z  # "…Z", as `isoformat` with Z for +00:00
_AS_IS = frozenset({type(None), bool, str, int})
_BY_TYPE: dict[type, Callable[[Any], Any]] = {
    float: _float,
    Decimal: _decimal,
    datetime: iso_datetime,
    date: date.isoformat,
    time: time.isoformat,
    bytes: _bytes,
    bytearray: _bytes,
    memoryview: _bytes,
    uuid.UUID: str,
}
_NESTED: dict[type, Callable[[Any, int], Any]] = {
    dict: _dict,
    list: _list,
    tuple: _list,
    set: _list,
    frozenset: _list,
}


def own_size(written: bytes) -> bytes:
    """A copy the size of its contents, for bytes kept a while whose maker over-allocated:
    orjson's result keeps its whole write buffer, at least 4 KB however short the JSON
    (measured with orjson 3.13: 100,000 rows of 188 bytes held 393 MB, their copies 23 MB),
    and rows are kept until Klaviyo confirmed them."""
    return bytes(memoryview(written))


def dumps(payload: Any) -> bytes:
    """Compact UTF-8 JSON of a payload made of `json_value` results."""
    try:
        return own_size(orjson.dumps(payload))
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: the standard library writes it
        return json.dumps(
            payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()


def dumps_row(values: dict[str, Any]) -> bytes:
    """`dumps(json_value(values))` at half the cost, for the row kept in the delivery state:
    orjson walks the row in C and asks `json_value` only about what it would not write the
    same way itself (Decimal, datetimes, bytes, ...)."""
    try:
        return own_size(
            orjson.dumps(values, default=json_value, option=orjson.OPT_PASSTHROUGH_DATETIME)
        )
    except (orjson.JSONEncodeError, TypeError):  # integers beyond 64 bits, keys not text
        return dumps({str(column): json_value(value) for column, value in values.items()})
