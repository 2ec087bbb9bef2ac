"""Warehouse values to JSON: every type a driver hands us becomes what Klaviyo expects.

Decimals become numbers, datetimes ISO-8601 UTC, bytes base64, NaN and infinities null;
serialising is strict (`allow_nan=False`), so nothing Klaviyo would refuse leaves here.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

_MAX_INT_DIGITS = 300  # longer integral decimals go as doubles (null beyond a double's range)


def json_value(value: Any) -> Any:
    """A JSON-safe equivalent of a warehouse value (None for NULL, NaN and infinities)."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        if value == value.to_integral_value() and value.adjusted() < _MAX_INT_DIGITS:
            return int(value)
        number = float(value)  # beyond a double's range: infinite, so null like Infinity
        return number if math.isfinite(number) else None
    if isinstance(value, datetime):
        return iso_datetime(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_value(v) for v in value]
    if hasattr(value, "item"):  # numpy and pandas scalars
        return json_value(value.item())
    return str(value)


def iso_datetime(value: datetime) -> str:
    """ISO-8601 in UTC; a naive datetime is taken to be UTC already, as warehouses store it."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it: keep the offset
        return value.isoformat()
    return value.isoformat().replace("+00:00", "Z")


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
